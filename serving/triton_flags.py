"""The flags Triton users type, on `onnxserve serve`: aliases where onnxserve has the
meaning, a refusal naming onnxserve's equivalent where it has not.

Flags whose name and meaning are already onnxserve's (``--grpc-port``, ``--http-port``,
``--metrics-port``, ``--model-control-mode``, ``--load-model``, ``--repository-poll-secs``,
``--strict-readiness``, the ``--grpc-keepalive-*`` and ``--grpc-http2-*`` flags) are
settings of their own (serving/settings.py). The others come from tritonserver's
``src/command_line_parser.cc``: values as Triton takes them (booleans ``true``/``false``,
``1``/``0``, ``on``/``off``), as ``--flag value`` or ``--flag=value``. docs/triton.md lists
them with what differs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from onnxserve.serving.settings import parse_boolean

#: Triton flags onnxserve has no use for, and what to do instead
REFUSED = {
    "--backend-config": "set onnxruntime's options per model in config.pbtxt parameters "
                        "(intra_op_thread_count, inter_op_thread_count, execution_mode, "
                        "onnxserve.spinning) or for all models with --intra-op-threads, "
                        "--spinning",
    "--log-file": "onnxserve logs to stderr: redirect it (onnxserve serve ... 2>> FILE)",
    "--log-error": "onnxserve always logs errors; --log-level ERROR logs only them",
    "--exit-on-error": "onnxserve never exits because a model failed to load: it serves the "
                       "others and reports the failure in readiness (--strict-readiness)",
    "--strict-model-config": "onnxserve always completes a model's configuration from its "
                             "ONNX file, and refuses a configuration the file contradicts",
    "--disable-auto-complete-config": "onnxserve always completes a model's configuration "
                                      "from its ONNX file, and refuses a configuration the "
                                      "file contradicts",
    "--id": "onnxserve names itself onnxserve in ServerMetadata",
    "--http-thread-count": "onnxserve's HTTP/REST server runs on its event loop; for more "
                           "cores use --workers N",
    "--model-load-thread-count": "onnxserve loads models one after another, each in a "
                                 "thread of its own",
    "--rate-limit": "onnxserve has no rate limiter: bound each model's queue with "
                    "--max-queue-size or its config's default_queue_policy",
    "--pinned-memory-pool-byte-size": "onnxserve allocates pinned buffers per CUDA instance "
                                      "(docs/gpu.md)",
    "--cuda-memory-pool-byte-size": "set onnxruntime's CUDA arena per model with the "
                                    "gpu_mem_limit parameter in config.pbtxt (docs/gpu.md)",
    "--buffer-manager-thread-count": "no equivalent: onnxserve copies inputs where the batch "
                                     "runs",
    "--metrics-interval-ms": "onnxserve computes its metrics at each scrape",
    "--metrics-address": "onnxserve serves metrics on --grpc-host, the address of all its "
                         "ports",
    "--metrics-config": "no equivalent: onnxserve's metrics are always on "
                        "(docs/operating.md), --metrics-port 0 turns them off",
    "--allow-gpu-metrics": "no equivalent: onnxserve serves no GPU metrics",
    "--allow-cpu-metrics": "no equivalent: onnxserve serves no CPU metrics",
    "--grpc-infer-response-compression-level": "no equivalent: onnxserve answers "
                                               "uncompressed",
    "--cache-config": "no equivalent: onnxserve has no response cache",
    "--response-cache-byte-size": "no equivalent: onnxserve has no response cache",
    "--backend-directory": "no equivalent: onnxserve runs ONNX models with onnxruntime only",
    "--repoagent-directory": "no equivalent: onnxserve has no repository agents",
    "--host-policy": "pin cores per worker with --workers N and --cores",
    "--min-supported-compute-capability": "no equivalent: onnxruntime's CUDA provider "
                                          "decides which GPUs run",
    "--allow-sagemaker": "no equivalent: onnxserve serves KServe V2 over gRPC and HTTP",
    "--allow-vertex-ai": "no equivalent: onnxserve serves KServe V2 over gRPC and HTTP",
}


def _boolean(flag: str, text: str) -> bool:
    try:
        return parse_boolean(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentError(None, f"{flag}: expected true or false (or 1/0, on/off), "
                                           f"not {text!r}") from None


class _Alias(argparse.Action):
    """A Triton flag: its value becomes settings through ``apply(namespace, value)``."""

    def __init__(self, option_strings: Sequence[str], dest: str,
                 apply: Callable[[argparse.Namespace, str, str], None], **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self._apply = apply

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        flag = option_string or self.option_strings[0]
        try:
            self._apply(namespace, flag, values)
        except argparse.ArgumentError as exc:
            parser.error(exc.message)
        except ValueError:
            parser.error(f"{flag}: not a value it takes: {values!r}")


class _Refused(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        flag = option_string or self.option_strings[0]
        parser.error(f"{flag} is Triton's and onnxserve has no such setting: "
                     f"{REFUSED[flag]}")


def _set(dest: str, convert: Callable[[str], Any] = str
         ) -> Callable[[argparse.Namespace, str, str], None]:
    def apply(namespace: argparse.Namespace, flag: str, value: str) -> None:
        setattr(namespace, dest, convert(value))
    return apply


def _off_when_false(dest: str) -> Callable[[argparse.Namespace, str, str], None]:
    """--allow-http false: the port setting ``dest`` becomes 0 (off)."""
    def apply(namespace: argparse.Namespace, flag: str, value: str) -> None:
        if not _boolean(flag, value):
            setattr(namespace, dest, 0)
    return apply


def _allow_grpc(namespace: argparse.Namespace, flag: str, value: str) -> None:
    if not _boolean(flag, value):
        raise argparse.ArgumentError(None, f"{flag} false: onnxserve always serves gRPC "
                                           "(--http-port 0 turns HTTP/REST off)")


def _log_verbose(namespace: argparse.Namespace, flag: str, value: str) -> None:
    try:
        level = int(value)
    except ValueError:
        level = int(_boolean(flag, value))
    if level > 0:
        namespace.log_level = "DEBUG"


def _log_quieter(level: str) -> Callable[[argparse.Namespace, str, str], None]:
    """--log-info false: log from ``level`` up (unless --log-level asked for less)."""
    order = ["DEBUG", "INFO", "WARNING", "ERROR"]

    def apply(namespace: argparse.Namespace, flag: str, value: str) -> None:
        current = str(namespace.log_level).upper()
        if not _boolean(flag, value) and (current not in order
                                          or order.index(current) < order.index(level)):
            namespace.log_level = level
    return apply


def log_format(value: str) -> str:
    """A --log-format value: onnxserve's text or json, or Triton's default or ISO8601 (text:
    onnxserve's text lines start with an ISO 8601 date and time)."""
    if value in ("default", "ISO8601"):
        return "text"
    if value not in ("text", "json"):
        raise argparse.ArgumentTypeError(f"expected text or json (or Triton's default, "
                                         f"ISO8601), not {value!r}")
    return value


def _address(namespace: argparse.Namespace, flag: str, value: str) -> None:
    """--grpc-address / --http-address: onnxserve listens on one address for every port."""
    chosen = getattr(namespace, "_triton_address", None)
    if chosen is not None and chosen != value:
        raise argparse.ArgumentError(None, f"{flag} {value}: onnxserve listens on one address "
                                           f"for all its ports, and {chosen} was given")
    namespace._triton_address = value
    namespace.grpc_host = value


def _use_ssl(namespace: argparse.Namespace, flag: str, value: str) -> None:
    namespace._triton_ssl = _boolean(flag, value)


def _use_ssl_mutual(namespace: argparse.Namespace, flag: str, value: str) -> None:
    namespace._triton_ssl_mutual = _boolean(flag, value)
    if namespace._triton_ssl_mutual:
        namespace._triton_ssl = True


def _stash(name: str) -> Callable[[argparse.Namespace, str, str], None]:
    """A TLS file, kept until apply_triton_tls knows whether --grpc-use-ssl turns it on."""
    def apply(namespace: argparse.Namespace, flag: str, value: str) -> None:
        setattr(namespace, name, Path(value))
    return apply


#: what apply_triton_tls reads, and removes, from the parsed flags
_STASHED = ("_triton_ssl", "_triton_ssl_mutual", "_triton_cert", "_triton_key",
            "_triton_root_cert", "_triton_address")


#: Triton flag -> (metavar, what its value sets, help)
ALIASES: dict[str, tuple[str, Callable[[argparse.Namespace, str, str], None], str]] = {
    "--model-store": ("PATH", _set("model_repository", Path), "= --model-repository"),
    "--exit-timeout-secs": ("N", _set("drain_seconds", float), "= --drain-seconds"),
    "--allow-http": ("BOOL", _off_when_false("http_port"), "false = --http-port 0"),
    "--allow-metrics": ("BOOL", _off_when_false("metrics_port"), "false = --metrics-port 0"),
    "--allow-grpc": ("BOOL", _allow_grpc, "true only: gRPC is always served"),
    "--log-verbose": ("N", _log_verbose, "N > 0 = --log-level DEBUG"),
    "--log-info": ("BOOL", _log_quieter("WARNING"), "false = --log-level WARNING"),
    "--log-warning": ("BOOL", _log_quieter("ERROR"), "false = --log-level ERROR"),
    "--grpc-address": ("ADDRESS", _address, "= --grpc-host (one address for all ports)"),
    "--http-address": ("ADDRESS", _address, "= --grpc-host (one address for all ports)"),
    "--grpc-use-ssl": ("BOOL", _use_ssl, "with --grpc-server-cert and --grpc-server-key: TLS "
                                         "(on HTTP/REST too)"),
    "--grpc-server-cert": ("PATH", _stash("_triton_cert"), "with --grpc-use-ssl: = --tls-cert"),
    "--grpc-server-key": ("PATH", _stash("_triton_key"), "with --grpc-use-ssl: = --tls-key"),
    "--grpc-use-ssl-mutual": ("BOOL", _use_ssl_mutual, "with --grpc-root-cert: mutual TLS"),
    "--grpc-root-cert": ("PATH", _stash("_triton_root_cert"),
                         "with --grpc-use-ssl-mutual: = --tls-client-ca"),
}


def add_triton_flags(parser: argparse.ArgumentParser) -> None:
    """Add Triton's flags to `onnxserve serve`'s ``parser`` (call ``apply_triton_tls`` on
    the parsed namespace)."""
    group = parser.add_argument_group(
        "Triton's flags", "tritonserver flags onnxserve takes with the same meaning "
        "(docs/triton.md); Triton's other flags are refused with their onnxserve equivalent")
    for flag, (metavar, apply, help_text) in ALIASES.items():
        group.add_argument(flag, action=_Alias, apply=apply, metavar=metavar,
                           dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=help_text)
    shared = parser._option_string_actions["--log-format"]  # Triton's flag too
    shared.type, shared.choices = log_format, None
    for flag in REFUSED:
        parser.add_argument(flag, action=_Refused, nargs="?", dest=argparse.SUPPRESS,
                            default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def apply_triton_tls(parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> None:
    """Triton's TLS flags, read together once all are parsed: --grpc-use-ssl turns on the
    certificate and key given, --grpc-use-ssl-mutual the root certificate as the client CA.
    Certificates given without --grpc-use-ssl stay unused, as Triton leaves them."""
    stashed = {name: getattr(namespace, name, None) for name in _STASHED}
    for name in _STASHED:
        if hasattr(namespace, name):
            delattr(namespace, name)
    if not stashed["_triton_ssl"]:
        return
    cert, key, root = (stashed["_triton_cert"], stashed["_triton_key"],
                       stashed["_triton_root_cert"])
    if cert is None or key is None:
        parser.error("--grpc-use-ssl needs --grpc-server-cert and --grpc-server-key")
    namespace.tls_cert, namespace.tls_key = cert, key
    if stashed["_triton_ssl_mutual"]:
        if root is None:
            parser.error("--grpc-use-ssl-mutual needs --grpc-root-cert (the CA that signs "
                         "client certificates)")
        namespace.tls_client_ca = root
