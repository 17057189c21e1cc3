"""A small synchronous client for onnxserve (or any KServe V2 gRPC server)."""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos import inference_pb2_grpc, model_config_pb2
from onnxserve.protos.codec import decode_contents, decode_raw, encode_contents, encode_raw
from onnxserve.protos.datatypes import TensorSpec, by_name, by_numpy
from onnxserve.protos.limits import MAX_MESSAGE_BYTES

from .connection import DEFAULT_URL, clean_token, normalize_url, pem_bytes

__all__ = ["DEFAULT_URL", "Client", "InferenceServerError", "ModelMetadata", "TensorInfo"]
#: Retries of calls that failed with UNAVAILABLE (server gone or draining, or a model's
#: queue full), with gRPC's jittered exponential backoff. Every inference call is
#: idempotent, so all are retried.
RETRY_ATTEMPTS = 5


def service_config(retry_attempts: int = RETRY_ATTEMPTS) -> str:
    """gRPC service config: round-robin over all addresses, retries on UNAVAILABLE."""
    config: dict = {"loadBalancingConfig": [{"round_robin": {}}]}
    if retry_attempts > 1:
        config["methodConfig"] = [{
            "name": [{"service": "inference.GRPCInferenceService"}],
            "retryPolicy": {
                "maxAttempts": retry_attempts,
                "initialBackoff": "0.05s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }]
    return json.dumps(config)


def channel_target(url: str | Sequence[str]) -> str:
    """One gRPC target for one address, a DNS name, or several IP:port addresses.

    Each address is normalised first (``connection.normalize_url``: a missing port is 8001,
    ``grpc://`` is dropped). Several addresses become an ``ipv4:`` / ``ipv6:`` target list,
    which the round-robin policy spreads calls over; for host names, give one
    ``dns:///name:port`` that resolves to all the servers.
    """
    if isinstance(url, str):
        return normalize_url(url)[0]
    targets = [normalize_url(u)[0] for u in url]
    if not targets:
        raise ValueError("no server address given")
    if len(targets) == 1:
        return targets[0]
    families = set()
    for target in targets:
        host = target.rsplit(":", 1)[0].strip("[]")
        try:
            families.add(ipaddress.ip_address(host).version)
        except ValueError:
            raise ValueError(
                f"{target!r}: several addresses must be IP:port; for host names use one "
                "dns:///NAME:PORT target that resolves to every server") from None
    if len(families) > 1:
        raise ValueError("several addresses must all be IPv4 or all IPv6")
    return f"ipv{families.pop()}:" + ",".join(targets)


class InferenceServerError(Exception):
    """The server answered with an error status (or could not be reached)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


#: a model input or output as its metadata describes it
TensorInfo = TensorSpec


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    parameters: dict[str, object] = field(default_factory=dict)


def _parameter(param: pb.InferParameter) -> object:
    choice = param.WhichOneof("parameter_choice")
    return getattr(param, choice) if choice else None


class Client:
    """``Client("localhost:8001")``: health, metadata and inference over gRPC."""

    def __init__(
        self,
        url: str | Sequence[str] = DEFAULT_URL,
        timeout: float = 60.0,
        *,
        retry_attempts: int = RETRY_ATTEMPTS,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | str | Path | None = None,
        private_key: bytes | str | Path | None = None,
        certificate_chain: bytes | str | Path | None = None,
        ssl_target_name: str | None = None,
    ) -> None:
        """``url`` is one address (``HOST:PORT``; no port means 8001; ``grpcs://`` means
        TLS), a ``dns:///name:port`` target, or a list of IP:port addresses; calls are
        spread round-robin over every address and retried on UNAVAILABLE up to
        ``retry_attempts`` times. ``token`` is sent as ``authorization: Bearer`` (surrounding
        whitespace, such as a token file's newline, removed). ``tls`` (implied by any of the
        certificate arguments) connects over TLS, verifying the server against
        ``root_certificates`` (default: the system's CAs) and presenting ``private_key`` and
        ``certificate_chain`` when the server asks for a client certificate; each is PEM
        bytes or the path of a PEM file, as tritonclient takes them. ``ssl_target_name`` is
        the name the server's certificate must carry when ``url`` uses another.

        Raises:
            ConnectionSettingsError: a malformed address or token, or an unreadable file.
        """
        if isinstance(url, str) and normalize_url(url)[1]:
            tls = True
        self.url = channel_target(url)
        self.timeout = timeout
        self.tls = bool(tls or root_certificates or private_key or certificate_chain)
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.service_config", service_config(retry_attempts)),
            ("grpc.enable_retries", 1 if retry_attempts > 1 else 0),
        ]
        if ssl_target_name:
            options.append(("grpc.ssl_target_name_override", ssl_target_name))
        if self.tls:
            credentials = grpc.ssl_channel_credentials(
                pem_bytes(root_certificates, "root_certificates"),
                pem_bytes(private_key, "private_key"),
                pem_bytes(certificate_chain, "certificate_chain"))
            self._channel = grpc.secure_channel(self.url, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(self.url, options=options)
        self._metadata = ((("authorization", f"Bearer {clean_token(token)}"),)
                          if token is not None else None)
        self._stub = inference_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: str, request):
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout,
                                               metadata=self._metadata)
        except grpc.RpcError as exc:
            raise InferenceServerError(exc.code(), exc.details() or "") from None

    def is_server_live(self) -> bool:
        return self._call("ServerLive", pb.ServerLiveRequest()).live

    def is_server_ready(self) -> bool:
        return self._call("ServerReady", pb.ServerReadyRequest()).ready

    def wait_until_ready(self, timeout: float, alive=None, poll_s: float = 0.2) -> None:
        """Poll until the server is ready. Raises RuntimeError at once when ``alive()``
        (e.g. a server process's check) turns false or a model's load has failed (no model
        is loading any more and one is not READY: its reason is in the message), and when
        ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise RuntimeError("the server exited before it was ready")
            try:
                if self.is_server_ready():
                    return
                index = self.models()
            except InferenceServerError:
                index = []  # not listening yet
            failed = [f"{m['name']}: {m['reason'] or m['state'] or 'not loaded'}"
                      for m in index if m["state"] != "READY"]
            # every model READY but the server not yet: it is about to say so
            if failed and all(m["state"] != "LOADING" for m in index):
                raise RuntimeError("models failed to load: " + "; ".join(failed))
            time.sleep(poll_s)
        raise RuntimeError(f"the server was not ready after {timeout:.0f} s")

    def is_model_ready(self, name: str, version: str = "") -> bool:
        return self._call("ModelReady", pb.ModelReadyRequest(name=name, version=version)).ready

    def server_metadata(self) -> dict[str, object]:
        r = self._call("ServerMetadata", pb.ServerMetadataRequest())
        return {"name": r.name, "version": r.version, "extensions": list(r.extensions)}

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        r = self._call("ModelMetadata", pb.ModelMetadataRequest(name=name, version=version))

        def info(tensors) -> tuple[TensorInfo, ...]:
            return tuple(TensorInfo(t.name, t.datatype, tuple(t.shape)) for t in tensors)

        return ModelMetadata(
            name=r.name,
            versions=tuple(r.versions),
            platform=r.platform,
            inputs=info(r.inputs),
            outputs=info(r.outputs),
            parameters={k: _parameter(v) for k, v in r.parameters.items()},
        )

    def model_config(self, name: str, version: str = "") -> model_config_pb2.ModelConfig:
        """The model's complete configuration (Triton's ModelConfig, as the server serves
        it: ``max_batch_size``, inputs, outputs, batching, parameters)."""
        return self._call("ModelConfig",
                          pb.ModelConfigRequest(name=name, version=version)).config

    def statistics(self, name: str = "", version: str = "") -> list[dict[str, object]]:
        """Per model version: counts and cumulative durations (ns) as the server reports."""
        r = self._call("ModelStatistics", pb.ModelStatisticsRequest(name=name, version=version))
        out = []
        for s in r.model_stats:
            infer = s.inference_stats
            out.append({
                "name": s.name, "version": s.version, "inference_count": s.inference_count,
                "execution_count": s.execution_count,
                **{f: {"count": getattr(infer, f).count, "ns": getattr(infer, f).ns}
                   for f in ("success", "fail", "queue", "compute_input", "compute_infer",
                             "compute_output")},
                "batches": {b.batch_size: b.compute_infer.count for b in s.batch_stats},
            })
        return out

    def models(self) -> list[dict[str, str]]:
        """The repository index: name, version, state and reason of each model."""
        r = self._call("RepositoryIndex", pb.RepositoryIndexRequest())
        return [
            {"name": m.name, "version": m.version, "state": m.state, "reason": m.reason}
            for m in r.models
        ]

    def load_model(self, name: str) -> None:
        """Load or reload a model (the server must run with --model-control-mode explicit)."""
        self._call("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name=name))

    def unload_model(self, name: str) -> None:
        """Unload a model; requests already admitted finish first."""
        self._call("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=name))

    def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        outputs: list[str] | None = None,
        *,
        version: str = "",
        classification: int | None = None,
        request_id: str = "",
        raw: bool = True,
    ) -> dict[str, np.ndarray]:
        """Run inference; returns each output as an array (BYTES as an object array).

        ``classification=k`` asks for the top-k classes of each requested output as
        "score:index:label" strings (the requested outputs must then be named).
        ``raw=False`` sends typed contents instead of raw bytes.
        """
        request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
        for name, value in inputs.items():
            array = np.asarray(value)
            datatype = by_numpy(array.dtype)
            tensor = request.inputs.add(name=name, datatype=datatype.name, shape=array.shape)
            if raw:
                request.raw_input_contents.append(encode_raw(array, datatype))
            else:
                tensor.contents.CopyFrom(encode_contents(array, datatype))
        for name in outputs or ():
            requested = request.outputs.add(name=name)
            if classification is not None:
                requested.parameters["classification"].int64_param = classification
        response = self._call("ModelInfer", request)
        results: dict[str, np.ndarray] = {}
        for i, tensor in enumerate(response.outputs):
            datatype = by_name(tensor.datatype)
            if i < len(response.raw_output_contents):
                results[tensor.name] = decode_raw(
                    response.raw_output_contents[i], datatype, tuple(tensor.shape)
                )
            else:
                results[tensor.name] = decode_contents(
                    tensor.contents, datatype, tuple(tensor.shape)
                )
        return results
