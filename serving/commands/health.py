"""`onnxserve health`: ask a server's grpc.health.v1 service; exit 0 only when SERVING.

For container HEALTHCHECKs and scripts:

    onnxserve health [--url 127.0.0.1:8001] [--service lenet5] [--ssl --root-certificates CA]

It takes the client's connection options and their ONNXSERVE_* variables (see
clients/connection.py), and reads the server's own ONNXSERVE_GRPC_PORT and ONNXSERVE_TLS_CERT
(a container's health check runs beside its server, with its environment): the image's
HEALTHCHECK finds the port and uses TLS when the server does; ONNXSERVE_ROOT_CERTIFICATES,
ONNXSERVE_SSL_TARGET_NAME and, for mutual TLS, ONNXSERVE_PRIVATE_KEY /
ONNXSERVE_CERTIFICATE_CHAIN say how to trust it. The health service needs no token.
On failure it prints what failed: the connection (refused, TLS handshake, ...), or the
server's or model's status.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from onnxserve.clients.connection import (
    ConnectionOptions,
    ConnectionSettingsError,
    add_connection_arguments,
    explain_unavailable,
    options_from_arguments,
)


def default_health_url() -> str:
    """The address a container's health check reaches its own server at: loopback, on the
    server's ONNXSERVE_GRPC_PORT (8001 when unset)."""
    return f"127.0.0.1:{os.environ.get('ONNXSERVE_GRPC_PORT') or 8001}"


@dataclass(frozen=True)
class HealthResult:
    """The status name (SERVING, NOT_SERVING, ...) or gRPC code, and what it means."""

    status: str
    explanation: str = ""

    @property
    def serving(self) -> bool:
        return self.status == "SERVING"


def check(url: str | ConnectionOptions, service: str = "",
          timeout: float = 3.0) -> HealthResult:
    """Ask for ``service``'s health ("" = the whole server)."""
    options = url if isinstance(url, ConnectionOptions) else ConnectionOptions(url=url)
    channel_options = ([("grpc.ssl_target_name_override", options.ssl_target_name)]
                       if options.ssl_target_name else [])
    if options.tls:
        credentials = grpc.ssl_channel_credentials(
            options.root_certificates, options.private_key, options.certificate_chain)
        channel = grpc.secure_channel(options.url, credentials, options=channel_options)
    else:
        channel = grpc.insecure_channel(options.url, options=channel_options)
    what = f"model {service!r}" if service else "the server"
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service),
                                  timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                why = explain_unavailable(exc.details() or "", options.url, options.tls)
            elif code == grpc.StatusCode.NOT_FOUND:
                why = f"the server at {options.url} knows no {what}"
            elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
                why = f"no answer from {options.url} within {timeout:g} s"
            else:
                why = f"{options.url} answered {code.name}: {exc.details()}"
            return HealthResult(code.name, why)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    explanation = "" if status == "SERVING" else (
        f"{what} at {options.url} is {status}: "
        + ("not every model it serves is loaded, or it is starting or stopping (see "
           "RepositoryIndex for each model's state)" if not service
           else "the model is not loaded, failed to load, or is unloading"))
    return HealthResult(status, explanation)


def add_health_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("health", help="exit 0 when the server (or a model) is serving")
    p.add_argument("--service", default="", help="a model name; empty: the whole server")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default %(default)s)")
    add_connection_arguments(p, default_url=default_health_url())
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if os.environ.get("ONNXSERVE_TLS_CERT"):
        args.ssl = True  # the server in this container serves TLS (its own setting)
    try:
        options = options_from_arguments(args)
    except ConnectionSettingsError as exc:
        print(f"onnxserve health: {exc}", file=sys.stderr)
        return 2
    result = check(options, args.service, args.timeout)
    print(result.status)
    if not result.serving:
        print(f"onnxserve health: {result.explanation}", file=sys.stderr)
    return 0 if result.serving else 1
