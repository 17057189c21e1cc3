"""Server settings: command-line flags, then ONNXSERVE_* environment variables, then defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROVIDER_MODES = ("auto", "cpu", "cuda")
SPINNING_MODES = ("off", "run", "always")
CONTROL_MODES = ("none", "poll", "explicit")

DEFAULT_MODEL_REPOSITORY = Path("model_repository")
DEFAULT_GRPC_PORT = 8001
# A batch of 64 float 331x331x3 images (the largest seed input) is 84 MB; gRPC's
# default of 4 MB does not take even one 224x224x3 float batch of 8.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# About 1.4 s of LeNet-5 or MobileNetV2 batches of 32 on 2 cores: enough to keep the
# instances busy, small enough that a refused client learns at once instead of timing out.
DEFAULT_MAX_QUEUE_SIZE = 256

# Keepalive and the HTTP/2 ping policy: Triton's --grpc-keepalive-* / --grpc-http2-* flags,
# which set the gRPC core channel arguments of the same names. Triton keeps gRPC's server
# defaults (2 h, 20 s, pings refused on idle connections, 2, 5 min, 2 strikes): a client
# that pings more often than every 5 minutes while no data flows (tritonclient's
# KeepAliveOptions(keepalive_time_ms=1000, http2_max_pings_without_data=0), Go and Rust
# clients, cloud load balancers) is sent GOAWAY "too_many_pings" after 2 strikes, and the
# calls in flight on that connection fail UNAVAILABLE. onnxserve keeps the server's own
# keepalive at Triton's values and tolerates clients' pings instead:
#: ms between the server's own keepalive pings on a quiet connection (Triton: 7200000)
DEFAULT_KEEPALIVE_TIME_MS = 7_200_000
#: ms the server waits for a keepalive ping's acknowledgement before closing (Triton: 20000)
DEFAULT_KEEPALIVE_TIMEOUT_MS = 20_000
#: accept (and send) keepalive pings on connections with no call in flight. Triton: off,
#: under which gRPC judges pings on an idle connection against a 2-hour interval, so an
#: idle client that pings every few seconds is disconnected within three pings
DEFAULT_KEEPALIVE_PERMIT_WITHOUT_CALLS = True
#: pings the server may send while it sends no data (Triton: 2; passed on as Triton does,
#: though gRPC core's ping rate policy applies this limit to clients only)
DEFAULT_HTTP2_MAX_PINGS_WITHOUT_DATA = 2
#: ms below which a client's ping, while no data flows, counts as a strike (Triton: 300000).
#: Half the most aggressive keepalive interval in common use (1 s), so that a 1 s client's
#: timing jitter never makes a strike; it only matters when strikes are limited (below)
DEFAULT_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS = 500
#: strikes after which the server sends GOAWAY "too_many_pings"; 0 = never (Triton: 2).
#: Never: a disconnected client loses its calls in flight, while a ping costs the server
#: one small acknowledgement (and gRPC bounds the acknowledgements queued for a peer that
#: does not read them). Set 2 to restore gRPC's protection against ping floods
DEFAULT_HTTP2_MAX_PING_STRIKES = 0


def env(name: str, default: str) -> str:
    """The value of ONNXSERVE_<NAME>, or ``default`` when it is unset or empty."""
    return os.environ.get(f"ONNXSERVE_{name}") or default


@dataclass(frozen=True)
class ServerSettings:
    """Everything `onnxserve serve` needs to run."""

    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    grpc_host: str = "0.0.0.0"
    grpc_port: int = DEFAULT_GRPC_PORT
    providers: str = "auto"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: onnxruntime intra-op threads per session; 0 splits ``cores`` between a model's instances
    intra_op_threads: int = 0
    #: cores this process's sessions may use; 0 = all of the machine's
    cores: int = 0
    #: when onnxruntime's pool threads spin waiting for work: "off", "run" (only during a
    #: run), "always"; None picks per model (see serving/execution.py)
    spinning: str | None = None
    #: run warm-up batches before a model reports ready
    warmup: bool = True
    log_level: str = "INFO"
    #: Triton's model control modes: none, poll, explicit (see serving/registry.py)
    model_control_mode: str = "none"
    repository_poll_secs: float = 15.0
    #: models loaded at start in explicit mode ("*": all)
    load_models: tuple[str, ...] = ()
    #: the name of the model of a single-file repository (KServe's layout: one .onnx file
    #: at the root); None names it after the repository folder
    model_name: str | None = None
    #: seconds admitted requests get to finish at shutdown, unload or reload
    drain_seconds: float = 10.0
    #: queued requests per model version beyond which new ones are refused (a config's
    #: max_queue_size wins; 0 = unbounded)
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE
    #: Prometheus /metrics port (0 = off)
    metrics_port: int = 8002
    log_format: str = "text"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: with TLS: clients must present a certificate signed by this CA (mutual TLS)
    tls_client_ca: Path | None = None
    auth_token_file: Path | None = None
    #: keepalive and HTTP/2 ping policy, see the DEFAULT_* constants above (ms where timed)
    grpc_keepalive_time_ms: int = DEFAULT_KEEPALIVE_TIME_MS
    grpc_keepalive_timeout_ms: int = DEFAULT_KEEPALIVE_TIMEOUT_MS
    grpc_keepalive_permit_without_calls: bool = DEFAULT_KEEPALIVE_PERMIT_WITHOUT_CALLS
    grpc_http2_max_pings_without_data: int = DEFAULT_HTTP2_MAX_PINGS_WITHOUT_DATA
    grpc_http2_min_recv_ping_interval_without_data_ms: int = (
        DEFAULT_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS)
    grpc_http2_max_ping_strikes: int = DEFAULT_HTTP2_MAX_PING_STRIKES

    def __post_init__(self) -> None:
        if self.providers not in PROVIDER_MODES:
            raise ValueError(
                f"providers must be one of {', '.join(PROVIDER_MODES)}, not {self.providers!r}"
            )
        if self.spinning is not None and self.spinning not in SPINNING_MODES:
            raise ValueError(
                f"spinning must be one of {', '.join(SPINNING_MODES)}, not {self.spinning!r}"
            )
        if self.model_control_mode not in CONTROL_MODES:
            raise ValueError(f"model control mode must be one of {', '.join(CONTROL_MODES)}, "
                             f"not {self.model_control_mode!r}")
        if self.repository_poll_secs <= 0:
            raise ValueError(
                f"repository poll interval must be > 0 seconds, not {self.repository_poll_secs}")
        if self.load_models and self.model_control_mode != "explicit":
            raise ValueError("--load-model needs --model-control-mode explicit")
        if self.max_queue_size < 0:
            raise ValueError(f"max queue size must be >= 0, not {self.max_queue_size}")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics port must be 0-65535, not {self.metrics_port}")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log format must be text or json, not {self.log_format!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        if self.drain_seconds < 0:
            raise ValueError(f"drain seconds must be >= 0, not {self.drain_seconds}")
        if not 0 <= self.grpc_port <= 65535:
            raise ValueError(f"grpc port must be 0-65535, not {self.grpc_port}")
        if self.max_message_bytes < 4 * 1024 * 1024:
            raise ValueError(
                f"max message size must be at least 4 MiB, not {self.max_message_bytes} bytes"
            )
        if self.cores < 0:
            raise ValueError(f"cores must be >= 0, not {self.cores}")
        if self.intra_op_threads < 0:
            raise ValueError(f"intra-op threads must be >= 0, not {self.intra_op_threads}")
        for flag, value, least in (
                ("--grpc-keepalive-time", self.grpc_keepalive_time_ms, 1),
                ("--grpc-keepalive-timeout", self.grpc_keepalive_timeout_ms, 1),
                ("--grpc-http2-max-pings-without-data", self.grpc_http2_max_pings_without_data,
                 0),
                ("--grpc-http2-min-recv-ping-interval-without-data",
                 self.grpc_http2_min_recv_ping_interval_without_data_ms, 0),
                ("--grpc-http2-max-ping-strikes", self.grpc_http2_max_ping_strikes, 0)):
            if not least <= value <= 2**31 - 1:  # gRPC channel arguments are C ints
                raise ValueError(f"{flag} must be an integer from {least} to 2147483647, "
                                 f"not {value}")
