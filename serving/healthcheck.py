"""`onnxserve health`: ask a server's grpc.health.v1 service; exit 0 only when SERVING.

For container HEALTHCHECKs and scripts:

    onnxserve health --url 127.0.0.1:8001 [--service lenet5]
"""

from __future__ import annotations

import argparse

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(url: str, service: str = "", timeout: float = 3.0) -> str:
    """The health status name of ``service`` ("" = the server), or the gRPC error's code."""
    with grpc.insecure_channel(url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service),
                                  timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def add_health_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("health", help="exit 0 when the server (or a model) is serving")
    p.add_argument("--url", default="127.0.0.1:8001", help="server address (default %(default)s)")
    p.add_argument("--service", default="", help="a model name; empty: the whole server")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default %(default)s)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    status = check(args.url, args.service, args.timeout)
    print(status)
    return 0 if status == "SERVING" else 1

