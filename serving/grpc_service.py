"""The KServe V2 gRPC service: each RPC, and ModelInfer's path through the server.

ModelInfer: look the model up (registry), decode and check the request (decoding), decode
encoded images off the event loop (images), queue it for a batch (scheduler), and build the
answer (encoding). This is the only layer that speaks gRPC status codes; it knows nothing of
onnxruntime.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

import grpc
import numpy as np

from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos import inference_pb2_grpc
from onnxserve.protos.datatypes import by_config_type

from .decoding import classification_counts, decode_inputs, timeout_parameter
from .encoding import encode_response
from .errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InferenceFailedError,
    InvalidInputError,
    ModelLoadError,
    NotFoundError,
    ResourceExhaustedError,
    SchedulerClosedError,
    ServingError,
    UnavailableError,
)
from .images import EncodedImageInput, decode_batch
from .inflight import InFlight
from .logs import event
from .metrics import UNKNOWN_MODEL, Metrics
from .model import ModelVersion
from .registry import READY, Registry
from .validation import expected_shape

log = logging.getLogger(__name__)

SERVER_NAME = "onnxserve"
EXTENSIONS = ("classification", "model_configuration", "model_repository", "statistics")
#: trailing metadata key that carries a failed request's id
REQUEST_ID_METADATA = "request-id"

_STATUS = {
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    InferenceFailedError: grpc.StatusCode.INTERNAL,
    FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def _status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message a failure is answered with."""
    if isinstance(exc, ServingError):
        code = next((c for t, c in _STATUS.items() if isinstance(exc, t)),
                    grpc.StatusCode.INTERNAL)
        return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def _printable(text: str, limit: int = 128) -> str:
    """``text`` fit for logs and gRPC metadata: printable ASCII, at most ``limit`` characters."""
    if len(text) <= limit and text.isascii() and text.isprintable():
        return text
    return "".join(c if c.isascii() and c.isprintable() else "?" for c in text[:limit])


def _server_version() -> str:
    try:
        return package_version("onnxserve")
    except PackageNotFoundError:
        return "unknown"


def _duration(target: pb.StatisticDuration, source) -> None:
    target.count, target.ns = source.count, source.ns


def _statistics(name: str, version: ModelVersion) -> pb.ModelStatistics:
    stats = version.scheduler.stats
    out = pb.ModelStatistics(
        name=name, version=str(version.version), last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count, execution_count=stats.execution_count,
    )
    infer = out.inference_stats
    for field_name in ("success", "fail", "queue", "compute_input", "compute_infer",
                       "compute_output"):
        _duration(getattr(infer, field_name), getattr(stats, field_name))
    for size, batch in sorted(stats.batches.items()):
        entry = out.batch_stats.add(batch_size=size)
        for field_name in ("compute_input", "compute_infer", "compute_output"):
            _duration(getattr(entry, field_name), getattr(batch, field_name))
    return out


class InferenceService(inference_pb2_grpc.GRPCInferenceServiceServicer):
    """GRPCInferenceService over a model registry."""

    def __init__(self, registry: Registry, metrics: Metrics | None = None) -> None:
        self._registry = registry
        self._metrics = metrics
        self.accepting = True
        self._in_flight = InFlight()
        # Pillow releases the GIL while decoding: one thread per core decodes in parallel.
        self._image_pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                              thread_name_prefix="decode")

    async def drain(self, timeout: float) -> bool:
        """Refuse new inference requests and wait up to ``timeout`` s for the admitted ones."""
        self.accepting = False
        return await self._in_flight.wait_idle(timeout)

    async def _decode_images(
        self, inputs: dict[str, np.ndarray], images: EncodedImageInput
    ) -> dict[str, np.ndarray]:
        """Replace the encoded-image input by the decoded batch (off the event loop)."""
        loop = asyncio.get_running_loop()
        encoded = inputs.pop(images.name)
        inputs[images.target] = await loop.run_in_executor(
            self._image_pool, decode_batch, encoded, images
        )
        return inputs

    def close(self) -> None:
        self._image_pool.shutdown(wait=False, cancel_futures=True)

    async def _fail(self, context: grpc.aio.ServicerContext, exc: Exception, what: str) -> None:
        code, message = _status_of(exc)
        if isinstance(exc, ServingError):
            log.info("%s failed: %s %s", what, code.name, exc)
        else:
            log.error("%s failed unexpectedly", what, exc_info=exc)
        await context.abort(code, message)

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.accepting and self._registry.all_ready)

    async def ModelReady(self, request, context):
        try:
            self._registry.get(request.name, request.version)
        except ServingError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.accepting)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=_server_version(), extensions=EXTENSIONS
        )

    async def ModelMetadata(self, request, context):
        try:
            model, _ = self._registry.get(request.name, request.version)
        except ServingError as exc:
            await self._fail(context, exc, f"ModelMetadata {request.name!r}")
        config = model.config
        response = pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(v) for v in sorted(model.versions)],
            platform=config.platform,
        )
        for tensors, target in ((config.input, response.inputs), (config.output, response.outputs)):
            for tensor in tensors:
                target.add(
                    name=tensor.name,
                    datatype=by_config_type(tensor.data_type).name,
                    shape=expected_shape(tensor.dims, config.max_batch_size),
                )
        for key, value in model.parameters().items():
            response.parameters[key].string_param = value
        return response

    async def ModelConfig(self, request, context):
        try:
            model, _ = self._registry.get(request.name, request.version)
        except ServingError as exc:
            await self._fail(context, exc, f"ModelConfig {request.name!r}")
        return pb.ModelConfigResponse(config=model.config)

    async def ModelStatistics(self, request, context):
        response = pb.ModelStatisticsResponse()
        if request.name:
            try:
                model, version = self._registry.get(request.name, request.version)
            except ServingError as exc:
                await self._fail(context, exc, f"ModelStatistics {request.name!r}")
            chosen = [(model, version)] if request.version else [
                (model, v) for v in model.versions.values()]
        else:
            chosen = [(e.model, v) for e in self._registry.entries() if e.model
                      for v in e.model.versions.values()]
        for model, version in chosen:
            response.model_stats.append(_statistics(model.name, version))
        return response

    async def RepositoryIndex(self, request, context):
        response = pb.RepositoryIndexResponse()
        for entry in self._registry.index():
            if request.ready and entry.state != READY:
                continue
            versions = sorted(entry.model.versions) if entry.model else [None]
            for version in versions:
                response.models.add(
                    name=entry.name,
                    version="" if version is None else str(version),
                    state=entry.state,
                    reason=entry.reason,
                )
        return response

    async def RepositoryModelLoad(self, request, context):
        name = request.model_name
        try:
            self._registry.check_control()
            if request.parameters:
                raise InvalidInputError(
                    f"load parameters are not supported (got {', '.join(request.parameters)}); "
                    "change the model's files in the repository instead"
                )
            entry = await self._registry.load(name)
            if entry.reason:  # failed, or a failed reload that left the old model serving
                raise ModelLoadError(f"model {name!r}: {entry.reason}")
        except ModelLoadError as exc:
            await self._fail(context, InvalidInputError(str(exc)), f"load {name!r}")
        except ServingError as exc:
            await self._fail(context, exc, f"load {name!r}")
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        name = request.model_name
        try:
            self._registry.check_control()
            await self._registry.unload(name)
        except ServingError as exc:
            await self._fail(context, exc, f"unload {name!r}")
        return pb.RepositoryModelUnloadResponse()

    async def ModelInfer(self, request, context):
        self._in_flight.enter()
        try:
            return await self._infer(request, context)
        finally:
            self._in_flight.leave()

    async def _infer(self, request, context):
        started = time.perf_counter()
        request_id = _printable(request.id) or uuid.uuid4().hex
        name = request.model_name
        model_label = name if self._registry.knows(name) else UNKNOWN_MODEL
        version_label = ""
        try:
            if not self.accepting:
                raise UnavailableError("the server is shutting down")
            # A reload can retire the model between lookup and queueing only if this
            # handler awaits in between; then the lookup is repeated once, on the new model.
            for attempt in (1, 2):
                model, version = self._registry.get(name, request.model_version)
                version_label = str(version.version)
                inputs, batch_size = decode_inputs(request, model)
                if model.images is not None and model.images.name in inputs:
                    inputs = await self._decode_images(inputs, model.images)
                inputs = model.to_model_inputs(inputs, batch_size)
                names = model.rules.check_outputs([o.name for o in request.outputs])
                classification = classification_counts(request)
                # Batched models find the k best where the batch runs (on its device).
                top_k = classification if model.config.max_batch_size > 0 else {}
                try:
                    outputs = await version.scheduler.infer(
                        inputs, [n for n in names if n not in top_k], batch_size,
                        time_remaining=context.time_remaining(),
                        timeout_us=timeout_parameter(request), top_k=top_k)
                except SchedulerClosedError:
                    if attempt == 2:
                        raise
                    continue
                outputs = model.to_client_outputs(outputs)
                response = encode_response(
                    request, model, version.version, names, outputs, classification
                )
                response.id = request.id or request_id
                if self._metrics is not None:
                    self._metrics.observe_request(model_label, version_label, "OK",
                                                  time.perf_counter() - started)
                return response
        except Exception as exc:
            code, message = _status_of(exc)
            if self._metrics is not None:
                self._metrics.observe_request(model_label, version_label, code.name,
                                              time.perf_counter() - started)
            if code == grpc.StatusCode.INTERNAL and not isinstance(exc, ServingError):
                log.error("ModelInfer failed unexpectedly", exc_info=exc)
            event(log, logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.INFO,
                  "request_failed", model=name[:200], version=version_label,
                  status=code.name, request_id=request_id, reason=message)
            context.set_trailing_metadata(((REQUEST_ID_METADATA, request_id),))
            await context.abort(code, message)
