"""The transport-neutral operations of the KServe V2 protocol, on plain values and arrays.

Each front end (gRPC, HTTP) turns its messages into these calls and their results back
into messages, and maps the ``ServingError`` they raise to its status codes; nothing here
knows a transport. The values they take and return live in serving/contract.py, which the
codecs import without the model lifecycle. ``infer`` is the path every request takes:

    look the model up (registry) -> check the declared inputs against the model's rules
    -> decode each payload (the front end's decoder: zero-copy views) -> decode encoded
    images off the event loop -> reshape to the model's shapes -> queue for a batch
    (scheduler) -> the outputs in the clients' shapes, classification results as
    "score:index:label" strings

and every request is counted in the metrics under its canonical status code.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any, TypeVar, overload

from onnxserve.protos.codec import TensorCodecError
from onnxserve.protos.datatypes import by_config_type, by_name
from onnxserve.protos.model_config_pb2 import ModelConfig
from onnxserve.serving.batching.inflight import InFlight
from onnxserve.serving.classification import class_strings, top_k
from onnxserve.serving.contract import (
    CLASSIFICATION_PARAMETER,
    OTHERS_IN_PROGRESS,
    TIMEOUT_PARAMETER,
    InferRequest,
    InferResult,
    ModelMetadata,
    RequestedOutput,
    ServerMetadata,
)
from onnxserve.serving.errors import (
    CANCELLED,
    DeadlineExceededError,
    InvalidInputError,
    SchedulerClosedError,
    ServingError,
    UnavailableError,
    error_code,
)
from onnxserve.serving.handlers import LogHandlers, RepositoryHandlers, TraceHandlers
from onnxserve.serving.models.images import ImageDecoder
from onnxserve.serving.models.model import Model, ModelVersion
from onnxserve.serving.models.registry import READY, Registry
from onnxserve.serving.models.validation import expected_shape
from onnxserve.serving.observability import stages
from onnxserve.serving.observability.accounting import RequestAccounting
from onnxserve.serving.observability.metrics import UNKNOWN_MODEL, Metrics
from onnxserve.serving.observability.stages import CLOCK
from onnxserve.serving.observability.statistics import VersionStatistics
from onnxserve.serving.observability.tracing import TraceConfig, Tracing
from onnxserve.serving.shared_memory import (
    REGION_PARAMETER,
    Placement,
    Region,
    SharedMemoryRegistry,
)
from onnxserve.serving.types import OutputValue, RequestTiming, TensorSpec, TopK

log = logging.getLogger(__name__)
T = TypeVar("T")

SERVER_NAME = "onnxserve"
#: A call cancelled this close to its deadline was cancelled by it: gRPC's deadline timers
#: may fire up to a millisecond early, and the request's time_remaining was read a little
#: after the call arrived. (A client that cancels itself in the last 5 ms of its deadline
#: is counted DEADLINE_EXCEEDED.)
DEADLINE_SLACK_S = 0.005
#: Triton's names of the protocol extensions every front end implements, as ServerMetadata
#: lists them (tests/served/test_extensions.py ties the list to the RPCs that answer); a front
#: end adds its own ("binary_tensor_data" is HTTP's). Not built: "sequence",
#: "cuda_shared_memory".
EXTENSIONS = ("classification", "model_configuration", "model_repository", "statistics",
              "logging", "trace", "system_shared_memory")


def _printable(text: str, limit: int = 128) -> str:
    """``text`` fit for logs and metadata: printable ASCII, at most ``limit`` characters."""
    if len(text) <= limit and text.isascii() and text.isprintable():
        return text
    return "".join(c if c.isascii() and c.isprintable() else "?" for c in text[:limit])


#: generated request ids: a random 64-bit prefix per process and a counter (a uuid4 per
#: request cost more than all of a tiny model's validation)
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)


def _new_request_id() -> str:
    """32 hex digits, as a uuid's: unique across processes and restarts by the prefix."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def _server_version() -> str:
    try:
        return package_version("onnxserve")
    except PackageNotFoundError:
        return "unknown"


def _whole_number(value: object, what: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InvalidInputError(f"{what} must be an integer >= {least}, got {value!r}")
    return value


class DataPlane:
    """The V2 protocol's operations over a model registry."""

    def __init__(self, registry: Registry, metrics: Metrics | None = None,
                 tracing: Tracing | None = None) -> None:
        self.registry = registry
        #: request tracing (off unless --trace-config or TraceSetting turn it on)
        self.tracing = tracing or Tracing(TraceConfig())
        #: False from the moment a stop begins: new requests are refused
        self.accepting = True
        self._in_flight = InFlight()
        #: Triton's system shared memory regions (serving/shared_memory.py)
        self.shared_memory = SharedMemoryRegistry()
        self._images = ImageDecoder()
        #: the model repository extension (index, load, unload)
        self.repository = RepositoryHandlers(registry)
        #: the logging and trace extensions
        self.logging = LogHandlers()
        self.trace = TraceHandlers(self.tracing, registry)
        #: every request counted under its status, its failures logged
        self._accounting = RequestAccounting(metrics, log)

    # --- lifecycle -----------------------------------------------------------------------

    def stop_accepting(self) -> None:
        """From now on inference is refused UNAVAILABLE and readiness answers false (the
        one place a stop turns both)."""
        self.accepting = False

    async def drain(self, timeout: float) -> bool:
        """Refuse new inference requests and wait up to ``timeout`` s for the admitted ones."""
        self.stop_accepting()
        return await self._in_flight.wait_idle(timeout)

    def close(self) -> None:
        """Release what the data plane holds: the image decoders, the trace exporter (the
        spans still queued are sent first) and every shared memory region (unmapped now,
        or when the last request using one ends)."""
        self._images.close()
        self.tracing.close()
        self._accounting.flush()
        regions = self.shared_memory.close()
        if regions:
            log.info("unregistered %d shared memory region(s) at exit", regions)

    # --- health and metadata -------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self.accepting and self.registry.all_ready

    def models_ready(self) -> dict[str, bool]:
        """Every model the repository knows, by name: whether it is ready (loaded, and the
        server accepting), as the health service reports each."""
        return {entry.name: self.accepting and entry.state == READY
                for entry in self.registry.index()}

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            self.registry.get(name, version)
        except ServingError:
            return False
        return self.accepting

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(SERVER_NAME, _server_version(), EXTENSIONS)

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        """Raises NotFoundError / UnavailableError for a model that cannot answer."""
        model, _ = self.registry.get(name, version)
        config = model.config

        def tensors(items) -> list[TensorSpec]:
            return [TensorSpec(t.name, by_config_type(t.data_type).name,
                               tuple(expected_shape(t.dims, config.max_batch_size)))
                    for t in items]

        return ModelMetadata(model.name, [str(v) for v in sorted(model.versions)],
                             config.platform, tensors(config.input), tensors(config.output),
                             model.parameters())

    def model_config(self, name: str, version: str = "") -> ModelConfig:
        return self.registry.get(name, version)[0].config

    def statistics(self, name: str = "", version: str = "") -> list[VersionStatistics]:
        """The statistics of every version asked for: all loaded ones when ``name`` is
        empty, all of the model's when ``version`` is."""
        if not name:
            chosen = [(e.model.name, v) for e in self.registry.entries() if e.model
                      for v in e.model.versions.values()]
        else:
            model, one = self.registry.get(name, version)
            chosen = ([(model.name, one)] if version
                      else [(model.name, v) for v in model.versions.values()])
        return [v.scheduler.stats.snapshot(model_name, str(v.version))
                for model_name, v in chosen]

    # --- inference -----------------------------------------------------------------------

    @overload
    async def infer(self, request: InferRequest) -> InferResult: ...

    @overload
    async def infer(self, request: InferRequest,
                    answer: Callable[[InferResult], T]) -> T: ...

    async def infer(self, request: InferRequest,
                    answer: Callable[[InferResult], Any] | None = None) -> Any:
        """Run one inference request and return its result, or what ``answer`` (the front
        end's encoding) makes of it; raises a ServingError naming what is wrong.

        ``answer`` runs before the request is counted and logged, so that an answer that
        cannot be sent (too large for the transport, not encodable) is counted under the
        status its client is given, not as OK.
        """
        self._in_flight.enter()
        started = time.perf_counter()
        request.id = _printable(request.id) or _new_request_id()
        name = request.model_name
        model_label = name if self.registry.knows(name) else UNKNOWN_MODEL
        version_label = ""
        held: list[Region] = []  # shared memory regions the request uses
        traced = (self.tracing.start(name, request.trace_context) if self.tracing.active
                  else None)
        try:
            if not self.accepting:
                raise UnavailableError("the server is shutting down")
            # A reload can retire the model between lookup and queueing only if this
            # handler awaits in between; then the lookup is repeated once, on the new model.
            for attempt in (1, 2):
                model, version = self.registry.get(name, request.model_version)
                version_label = str(version.version)
                try:
                    answered = await self._infer(request, model, version, held, answer,
                                                 None if traced is None else traced.timing)
                except SchedulerClosedError:
                    if attempt == 2:
                        raise
                    continue
                observing = time.perf_counter_ns() if CLOCK.enabled else 0
                self._accounting.succeeded(model_label, version_label,
                                           time.perf_counter() - started, request.protocol)
                if traced is not None:
                    self.tracing.finish(traced, version_label, request.id, request.protocol,
                                        "OK")
                if observing:
                    CLOCK.add(stages.OBSERVE, observing)
                return answered
            raise AssertionError("unreachable")
        except asyncio.CancelledError:
            # The caller left (a cancelled gRPC call or stream, a closed HTTP connection,
            # or gRPC cancelling a call whose deadline passed): the request was taken out
            # of its queue uncomputed (serving/batching/scheduler.py); count it as what it
            # was, though no one gets the answer.
            waited = time.perf_counter() - started
            code = (DeadlineExceededError.code if request.time_remaining is not None
                    and waited >= request.time_remaining - DEADLINE_SLACK_S else CANCELLED)
            self._accounting.failed(name, model_label, version_label, code, waited,
                                    protocol=request.protocol, request_id=request.id,
                                    reason=f"the caller left after {waited * 1e3:.1f} ms")
            if traced is not None:
                self.tracing.finish(traced, version_label, request.id, request.protocol, code,
                                    "the caller left")
            raise
        except Exception as exc:
            if not isinstance(exc, ServingError):
                log.error("inference failed unexpectedly", exc_info=exc)
            self._accounting.failed(name, model_label, version_label, error_code(exc),
                                    time.perf_counter() - started, protocol=request.protocol,
                                    request_id=request.id, reason=str(exc), error=exc)
            if traced is not None:
                self.tracing.finish(traced, version_label, request.id, request.protocol,
                                    error_code(exc), str(exc))
            raise
        finally:
            if held and self.shared_memory.release(held):
                # an unregistered region this request's own frames still view: unmap it
                # once this handler has answered and its frames are garbage
                asyncio.get_running_loop().call_soon(self.shared_memory.collect)
            self._in_flight.leave()

    def reject(self, model_name: str, status: str, reason: str, *, protocol: str,
               request_id: str = "", seconds: float = 0.0) -> str:
        """Count and log an inference request that its front end refused before it could
        become an InferRequest (a body that cannot be read or decoded, JSON that is not an
        inference request), as ``infer`` counts and logs the others (docs/operating.md:
        every request in ``onnxserve_requests_total`` under the status its client is given, and
        a ``request_failed`` event). ``status`` is that canonical code, ``seconds`` the
        time since the request came. Returns the request's id: ``request_id`` (the one
        sent, if it could be read) made printable, or a generated one."""
        request_id = _printable(request_id) or _new_request_id()
        model_label = model_name if self.registry.knows(model_name) else UNKNOWN_MODEL
        self._accounting.failed(model_name, model_label, "", status, seconds,
                                protocol=protocol, request_id=request_id, reason=reason)
        return request_id

    async def _infer(self, request: InferRequest, model: Model, version: ModelVersion,
                     held: list[Region], answer: Callable[[InferResult], Any] | None,
                     timing: RequestTiming | None = None) -> Any:
        began = time.perf_counter()
        timed = CLOCK.enabled
        if timed:
            mark = time.perf_counter_ns()
        batch_size = model.rules.check([(t.name, t.datatype, t.shape) for t in request.inputs])
        if timed:
            mark = CLOCK.add(stages.VALIDATE, mark)
        inputs = {}
        for tensor in request.inputs:
            try:
                if tensor.shared_memory is None:
                    inputs[tensor.name] = tensor.decode()
                else:
                    inputs[tensor.name] = self.shared_memory.read_input(
                        tensor.name, by_name(tensor.datatype), tensor.shape,
                        tensor.shared_memory, held)
            except TensorCodecError as exc:
                raise InvalidInputError(f"input {tensor.name!r}: {exc}") from None
        if timed:
            mark = CLOCK.add(stages.DECODE, mark)
        if model.images is not None and model.images.name in inputs:
            inputs = await self._images.decode(inputs, model.images)
            if timed:
                mark = CLOCK.add(stages.IMAGES, mark)
        inputs = model.to_model_inputs(inputs, batch_size)
        names = model.rules.check_outputs([o.name for o in request.outputs])
        classification = {
            o.name: _whole_number(o.classification,
                                  f"output {o.name!r}: parameter {CLASSIFICATION_PARAMETER!r}",
                                  1)
            for o in request.outputs if o.classification is not None}
        placed = self._output_targets(request.outputs, held)
        timeout_us = (None if request.timeout is None else _whole_number(
            request.timeout, f"parameter {TIMEOUT_PARAMETER!r} (microseconds)", 0))
        batched = model.config.max_batch_size > 0
        # Batched models find the k best where the batch runs (on its device).
        top = classification if batched else {}
        if timed:
            mark = CLOCK.add(stages.PREPARE, mark)
        # The caller's deadline counts the time spent here (decoding images) too.
        remaining = (None if request.time_remaining is None
                     else request.time_remaining - (time.perf_counter() - began))

        def finish(outputs: dict[str, OutputValue]) -> Any:
            """The answer to the outputs, made before the model's statistics count the
            request (a failure here counts it failed, as its client sees it)."""
            mark = CLOCK.add(stages.BATCH, batching) if timed else 0
            outputs = model.to_client_outputs(outputs)
            answered = []
            for name in names:
                value = outputs[name]
                if isinstance(value, TopK):
                    value = class_strings(value, model.labels.get(name), name)
                elif name in classification:
                    value = top_k(value, classification[name], model.labels.get(name),
                                  batched=batched, output=name)
                answered.append((name, value))
            if timed:
                CLOCK.add(stages.STRINGS, mark)
            written = None
            if placed:
                written = {name: self.shared_memory.write_output(name, value, *placed[name])
                           for name, value in answered if name in placed}
            result = InferResult(model.name, str(version.version), request.id, answered,
                                 written)
            return result if answer is None else answer(result)

        batching = mark if timed else 0
        return await version.scheduler.infer(
            inputs, [n for n in names if n not in top], batch_size,
            time_remaining=remaining, timeout_us=timeout_us, top_k=top, then=finish,
            alone=not OTHERS_IN_PROGRESS.get(), timing=timing)

    def _output_targets(self, outputs: Sequence[RequestedOutput],
                        held: list[Region]) -> dict[str, tuple[Region, Placement]] | None:
        """Where the outputs placed in shared memory go (None: no output is), checked
        before the run; the regions are added to ``held``."""
        placed = None
        for output in outputs:
            if output.shared_memory is None:
                continue
            if output.classification is not None:
                raise InvalidInputError(
                    f"output {output.name!r}: parameters {CLASSIFICATION_PARAMETER!r} and "
                    f"{REGION_PARAMETER!r} cannot be combined; ask for one or the other")
            placed = placed or {}
            placed[output.name] = self.shared_memory.output_target(
                output.name, output.shared_memory, held)
        return placed
