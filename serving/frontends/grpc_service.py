"""The KServe V2 gRPC service: a thin adapter over the data plane.

Each RPC turns its message into a data-plane call (serving/dataplane.py) and the result
back into a message; ``_answers`` maps every failure to a gRPC status in one place. This is
the only module that speaks gRPC status codes; it knows nothing of onnxruntime or batching.

ModelStreamInfer runs each request of a stream as ModelInfer runs one (``_build`` and
``_infer``, through the same data plane and batches), several at once, and writes each
answer when it is ready: answers may overtake each other and carry their request's id.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos import inference_pb2_grpc
from onnxserve.serving.contract import OTHERS_IN_PROGRESS, InferRequest, InferResult
from onnxserve.serving.dataplane import DataPlane
from onnxserve.serving.errors import ResourceExhaustedError, ServingError, error_code
from onnxserve.serving.frontends.decoding import infer_request
from onnxserve.serving.frontends.encoding import encode_response
from onnxserve.serving.observability import stages
from onnxserve.serving.observability.stages import CLOCK
from onnxserve.serving.observability.statistics import StatisticDuration, VersionStatistics
from onnxserve.serving.observability.tracing import trace_context
from onnxserve.serving.shared_memory import cuda_shared_memory_unsupported

log = logging.getLogger(__name__)

#: trailing metadata key that carries a failed request's id
REQUEST_ID_METADATA = "request-id"
#: Requests of one ModelStreamInfer stream read and not yet answered (running, or waiting
#: for their answer to be written) beyond which the stream's next request is not read, so
#: a client that sends faster than the server answers, or than it reads the answers, is
#: held back by gRPC's flow control instead of filling the server's memory. 64: one
#: stream of single-sample requests can fill a batch of the exporter's largest
#: max_batch_size (64) while the server holds at most 64 decoded requests per stream.
STREAM_WINDOW = 64
#: the name of each streamed request's task (tests look for leftovers by it)
STREAM_TASK_NAME = "ModelStreamInfer request"
#: Triton's request parameter asking for the final-response flag on streamed answers, and
#: the response parameter carrying it (every answer here is its request's last)
FINAL_RESPONSE_PARAMETER = "triton_enable_empty_final_response"
FINAL_RESPONSE_FLAG = "triton_final_response"

Response = TypeVar("Response")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Response]]


def _failure_message(exc: Exception) -> str:
    """What the client is told of a failure: a ServingError's message, else INTERNAL's."""
    if isinstance(exc, ServingError):
        return str(exc)
    return f"internal error: {type(exc).__name__}: {exc}"


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
                message = _failure_message(exc)
                if logged and isinstance(exc, ServingError):
                    log.info("%s failed: %s %s", handler.__name__, exc.code, message)
                elif logged:
                    log.error("%s failed unexpectedly", handler.__name__, exc_info=exc)
                code = grpc.StatusCode[error_code(exc)]
                try:
                    await context.abort(code, message)
                except grpc.aio.AbortError:
                    raise
                except Exception:
                    # The call ended before its status could be sent: gRPC answered its
                    # deadline itself, or its client left (grpcio then fails the send with
                    # ExecuteBatchError, and would log it with a traceback). No one is left
                    # to answer; end the handler as cancelled.
                    raise asyncio.CancelledError() from None

        return answer

    return wrap(handler) if handler is not None else wrap


def _build(request: pb.ModelInferRequest, context: grpc.aio.ServicerContext,
           tracing: bool) -> tuple[InferRequest, int]:
    """The data plane's request for ``request`` (with the call's deadline, and its trace
    context while ``tracing``), and when stage timing is on the clock reading the
    handler's time counts from (0 when off)."""
    started = time.perf_counter_ns() if CLOCK.enabled else 0
    plain = infer_request(request, context.time_remaining())
    if tracing:
        plain.trace_context = trace_context(context.invocation_metadata)
    if started:
        CLOCK.add(stages.BUILD, started)
    return plain, started


def _duration(target: pb.StatisticDuration, source: StatisticDuration) -> None:
    target.count, target.ns = source.count, source.ns


def _statistics(stats: VersionStatistics) -> pb.ModelStatistics:
    out = pb.ModelStatistics(
        name=stats.name, version=stats.version, last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count, execution_count=stats.execution_count,
    )
    infer = out.inference_stats
    for field_name in ("success", "fail", "queue", "compute_input", "compute_infer",
                       "compute_output"):
        _duration(getattr(infer, field_name), getattr(stats, field_name))
    for batch in stats.batches:
        entry = out.batch_stats.add(batch_size=batch.batch_size)
        for field_name in ("compute_input", "compute_infer", "compute_output"):
            _duration(getattr(entry, field_name), getattr(batch, field_name))
    return out


class InferenceService(inference_pb2_grpc.GRPCInferenceServiceServicer):
    """GRPCInferenceService over a data plane."""

    def __init__(self, dataplane: DataPlane, stream_window: int = STREAM_WINDOW,
                 max_message_bytes: int | None = None) -> None:
        self._plane = dataplane
        #: requests of one ModelStreamInfer stream pending at most (STREAM_WINDOW)
        self.stream_window = stream_window
        #: the largest message the server sends (its grpc.max_send_message_length): a
        #: larger answer fails RESOURCE_EXHAUSTED here, counted and logged as such, not in
        #: gRPC after the request was counted OK (None: not checked)
        self.max_message_bytes = max_message_bytes

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
        for stats in self._plane.statistics(request.name, request.version):
            response.model_stats.append(_statistics(stats))
        return response

    @_answers
    async def RepositoryIndex(self, request, context):
        response = pb.RepositoryIndexResponse()
        for row in self._plane.repository.index(request.ready):
            response.models.add(name=row.name, version=row.version, state=row.state,
                                reason=row.reason)
        return response

    @_answers
    async def RepositoryModelLoad(self, request, context):
        await self._plane.repository.load(request.model_name, list(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @_answers
    async def RepositoryModelUnload(self, request, context):
        await self._plane.repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    @_answers
    async def SystemSharedMemoryRegister(self, request, context):
        self._plane.shared_memory.register(request.name, request.key, request.offset,
                                           request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @_answers
    async def SystemSharedMemoryUnregister(self, request, context):
        self._plane.shared_memory.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    @_answers
    async def SystemSharedMemoryStatus(self, request, context):
        response = pb.SystemSharedMemoryStatusResponse()
        for region in self._plane.shared_memory.status(request.name):
            entry = response.regions[region.name]
            entry.name, entry.key = region.name, region.key
            entry.offset, entry.byte_size = region.offset, region.byte_size
        return response

    @_answers
    async def CudaSharedMemoryRegister(self, request, context):
        cuda_shared_memory_unsupported()

    @_answers
    async def CudaSharedMemoryUnregister(self, request, context):
        cuda_shared_memory_unsupported()

    @_answers
    async def CudaSharedMemoryStatus(self, request, context):
        cuda_shared_memory_unsupported()

    async def _infer(self, request: pb.ModelInferRequest, plain: InferRequest, started: int,
                     response: pb.ModelInferResponse | None = None,
                     sent: Message | None = None) -> pb.ModelInferResponse:
        """Run ``plain`` (``_build``'s, from ``request``) and encode its answer, into
        ``response`` when given: ModelInfer's path, and each streamed request's. ``sent``
        is the message that carries the answer (a stream's ModelStreamInferResponse; by
        default the answer itself), whose size must be within ``max_message_bytes``.

        Raises:
            ResourceExhaustedError: the answer is larger than ``max_message_bytes``.
            What the data plane raises.
        """

        def answer(result: InferResult) -> pb.ModelInferResponse:
            encoding = time.perf_counter_ns() if started else 0
            encoded = encode_response(result, request.id or result.id, response)
            if started:
                CLOCK.add(stages.ENCODE, encoding)
                CLOCK.add(stages.HANDLER, started)
            self._check_size(encoded if sent is None else sent)
            return encoded

        return await self._plane.infer(plain, answer)

    def _check_size(self, message: Message) -> None:
        """Refuse an answer gRPC would not send (its max_send_message_length)."""
        limit = self.max_message_bytes
        if limit is None:
            return
        size = message.ByteSize()
        if size > limit:
            raise ResourceExhaustedError(
                f"the answer is {size} bytes, over the limit of {limit} bytes "
                "(--max-message-bytes); ask for fewer outputs or a smaller batch, or raise "
                "the limit on the server and the client")

    @_answers(logged=False)
    async def ModelInfer(self, request, context):
        plain, started = _build(request, context, self._plane.tracing.active)
        try:
            return await self._infer(request, plain, started)
        except Exception:
            context.set_trailing_metadata(((REQUEST_ID_METADATA, plain.id),))
            raise

    @_answers
    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> None:
        """Answer each request of the stream with a ModelStreamInferResponse, as Triton does
        for models that answer once per request: ``infer_response`` (its ``id`` the
        request's, or the generated one), or ``error_message`` with only the id in
        ``infer_response`` (failed requests do not end the stream).

        Up to ``self.stream_window`` requests run at once and are answered in the order they
        finish. The next request is read only when fewer are pending, so a fast sender waits
        (flow control) instead of piling requests up here. The stream ends OK once the
        client has closed its side and every request read is answered; when the client
        cancels or the stream's deadline passes, the requests still pending are cancelled
        (taken out of their batches' queues if not yet running), and none outlives the call.
        The stream's deadline is each request's deadline.
        """
        window = asyncio.Semaphore(self.stream_window)
        #: answers ready to be written; None: no more will come
        ready: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        running: set[asyncio.Task] = set()

        async def answer(request: pb.ModelInferRequest) -> None:
            if len(running) > 1:  # this task's context is its own
                OTHERS_IN_PROGRESS.set(True)
            ready.put_nowait(await self._stream_answer(request, context))

        async def read() -> None:
            try:
                requests = aiter(request_iterator)
                while True:
                    await window.acquire()
                    try:
                        request = await anext(requests)
                    except StopAsyncIteration:
                        break
                    task = asyncio.create_task(answer(request), name=STREAM_TASK_NAME)
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.wait(set(running))
            finally:
                ready.put_nowait(None)

        reader = asyncio.create_task(read(), name=STREAM_TASK_NAME)
        try:
            while (response := await ready.get()) is not None:
                await context.write(response)
                window.release()
            await reader  # raises what ended the reading, if it failed
        finally:
            for task in (reader, *running):
                task.cancel()
            await asyncio.gather(reader, *running, return_exceptions=True)

    async def _stream_answer(self, request: pb.ModelInferRequest,
                             context: grpc.aio.ServicerContext) -> pb.ModelStreamInferResponse:
        """One streamed request's answer: its response, or its failure's message."""
        answer = pb.ModelStreamInferResponse()
        plain: InferRequest | None = None
        try:
            plain, started = _build(request, context, self._plane.tracing.active)
            await self._infer(request, plain, started, answer.infer_response, answer)
        except Exception as exc:  # answered on the stream; the data plane logged it
            answer.Clear()
            answer.error_message = _failure_message(exc)
            answer.infer_response.id = request.id or (plain.id if plain is not None else "")
        final = request.parameters.get(FINAL_RESPONSE_PARAMETER)
        if final is not None and final.bool_param:
            answer.infer_response.parameters[FINAL_RESPONSE_FLAG].bool_param = True
        return answer

    @_answers
    async def LogSettings(self, request, context):
        """Read (no settings sent) or change this process's log settings (Triton's keys;
        DataPlane.log_settings)."""
        updates = {key: _setting_value(value) for key, value in request.settings.items()}
        response = pb.LogSettingsResponse()
        for key, value in self._plane.logging.settings(updates).items():
            entry = response.settings[key]
            if isinstance(value, bool):
                entry.bool_param = value
            elif isinstance(value, int):
                entry.uint32_param = value
            else:
                entry.string_param = value
        return response

    @_answers
    async def TraceSetting(self, request, context):
        """Triton's trace extension: the settings of ``model_name`` ("" for all), after
        applying ``settings`` (an empty value list clears a key)."""
        updates = {key: list(value.value) for key, value in request.settings.items()}
        response = pb.TraceSettingResponse()
        for key, values in self._plane.trace.settings(request.model_name, updates).items():
            response.settings[key].value.extend(values)
        return response


def _setting_value(value: pb.LogSettingsRequest.SettingValue) -> object:
    """A log setting's value as sent (bool, int or str), None when none was set."""
    choice = value.WhichOneof("parameter_choice")
    return getattr(value, choice) if choice else None
