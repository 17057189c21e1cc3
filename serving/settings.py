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
