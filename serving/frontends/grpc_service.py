"""The KServe V2 gRPC service: a thin adapter over the data plane.

Each RPC turns its message into a data-plane call (serving/dataplane.py) and the result
back into a message; ``_answers`` maps every failure to a gRPC status in one place. This is
the only module that speaks gRPC status codes; it knows nothing of onnxruntime or batching.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos import inference_pb2_grpc
from onnxserve.serving.dataplane import DataPlane
from onnxserve.serving.errors import ServingError, error_code
from onnxserve.serving.frontends.decoding import infer_request
from onnxserve.serving.frontends.encoding import encode_response
from onnxserve.serving.observability import stages
from onnxserve.serving.observability.stages import CLOCK
from onnxserve.serving.observability.statistics import ModelStats

log = logging.getLogger(__name__)

#: trailing metadata key that carries a failed request's id
REQUEST_ID_METADATA = "request-id"

Response = TypeVar("Response")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Response]]


def _answers(handler: Handler | None = None, *, logged: bool = True) -> Any:
    """Answer a handler's failures with their gRPC status: a ServingError's canonical code
    and message, anything else INTERNAL (logged, since it is a bug). ``logged=False`` for
    handlers whose failures the data plane logs itself."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def answer(self, request, context: grpc.aio.ServicerContext):
            try:
                return await handler(self, request, context)
            except Exception as exc:
                if isinstance(exc, ServingError):
                    message = str(exc)
                    if logged:
                        log.info("%s failed: %s %s", handler.__name__, exc.code, message)
                else:
                    message = f"internal error: {type(exc).__name__}: {exc}"
                    if logged:
                        log.error("%s failed unexpectedly", handler.__name__, exc_info=exc)
                await context.abort(grpc.StatusCode[error_code(exc)], message)

        return answer

    return wrap(handler) if handler is not None else wrap


def _duration(target: pb.StatisticDuration, source) -> None:
    target.count, target.ns = source.count, source.ns


def _statistics(name: str, version: int, stats: ModelStats) -> pb.ModelStatistics:
    out = pb.ModelStatistics(
        name=name, version=str(version), last_inference=stats.last_inference_ms,
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
    """GRPCInferenceService over a data plane."""

    def __init__(self, dataplane: DataPlane) -> None:
        self._plane = dataplane

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self._plane.live())

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._plane.ready())

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self._plane.model_ready(request.name,
                                                                   request.version))

    async def ServerMetadata(self, request, context):
        meta = self._plane.server_metadata()
        return pb.ServerMetadataResponse(name=meta.name, version=meta.version,
                                         extensions=meta.extensions)

    @_answers
    async def ModelMetadata(self, request, context):
        meta = self._plane.model_metadata(request.name, request.version)
        response = pb.ModelMetadataResponse(name=meta.name, versions=meta.versions,
                                            platform=meta.platform)
        for tensors, target in ((meta.inputs, response.inputs),
                                (meta.outputs, response.outputs)):
            for tensor in tensors:
                target.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        for key, value in meta.parameters.items():
            response.parameters[key].string_param = value
        return response

    @_answers
    async def ModelConfig(self, request, context):
        return pb.ModelConfigResponse(
            config=self._plane.model_config(request.name, request.version))

    @_answers
    async def ModelStatistics(self, request, context):
        response = pb.ModelStatisticsResponse()
        for name, version in self._plane.statistics(request.name, request.version):
            response.model_stats.append(
                _statistics(name, version.version, version.scheduler.stats))
        return response

    @_answers
    async def RepositoryIndex(self, request, context):
        response = pb.RepositoryIndexResponse()
        for row in self._plane.repository_index(request.ready):
            response.models.add(name=row.name, version=row.version, state=row.state,
                                reason=row.reason)
        return response

    @_answers
    async def RepositoryModelLoad(self, request, context):
        await self._plane.load(request.model_name, list(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @_answers
    async def RepositoryModelUnload(self, request, context):
        await self._plane.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    @_answers(logged=False)
    async def ModelInfer(self, request, context):
        timed = CLOCK.enabled
        if timed:
            started = time.perf_counter_ns()
        plain = infer_request(request, context.time_remaining())
        if timed:
            CLOCK.add(stages.BUILD, started)
        try:
            result = await self._plane.infer(plain)
        except Exception:
            context.set_trailing_metadata(((REQUEST_ID_METADATA, plain.id),))
            raise
        if not timed:
            return encode_response(result, request.id or result.id)
        encoding = time.perf_counter_ns()
        response = encode_response(result, request.id or result.id)
        CLOCK.add(stages.ENCODE, encoding)
        CLOCK.add(stages.HANDLER, started)
        return response
