"""The `onnxserve` command: serve, export, samples, demo, bench."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .logs import configure as configure_logs
from .settings import (
    CONTROL_MODES,
    DEFAULT_GRPC_PORT,
    DEFAULT_HTTP2_MAX_PING_STRIKES,
    DEFAULT_HTTP2_MAX_PINGS_WITHOUT_DATA,
    DEFAULT_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
    DEFAULT_KEEPALIVE_PERMIT_WITHOUT_CALLS,
    DEFAULT_KEEPALIVE_TIME_MS,
    DEFAULT_KEEPALIVE_TIMEOUT_MS,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_QUEUE_SIZE,
    DEFAULT_MODEL_REPOSITORY,
    PROVIDER_MODES,
    SPINNING_MODES,
    ServerSettings,
    env,
)


def add_repository_argument(parser: argparse.ArgumentParser) -> None:
    """The --model-repository flag the subcommands share (env ONNXSERVE_MODEL_REPOSITORY)."""
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=Path(env("MODEL_REPOSITORY", str(DEFAULT_MODEL_REPOSITORY))),
        help="model repository folder (env ONNXSERVE_MODEL_REPOSITORY; default %(default)s)",
    )


def _optional_path(name: str) -> Path | None:
    value = env(name, "")
    return Path(value) if value else None


def _boolean(text: str) -> bool:
    """A flag or environment value read as Triton reads its booleans (true/false, 1/0, ...)."""
    value = text.strip().lower()
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false (or 1/0, on/off), not {text!r}")


def _add_keepalive(p: argparse.ArgumentParser) -> None:
    """Triton's gRPC keepalive and HTTP/2 ping-policy flags (settings.py has the reasons)."""
    for flag, name, default, meaning in (
            ("--grpc-keepalive-time", "GRPC_KEEPALIVE_TIME", DEFAULT_KEEPALIVE_TIME_MS,
             "ms between the server's keepalive pings on a quiet connection"),
            ("--grpc-keepalive-timeout", "GRPC_KEEPALIVE_TIMEOUT", DEFAULT_KEEPALIVE_TIMEOUT_MS,
             "ms the server waits for a keepalive ping's acknowledgement before it closes "
             "the connection"),
            ("--grpc-http2-max-pings-without-data", "GRPC_HTTP2_MAX_PINGS_WITHOUT_DATA",
             DEFAULT_HTTP2_MAX_PINGS_WITHOUT_DATA,
             "pings the server may send while it sends no data, 0 = no limit"),
            ("--grpc-http2-min-recv-ping-interval-without-data",
             "GRPC_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA",
             DEFAULT_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
             "ms below which a client's ping while no data flows counts as a strike"),
            ("--grpc-http2-max-ping-strikes", "GRPC_HTTP2_MAX_PING_STRIKES",
             DEFAULT_HTTP2_MAX_PING_STRIKES,
             "strikes after which the server closes the connection with GOAWAY "
             "too_many_pings, 0 = never")):
        # A string default goes through ``type`` too, so a bad environment value is an
        # argument error naming the flag rather than a traceback.
        p.add_argument(flag, type=int, default=env(name, str(default)), metavar="N",
                       help=f"{meaning} (env ONNXSERVE_{name}; default %(default)s)")
    p.add_argument("--grpc-keepalive-permit-without-calls", type=_boolean, nargs="?",
                   const=True, metavar="BOOL",
                   default=env("GRPC_KEEPALIVE_PERMIT_WITHOUT_CALLS",
                               str(DEFAULT_KEEPALIVE_PERMIT_WITHOUT_CALLS).lower()),
                   help="accept keepalive pings on connections with no call in flight; "
                        "true/false, 1/0 (env ONNXSERVE_GRPC_KEEPALIVE_PERMIT_WITHOUT_CALLS; "
                        "default %(default)s)")


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a model repository over gRPC (KServe V2)")
    add_repository_argument(p)
    p.add_argument("--grpc-host", default=env("GRPC_HOST", "0.0.0.0"),
                   help="address to listen on (env ONNXSERVE_GRPC_HOST; default %(default)s)")
    p.add_argument("--grpc-port", type=int, default=int(env("GRPC_PORT", str(DEFAULT_GRPC_PORT))),
                   help="gRPC port (env ONNXSERVE_GRPC_PORT; default %(default)s)")
    p.add_argument("--providers", choices=PROVIDER_MODES, default=env("PROVIDERS", "auto"),
                   help="execution provider: auto (CUDA when it really works, else CPU), cpu, "
                        "or cuda (fail if CUDA is not usable) (env ONNXSERVE_PROVIDERS; "
                        "default %(default)s)")
    p.add_argument("--max-message-bytes", type=int,
                   default=int(env("MAX_MESSAGE_BYTES", str(DEFAULT_MAX_MESSAGE_BYTES))),
                   help="largest gRPC message accepted or sent (env ONNXSERVE_MAX_MESSAGE_BYTES; "
                        "default %(default)s)")
    p.add_argument("--intra-op-threads", type=int, default=int(env("INTRA_OP_THREADS", "0")),
                   help="onnxruntime threads per session, 0 = the cores split between a "
                        "model's instances (env ONNXSERVE_INTRA_OP_THREADS; default %(default)s)")
    p.add_argument("--cores", type=int, default=int(env("CORES", "0")),
                   help="cores this server's onnxruntime sessions share, 0 = all (env "
                        "ONNXSERVE_CORES; default %(default)s; --workers N gives each worker "
                        "its share)")
    p.add_argument("--spinning", choices=SPINNING_MODES, default=env("SPINNING", "") or None,
                   help="when onnxruntime's threads spin waiting for work: off, run (only "
                        "while a batch runs), always (env ONNXSERVE_SPINNING; default: run, "
                        "or off when a model's instances have more threads than there are "
                        "cores)")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction,
                   default=env("WARMUP", "1") not in ("0", "false", "no"),
                   help="run warm-up batches before a model reports ready (env "
                        "ONNXSERVE_WARMUP; default on)")
    p.add_argument("--model-control-mode", choices=CONTROL_MODES,
                   default=env("MODEL_CONTROL_MODE", "none"),
                   help="none: load every model at start; poll: also rescan the repository "
                        "and load, reload and unload what changed; explicit: load only "
                        "--load-model models and what the load/unload RPCs ask for (env "
                        "ONNXSERVE_MODEL_CONTROL_MODE; default %(default)s)")
    p.add_argument("--repository-poll-secs", type=float,
                   default=float(env("REPOSITORY_POLL_SECS", "15")),
                   help="seconds between repository scans in poll mode (env "
                        "ONNXSERVE_REPOSITORY_POLL_SECS; default %(default)s)")
    p.add_argument("--load-model", action="append", default=[], metavar="NAME",
                   help="in explicit mode, a model to load at start ('*': all); repeatable; "
                        "a name with no folder in the repository stops the start")
    p.add_argument("--model-name", default=env("MODEL_NAME", "") or None,
                   help="name of the model when the repository holds a single .onnx file at "
                        "its root (KServe's single-file layout; env ONNXSERVE_MODEL_NAME; "
                        "default: the repository folder's name)")
    p.add_argument("--drain-seconds", type=float, default=float(env("DRAIN_SECONDS", "10")),
                   help="seconds admitted requests get to finish at shutdown, unload or "
                        "reload (env ONNXSERVE_DRAIN_SECONDS; default %(default)s)")
    p.add_argument("--max-queue-size", type=int,
                   default=int(env("MAX_QUEUE_SIZE", str(DEFAULT_MAX_QUEUE_SIZE))),
                   help="requests waiting per model version beyond which new ones get "
                        "RESOURCE_EXHAUSTED; a config's max_queue_size wins; 0 = unbounded "
                        "(env ONNXSERVE_MAX_QUEUE_SIZE; default %(default)s)")
    p.add_argument("--metrics-port", type=int, default=int(env("METRICS_PORT", "8002")),
                   help="Prometheus /metrics port, 0 = off; with --workers N, worker k uses "
                        "port + k (env ONNXSERVE_METRICS_PORT; default %(default)s)")
    p.add_argument("--log-format", choices=("text", "json"), default=env("LOG_FORMAT", "text"),
                   help="(env ONNXSERVE_LOG_FORMAT; default %(default)s)")
    p.add_argument("--tls-cert", type=Path, default=_optional_path("TLS_CERT"),
                   help="PEM certificate chain: serve over TLS (env ONNXSERVE_TLS_CERT)")
    p.add_argument("--tls-key", type=Path, default=_optional_path("TLS_KEY"),
                   help="PEM private key for --tls-cert (env ONNXSERVE_TLS_KEY)")
    p.add_argument("--tls-client-ca", type=Path, default=_optional_path("TLS_CLIENT_CA"),
                   help="PEM CA: clients must present a certificate it signed (mutual TLS; "
                        "env ONNXSERVE_TLS_CLIENT_CA)")
    p.add_argument("--auth-token-file", type=Path, default=_optional_path("AUTH_TOKEN_FILE"),
                   help="file holding a bearer token every RPC but health must carry as "
                        "'authorization: Bearer TOKEN' (env ONNXSERVE_AUTH_TOKEN_FILE)")
    p.add_argument("--workers", type=int, default=int(env("WORKERS", "1")),
                   help="server processes sharing the port (env ONNXSERVE_WORKERS; default "
                        "%(default)s)")
    p.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"),
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="(env ONNXSERVE_LOG_LEVEL; default %(default)s)")
    _add_keepalive(p)
    # Set by the parent of --workers N: the pipe on which a worker says it is ready.
    p.add_argument("--worker-ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    # Set by the parent of --workers N: which worker this is (in every log line).
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_run_serve)


def _ready_notifier(fd: int | None) -> Callable[[], None] | None:
    """For a worker of --workers N: tell the parent through ``fd`` that start-up is done."""
    if fd is None:
        return None

    def notify() -> None:
        from .workers import READY_MESSAGE

        with contextlib.suppress(OSError):  # parent gone: its death signal stops us anyway
            os.write(fd, READY_MESSAGE)

    return notify


def _run_serve(args: argparse.Namespace) -> int:
    from .auth import AuthError
    from .server import StartupError, serve

    try:
        settings = ServerSettings(
            model_repository=args.model_repository,
            grpc_host=args.grpc_host,
            grpc_port=args.grpc_port,
            providers=args.providers,
            max_message_bytes=args.max_message_bytes,
            intra_op_threads=args.intra_op_threads,
            cores=args.cores,
            spinning=args.spinning,
            warmup=args.warmup,
            model_control_mode=args.model_control_mode,
            repository_poll_secs=args.repository_poll_secs,
            load_models=tuple(args.load_model),
            model_name=args.model_name,
            drain_seconds=args.drain_seconds,
            max_queue_size=args.max_queue_size,
            metrics_port=args.metrics_port,
            log_format=args.log_format,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            auth_token_file=args.auth_token_file,
            log_level=args.log_level,
            grpc_keepalive_time_ms=args.grpc_keepalive_time,
            grpc_keepalive_timeout_ms=args.grpc_keepalive_timeout,
            grpc_keepalive_permit_without_calls=args.grpc_keepalive_permit_without_calls,
            grpc_http2_max_pings_without_data=args.grpc_http2_max_pings_without_data,
            grpc_http2_min_recv_ping_interval_without_data_ms=(
                args.grpc_http2_min_recv_ping_interval_without_data),
            grpc_http2_max_ping_strikes=args.grpc_http2_max_ping_strikes,
        )
    except ValueError as exc:
        print(f"onnxserve serve: {exc}", file=sys.stderr)
        return 2
    worker = (f"worker {args.worker_index}" if args.worker_index is not None
              else "supervisor" if args.workers > 1 else None)
    configure_logs(settings.log_level, settings.log_format, worker)
    if not settings.model_repository.is_dir():
        print(f"onnxserve serve: model repository {settings.model_repository} is not a folder "
              "(export a model first: onnxserve export lenet5)", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("onnxserve serve: --workers must be at least 1", file=sys.stderr)
        return 2
    from .workers import exit_on_stop_signals, run_workers

    if args.workers > 1:
        # Workers get this command's own arguments (and environment), so that no flag is
        # lost on the way; run_workers appends --workers 1, --cores, --metrics-port, which
        # win over the same flags earlier on the line.
        return run_workers(args.serve_argv, args.workers, args.cores, args.metrics_port)
    import asyncio

    try:
        asyncio.run(serve(settings, on_ready=_ready_notifier(args.worker_ready_fd)))
    except (AuthError, StartupError) as exc:
        print(f"onnxserve serve: {exc}", file=sys.stderr)
        return 2
    finally:
        exit_on_stop_signals()  # asyncio.run put Python's default handlers back
    return 0


def build_parser() -> argparse.ArgumentParser:
    from onnxserve.benchmarks.bench import add_bench_parser
    from onnxserve.export.cli import add_export_parser, add_samples_parser

    from .demo import add_demo_parser
    from .healthcheck import add_health_parser

    parser = argparse.ArgumentParser(
        prog="onnxserve", description="Export Keras CNNs to ONNX and serve them over gRPC."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_serve(subparsers)
    add_export_parser(subparsers)
    add_samples_parser(subparsers)
    add_demo_parser(subparsers)
    add_bench_parser(subparsers)
    add_health_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        # Before the heavy imports (grpc, onnxruntime: about a second): a stop from now on
        # exits 0 instead of killing the process (see serving/workers.py).
        from .workers import exit_on_stop_signals

        exit_on_stop_signals()
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        args.serve_argv = argv[1:]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
