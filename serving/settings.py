"""Server settings, each declared once: its type, default, help, flag and environment name.

``ServerSettings`` is the one object `onnxserve serve` runs from (passed whole to the server
and to worker processes). Each field carries its help in its metadata; the flag
(``--field-name`` unless the metadata names Triton's), the ``ONNXSERVE_FLAG_NAME``
environment variable, the choices (from a ``Literal`` type) and the parsing are derived
from it by ``add_setting_arguments``. Flags win over environment variables, which win over
the defaults. The flag table in docs/serving.md is checked against the parser this module
builds (tests/unit/project/test_readme_flags.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

from onnxserve.protos.limits import MAX_MESSAGE_BYTES

Providers = Literal["auto", "cpu", "cuda"]
Spinning = Literal["off", "run", "always"]
ControlMode = Literal["none", "poll", "explicit"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
LogFormat = Literal["text", "json"]
EventLoop = Literal["asyncio", "uvloop"]
GrpcTransport = Literal["auto", "native", "python"]

SPINNING_MODES: tuple[str, ...] = typing.get_args(Spinning)

ENV_PREFIX = "ONNXSERVE_"
DEFAULT_GRPC_PORT = 8001
DEFAULT_HTTP_PORT = 8000
# Enough work to keep the instances busy, little enough that a refused client learns at once
# instead of timing out (benchmarks/results/defaults.md has the measurement).
DEFAULT_MAX_QUEUE_SIZE = 256

# Keepalive and the HTTP/2 ping policy: Triton's --grpc-keepalive-* / --grpc-http2-* flags,
# which set the gRPC core channel arguments of the same names. Triton keeps gRPC's server
# defaults (2 h, 20 s, pings refused on idle connections, 2, 5 min, 2 strikes): a client
# that pings more often than every 5 minutes while no data flows (tritonclient's
# KeepAliveOptions(keepalive_time_ms=1000, http2_max_pings_without_data=0), Go and Rust
# clients, cloud load balancers) is sent GOAWAY "too_many_pings" after 2 strikes, and the
# calls in flight on that connection fail UNAVAILABLE. onnxserve keeps the server's own
# keepalive at Triton's values and tolerates clients' pings instead (see each field).


def setting(default: Any, help: str, *, flag: str | None = None, metavar: str | None = None,
            default_text: str | None = None, env: bool = True) -> Any:
    """A settings field: its default and help, and where the flag's name or the shown
    default are not derived from the field, the ones to use."""
    return field(default=default, metadata={
        "help": help, "flag": flag, "metavar": metavar, "default_text": default_text,
        "env": env})


@dataclass(frozen=True)
class ServerSettings:
    """Everything `onnxserve serve` needs to run."""

    model_repository: Path = setting(Path("model_repository"), "model repository folder")
    grpc_host: str = setting("0.0.0.0", "address to listen on")
    grpc_port: int = setting(DEFAULT_GRPC_PORT, "gRPC port (Triton's)")
    grpc_transport: GrpcTransport = setting(
        "auto", "what carries gRPC calls: native (gRPC C++ in this process, built at install "
        "when libgrpc++-dev is found), python (grpcio), auto (native when built); the same "
        "Python code answers every call either way")
    http_port: int = setting(
        DEFAULT_HTTP_PORT, "HTTP/REST port (Triton's), on the same address, 0 = off")
    providers: Providers = setting(
        "auto", "execution provider: auto (CUDA when it really works, else the CPU, and a "
        "warning), cpu, or cuda (a model whose session does not run on CUDA fails to load)")
    max_message_bytes: int = setting(
        MAX_MESSAGE_BYTES, "largest gRPC message accepted or sent, and largest HTTP "
        "request body accepted (413 beyond it); gRPC's own default is 4 MB")
    intra_op_threads: int = setting(
        0, "onnxruntime threads per session, 0 = the cores split between a model's instances")
    cores: int = setting(
        0, "cores this server's onnxruntime sessions share, 0 = all (--workers N gives each "
        "worker its share)")
    spinning: Spinning | None = setting(
        None, "when onnxruntime's threads spin waiting for work: off, run (only while a batch "
        "runs), always", default_text="run, or off when a model's instances have more "
        "threads than there are cores (serving/runtime/plan.py)")
    warmup: bool = setting(True, "run warm-up batches on every instance before a model "
                           "reports ready")
    workers: int = setting(
        1, "server processes sharing the port (SO_REUSEPORT); each loads its own models; a "
        "worker that dies while serving is restarted (serving/workers.py)")
    model_control_mode: ControlMode = setting(
        "none", "none: load every model at start; poll: also rescan the repository and load, "
        "reload and unload what changed; explicit: load only --load-model models and what "
        "the load/unload RPCs ask for")
    strict_readiness: bool = setting(
        True, "report the server ready only while every model it is meant to serve is "
        "loaded; false: ready once the start-up loads ended, even with some or all models "
        "unavailable (Triton's flag, default true there too); true/false, 1/0",
        metavar="BOOL")
    repository_poll_secs: float = setting(15.0, "seconds between repository scans in poll "
                                                "mode")
    load_models: tuple[str, ...] = setting(
        (), "in explicit mode, a model to load at start ('*': all); repeatable; a name the "
        "repository does not hold stops the start", flag="--load-model", metavar="NAME",
        env=False)
    model_name: str | None = setting(
        None, "name of the model when the repository holds a single .onnx file at its root "
        "(KServe's single-file layout)", default_text="the repository folder's name")
    drain_seconds: float = setting(10.0, "seconds admitted requests get to finish at "
                                         "shutdown, unload or reload")
    max_queue_size: int = setting(
        DEFAULT_MAX_QUEUE_SIZE, "requests waiting per model version beyond which new ones get "
        "UNAVAILABLE (HTTP 503), as Triton answers; a config's max_queue_size wins; 0 = "
        "unbounded")
    trace_config: tuple[str, ...] = setting(
        (), "request tracing with OpenTelemetry, Triton's settings: level=TIMESTAMPS turns it "
        "on (default OFF), rate=N traces one request in N (1000), count=N at most N (-1: no "
        "limit), opentelemetry,url=URL the OTLP/HTTP endpoint (http://localhost:4318/v1/"
        "traces), opentelemetry,resource=KEY=VALUE, opentelemetry,bsp_max_queue_size|"
        "bsp_schedule_delay|bsp_max_export_batch_size=N; repeatable", flag="--trace-config",
        metavar="[MODE,]SETTING=VALUE", env=False)
    metrics_port: int = setting(8002, "Prometheus /metrics port, 0 = off; with --workers N, "
                                      "worker k uses port + k")
    stage_timing: bool = setting(
        False, "time each stage of every request and serve the totals as "
        "onnxserve_stage_seconds_total (two clock reads per stage; for profiling)")
    event_loop: EventLoop = setting(
        "asyncio", "the event loop the server runs on: asyncio (Python's own) or uvloop "
        "(needs the uvloop package: pip install 'onnxserve[uvloop]'; measured 9% more "
        "requests/s for a tiny model, benchmarks/results/defaults.md)")
    log_level: LogLevel = setting("INFO", "log level")
    log_format: LogFormat = setting(
        "text", "text (key=value events) or json (one object per line); with --workers N "
        "each line names its process")
    tls_cert: Path | None = setting(None, "PEM certificate chain: serve over TLS")
    tls_key: Path | None = setting(None, "PEM private key for --tls-cert")
    tls_client_ca: Path | None = setting(
        None, "PEM CA: clients must present a certificate it signed (mutual TLS)")
    auth_token_file: Path | None = setting(
        None, "file holding a bearer token every gRPC call and HTTP request but health "
        "checks must carry as 'authorization: Bearer TOKEN'")
    grpc_keepalive_time_ms: int = setting(
        7_200_000, "ms between the server's keepalive pings on a quiet connection (Triton's "
        "default)", flag="--grpc-keepalive-time", metavar="N")
    grpc_keepalive_timeout_ms: int = setting(
        20_000, "ms the server waits for a keepalive ping's acknowledgement before it closes "
        "the connection (Triton's default)", flag="--grpc-keepalive-timeout", metavar="N")
    # Triton: off, under which gRPC judges pings on an idle connection against a 2-hour
    # interval, so an idle client that pings every few seconds is disconnected within
    # three pings.
    grpc_keepalive_permit_without_calls: bool = setting(
        True, "accept keepalive pings on connections with no call in flight; true/false, "
        "1/0 (Triton: false)", metavar="BOOL")
    # Passed on as Triton does, though gRPC core's ping rate policy applies this limit to
    # clients only.
    grpc_http2_max_pings_without_data: int = setting(
        2, "pings the server may send while it sends no data, 0 = no limit (Triton's "
        "default)", metavar="N")
    # Half the most aggressive keepalive interval in common use (1 s), so that a 1 s
    # client's timing jitter never makes a strike; it only matters when strikes are limited.
    grpc_http2_min_recv_ping_interval_without_data_ms: int = setting(
        500, "ms below which a client's ping while no data flows counts as a strike "
        "(Triton: 300000)", flag="--grpc-http2-min-recv-ping-interval-without-data",
        metavar="N")
    # Never: a disconnected client loses its calls in flight, while a ping costs the
    # server one small acknowledgement (and gRPC bounds the acknowledgements queued for a
    # peer that does not read them). 2 restores gRPC's protection against ping floods.
    grpc_http2_max_ping_strikes: int = setting(
        0, "strikes after which the server closes the connection with GOAWAY "
        "too_many_pings, 0 = never (Triton: 2)", metavar="N")

    def __post_init__(self) -> None:
        for name, choices in _choices().items():
            value = getattr(self, name)
            if value is not None and value not in choices:
                raise ValueError(f"{flag_of(name)} must be one of {', '.join(choices)}, "
                                 f"not {value!r}")
        if self.repository_poll_secs <= 0:
            raise ValueError(
                f"repository poll interval must be > 0 seconds, not {self.repository_poll_secs}")
        if self.load_models and self.model_control_mode != "explicit":
            raise ValueError("--load-model needs --model-control-mode explicit")
        for name in ("grpc_port", "http_port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{flag_of(name)} must be 0-65535, not {getattr(self, name)}")
        for name in ("max_queue_size", "drain_seconds", "cores", "intra_op_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{flag_of(name)} must be >= 0, not {getattr(self, name)}")
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, not {self.workers}")
        if self.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
            raise ValueError("--event-loop uvloop needs the uvloop package, which is not "
                             "installed (pip install 'onnxserve[uvloop]')")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        if self.max_message_bytes < 4 * 1024 * 1024:
            raise ValueError(
                f"max message size must be at least 4 MiB, not {self.max_message_bytes} bytes"
            )
        for name, least in (("grpc_keepalive_time_ms", 1), ("grpc_keepalive_timeout_ms", 1),
                            ("grpc_http2_max_pings_without_data", 0),
                            ("grpc_http2_min_recv_ping_interval_without_data_ms", 0),
                            ("grpc_http2_max_ping_strikes", 0)):
            value = getattr(self, name)
            if not least <= value <= 2**31 - 1:  # gRPC channel arguments are C ints
                raise ValueError(f"{flag_of(name)} must be an integer from {least} to "
                                 f"2147483647, not {value}")


def flag_of(name: str) -> str:
    """The command-line flag of settings field ``name``."""
    meta = _fields()[name].metadata
    return meta["flag"] or "--" + name.replace("_", "-")


#: what each port setting serves, as the error for a port that cannot be bound names it
PORTS = {"grpc_port": "gRPC", "http_port": "HTTP", "metrics_port": "metrics"}


def port_unavailable(settings: ServerSettings, name: str, reason: str | OSError) -> str:
    """The one line, the same for every port, for port setting ``name`` (a key of PORTS)
    that cannot be bound on ``settings.grpc_host``: ``cannot listen for gRPC on
    0.0.0.0:8001: Address already in use (choose another port with --grpc-port)``."""
    if isinstance(reason, OSError):
        reason = os.strerror(reason.errno) if reason.errno else str(reason)
    advice = f"choose another port with {flag_of(name)}"
    if name != "grpc_port":
        advice += ", 0 = off"
    if "in use" not in reason:  # not this machine's address, a name that does not resolve
        advice = f"check {flag_of('grpc_host')}, or {advice}"
    return (f"cannot listen for {PORTS[name]} on {settings.grpc_host}:{getattr(settings, name)}"
            f": {reason} ({advice})")


def env_of(name: str) -> str | None:
    """The environment variable of settings field ``name`` (None: it has none)."""
    if not _fields()[name].metadata["env"]:
        return None
    return ENV_PREFIX + flag_of(name).removeprefix("--").replace("-", "_").upper()


def setting_env_names() -> list[str]:
    """Every environment variable a setting reads (``ONNXSERVE_*``)."""
    return [env for name in _fields() if (env := env_of(name)) is not None]


@cache
def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(ServerSettings)}


@cache
def _types() -> dict[str, Any]:
    return typing.get_type_hints(ServerSettings)


@cache
def _choices() -> dict[str, tuple[str, ...]]:
    out = {}
    for name, hint in _types().items():
        literal = _literal(hint)
        if literal is not None:
            out[name] = literal
    return out


def _literal(hint: Any) -> tuple[str, ...] | None:
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    if _optional(hint) is not hint:
        return _literal(_optional(hint))
    return None


def _optional(hint: Any) -> Any:
    """``X`` for ``X | None``, else the hint itself."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def parse_boolean(text: str) -> bool:
    """A flag or environment value read as Triton reads its booleans (true/false, 1/0, ...)."""
    value = text.strip().lower()
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false (or 1/0, on/off), not {text!r}")


def _converter(name: str) -> Callable[[str], Any]:
    hint = _optional(_types()[name])
    if _literal(hint) is not None or hint is str:
        return str
    if hint is bool:
        return parse_boolean
    if hint in (int, float, Path):
        return hint
    raise TypeError(f"settings field {name} has a type the command line cannot take: {hint}")


def _shown_default(name: str) -> str:
    meta = _fields()[name].metadata
    if meta["default_text"]:
        return meta["default_text"]
    default = _fields()[name].default
    if isinstance(default, bool):
        return "on" if default else "off"
    return "" if default is None else str(default)


def add_setting_arguments(parser: argparse.ArgumentParser,
                          names: Iterable[str] | None = None) -> None:
    """Add the flags of the settings ``names`` (default: all) to ``parser``; each flag's
    default is its environment variable's value when set, else the field's default."""
    for name in names or _fields():
        settings_field = _fields()[name]
        meta = settings_field.metadata
        hint = _types()[name]
        variable = env_of(name)
        suffix = [f"env {variable}"] if variable else []
        shown = _shown_default(name)
        if shown:
            suffix.append(f"default {shown}")
        help_text = meta["help"] + (f" ({'; '.join(suffix)})" if suffix else "")
        help_text = help_text.replace("%", "%%")
        flag = flag_of(name)
        if typing.get_origin(hint) is tuple:
            parser.add_argument(flag, dest=name, action="append", default=[],
                                metavar=meta["metavar"], help=help_text)
            continue
        raw = os.environ.get(variable) if variable else None
        convert = _converter(name)
        default = settings_field.default if not raw else raw
        if hint is bool and meta["metavar"] is None:
            # --warmup / --no-warmup; the environment takes true/false too
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=parse_boolean(raw) if raw else settings_field.default,
                                help=help_text)
            continue
        # Triton's booleans take a value, and mean true without one
        optional_value: dict[str, Any] = {"nargs": "?", "const": True} if hint is bool else {}
        parser.add_argument(
            flag, dest=name, type=convert, default=default, metavar=meta["metavar"],
            choices=_choices().get(name), help=help_text, **optional_value)


def add_repository_argument(parser: argparse.ArgumentParser) -> None:
    """The --model-repository flag the subcommands share (env ONNXSERVE_MODEL_REPOSITORY)."""
    add_setting_arguments(parser, ["model_repository"])


def settings_from_arguments(args: argparse.Namespace) -> ServerSettings:
    """The ServerSettings the parsed flags (from add_setting_arguments) say.

    Raises:
        ValueError: a value ServerSettings refuses, naming the flag.
    """
    values: dict[str, Any] = {}
    for name in _fields():
        value = getattr(args, name)
        values[name] = tuple(value) if isinstance(value, list) else value
    return ServerSettings(**values)
