"""Per-model-version dynamic batcher: queue requests, form batches, run them, split results.

Requests wait in one queue per model version. A worker (one per model instance; one forms
a batch at a time, as Triton's one batcher thread feeds every instance) looks at the oldest
request and the queued requests after it with the same per-sample shapes and datatypes,
counting samples (a request may carry its own batch), until they reach the largest
preferred batch size (or ``max_batch_size``), or until the oldest of them has waited
``max_queue_delay`` (0: take what is queued when the instance frees). Only then does it
take them out of the queue: it copies the inputs into one preallocated buffer per input,
runs the batch on its runner in a thread, and hands each request a view of its own rows
of the outputs. Without batching, each request runs alone.

A request stays in the queue, and so can leave it, until its batch runs: a caller that goes
away (its task cancelled: a gRPC cancel or deadline, a closed stream or HTTP connection)
takes its request out at once, and a request whose deadline passes is failed at that
moment, so neither is ever computed and the batch forming takes another request in its
place. The queue policy's timeout (Triton's ``default_queue_policy``) acts at the timeout:
REJECT fails the request with Triton's UNAVAILABLE "Request timeout expired", DELAY moves it
behind every request that has not timed out, those queued later included.
A scheduler made with ``run_on_event_loop=True`` runs its batches on the event loop's own
thread instead: for models so small that the hand-off to a thread costs more than the run.

With ``batch_buckets`` (GPU instances by default, see serving/models/accelerators.py) a batch is
padded with zero rows up to the smallest bucket that holds it, so the model only ever sees
the few batch shapes that were warmed up; the padding rows' outputs are dropped.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from onnxserve.serving.batching.inflight import InFlight
from onnxserve.serving.errors import (
    DeadlineExceededError,
    InferenceFailedError,
    InvalidInputError,
    QueueTimeoutError,
    ResourceExhaustedError,
    SchedulerClosedError,
    ServingError,
    UnavailableError,
)
from onnxserve.serving.observability.statistics import ModelStats
from onnxserve.serving.types import Instance, OutputValue, TopK

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueuePolicy:
    """Triton's ModelQueuePolicy (model_config.proto, and the dynamic batcher's "Queue
    Policy" in Triton's model configuration guide): queue bound and how long a request may
    wait in the queue before its batch runs."""

    #: queued requests beyond this are refused at once (0: no bound)
    max_queue_size: int = 0
    #: seconds a request may wait in the queue (0: no limit)
    timeout_s: float = 0.0
    #: what happens at the timeout: "reject" fails the request then (UNAVAILABLE, "Request
    #: timeout expired", as Triton), "delay" lets it run only after every queued request
    #: that has not timed out, including those that arrive later
    timeout_action: str = "reject"
    #: whether a request's own "timeout" parameter (microseconds) may shorten timeout_s
    #: (never lengthen it)
    allow_timeout_override: bool = False


#: which of a request's deadlines an entry of the scheduler's deadline heap is for
_CALLER, _QUEUE = "caller", "queue"
#: withdrawn entries the deadline heap may hold before it is rebuilt without them
_STALE_KEPT = 64


@dataclass(eq=False)  # queued by identity
class _Pending:
    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...]
    batch_size: int
    #: requests batch together only when these match
    key: tuple
    future: asyncio.Future
    #: outputs asked for as their k best classes (the classification extension)
    top_k: dict[str, int] = field(default_factory=dict)
    #: time.perf_counter() at which the caller's deadline passes (None: no deadline)
    caller_deadline: float | None = None
    #: time.perf_counter() at which the queue policy's timeout expires (None: no timeout,
    #: or it expired and the request was delayed)
    queue_deadline: float | None = None
    #: the nearer of the two deadlines while it is in the scheduler's deadline heap
    armed_at: float | None = None
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)
    started_ns: int | None = None


def check_output_rows(
    where: str,
    rows: int,
    requests: int,
    outputs: Mapping[str, np.ndarray],
    best: Mapping[str, TopK] | None = None,
) -> None:
    """Refuse a batch whose outputs do not have one row per batch row.

    A model with ``max_batch_size`` > 0 must return, in every output, as many rows as the
    batch it was given (``rows``, padding included): the rows are split back to the
    requests by position, so an output with fewer or more rows would hand one request
    another's data (Triton refuses such a batch the same way: "failed to split the output
    tensor"). ``where`` (e.g. "model 'm:1'", or "") and ``requests`` are for the message.

    Raises:
        InferenceFailedError: naming the output, the rows expected and the rows returned.
    """
    found = {name: (array.shape[0] if array.ndim else None) for name, array in outputs.items()}
    for name, top in (best or {}).items():
        found[name] = len(top.values)
    prefix = f"{where}: " if where else ""
    for name, got in found.items():
        if got != rows:
            returned = "a scalar" if got is None else f"{got} row(s)"
            raise InferenceFailedError(
                f"{prefix}failed to split the output tensor {name!r}: the batch has "
                f"{rows} row(s) ({requests} request(s)) but the model returned {returned}; "
                "a model with max_batch_size > 0 must return one row per sample in every "
                "output (serve it with max_batch_size: 0 if it cannot)"
            )


def _batch_key(inputs: dict[str, np.ndarray]) -> tuple:
    return tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items()))


Allocate = Callable[[tuple[int, ...], np.dtype], np.ndarray]


class _Buffers:
    """Reusable input buffers of one instance, one per (input, dtype, sample shape).

    ``allocate`` makes them (the runner's: pinned host memory for a GPU instance). Only
    the most recently used ``KEEP`` are kept, for models whose sample shapes vary.
    """

    KEEP = 8

    def __init__(self, capacity: int, allocate: Allocate) -> None:
        self._capacity = capacity
        self._allocate = allocate
        self._buffers: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()

    def clear(self) -> None:
        """Let go of every buffer (pinned ones are unregistered when freed)."""
        self._buffers.clear()

    def concatenate(self, name: str, parts: list[np.ndarray], rows: int) -> np.ndarray:
        """The parts one after another, then zero rows up to ``rows`` in all."""
        first = parts[0]
        filled = sum(len(p) for p in parts)
        if first.dtype == object or rows > self._capacity:
            pad = [np.full((rows - filled, *first.shape[1:]), "" if first.dtype == object
                           else 0, first.dtype)] if rows > filled else []
            return np.concatenate([*parts, *pad])
        key = (name, first.dtype.str, first.shape[1:])
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = self._allocate((self._capacity, *first.shape[1:]),
                                                         first.dtype)
            if len(self._buffers) > self.KEEP:
                self._buffers.popitem(last=False)
        else:
            self._buffers.move_to_end(key)
        np.concatenate(parts, out=buffer[:filled])
        if rows > filled:
            buffer[filled:rows] = 0
        return buffer[:rows]


class Scheduler:
    """Queues and batches inference requests for one model version."""

    def __init__(
        self,
        runners: Sequence[Instance],
        *,
        max_batch_size: int,
        batching: bool = True,
        max_queue_delay_us: int = 0,
        preferred_batch_sizes: Sequence[int] = (),
        name: str = "",
        stats: ModelStats | None = None,
        run_on_event_loop: bool = False,
        queue_policy: QueuePolicy | None = None,
        batch_buckets: Sequence[int] = (),
    ) -> None:
        if not runners:
            raise ValueError("a scheduler needs at least one runner")
        self._runners = list(runners)
        if run_on_event_loop and len(self._runners) != 1:
            raise ValueError("a scheduler that runs on the event loop takes exactly one runner")
        self._inline = run_on_event_loop
        self._inline_buffers = _Buffers(max(max_batch_size, 1), self._runners[0].host_buffer)
        self._policy = queue_policy or QueuePolicy()
        self._max_batch_size = max_batch_size
        self._buckets = sorted({b for b in batch_buckets if 0 < b <= max_batch_size})
        self._batching = batching and max_batch_size > 0
        preferred = [p for p in preferred_batch_sizes if 0 < p <= max_batch_size]
        self._target = max(preferred) if preferred else max_batch_size
        self._max_delay_s = max_queue_delay_us / 1e6
        self._name = name
        self.stats = stats or ModelStats()
        #: queued requests, oldest first, then those delayed by the queue policy (dicts as
        #: ordered sets: a caller that leaves is taken out at once)
        self._waiting: dict[_Pending, None] = {}
        self._delayed: dict[_Pending, None] = {}
        #: one batch forms at a time; the worker forming it waits on ``_wakeup``
        self._forming = asyncio.Lock()
        self._wakeup: asyncio.Future[None] | None = None
        #: (time, order, request, kind) of the queued requests' nearer deadlines, and one
        #: timer for the first (a timer per request cost a third of the queue's time);
        #: entries of requests no longer queued are skipped, or dropped when many
        self._deadlines: list[tuple[float, int, _Pending, str]] = []
        self._order = itertools.count()
        self._stale = 0
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._deadline_timer_at = 0.0
        self._executor = ThreadPoolExecutor(
            max_workers=len(self._runners), thread_name_prefix=f"run-{name}"
        )
        self._workers: list[asyncio.Task] = []
        self._closed = False
        self._in_flight = InFlight()

    @property
    def buckets(self) -> tuple[int, ...]:
        """The batch sizes batches are padded up to (empty: none)."""
        return tuple(self._buckets)

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet answered."""
        return self._in_flight.count

    async def drain(self, timeout: float) -> bool:
        """Take no new requests and wait up to ``timeout`` s for the admitted ones to finish.

        Returns whether they all finished. ``close`` fails whatever is left.
        """
        self._closed = True
        return await self._in_flight.wait_idle(timeout)

    def start(self) -> None:
        """Start one worker task per runner on the running event loop."""
        loop = asyncio.get_running_loop()
        self._workers = [
            loop.create_task(self._work(r), name=f"batcher-{self._name}-{i}")
            for i, r in enumerate(self._runners)
        ]

    async def close(self) -> None:
        """Stop taking requests, fail what is still queued, stop the workers and their
        threads, and let go of the batch buffers and the statistics' metrics.

        Afterwards no batch runs and nothing of the scheduler refers back to it: a worker
        task ended by ``cancel`` keeps its CancelledError, whose traceback holds the
        worker's frames and so this scheduler, its runners and their sessions; kept in
        ``_workers`` that was a reference cycle, freed only by Python's cyclic garbage
        collector (every reload kept a retired version alive until it ran).
        """
        self._closed = True
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        for pending in [*self._waiting, *self._delayed]:
            self._withdraw(pending)
            if not pending.future.done():
                pending.future.set_exception(UnavailableError(f"model {self._name} was unloaded"))
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        self._deadlines.clear()
        self._stale = 0
        # the run a cancelled worker left in its thread ends there; wait for it off the
        # event loop, which goes on serving the other models meanwhile
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        self._inline_buffers.clear()
        self.stats.close()

    @property
    def queued(self) -> int:
        """Requests waiting for a batch (not counting the ones running)."""
        return len(self._waiting) + len(self._delayed)

    async def infer(
        self,
        inputs: dict[str, np.ndarray],
        outputs: Sequence[str],
        batch_size: int,
        *,
        time_remaining: float | None = None,
        timeout_us: int | None = None,
        top_k: dict[str, int] | None = None,
        then: Callable[[dict[str, OutputValue]], Any] | None = None,
    ) -> Any:
        """Queue one request and wait for its outputs.

        ``batch_size`` is the request's own leading dimension (0 for models without batching).
        ``top_k`` names outputs wanted as their k best classes per sample (models with a
        batch dimension only), found where the batch runs.
        ``time_remaining`` is the caller's deadline in seconds from now: a request still
        queued when it passes is failed then, never computed. ``timeout_us`` is the
        request's own queue timeout, used when the queue policy allows overriding. A caller
        that stops waiting (its task cancelled) takes its request out of the queue: it is
        never computed, and its place in a forming batch goes to another request.
        ``then`` turns the outputs into the answer (the data plane's strings, shared memory
        and the front end's encoding) before the request is counted in ``stats``: an answer
        that cannot be made counts as a failure, not a success (returns what ``then``
        returns; the outputs without it).

        Raises:
            SchedulerClosedError: the scheduler was closed or is draining.
            ResourceExhaustedError: the queue holds ``max_queue_size`` requests.
            DeadlineExceededError: the caller's deadline passed before the request ran.
            QueueTimeoutError: the queue policy's timeout (REJECT) expired first.
            UnavailableError: the model was unloaded while the request waited.
            InferenceFailedError, InvalidInputError: the run failed.
            What ``then`` raises.
        """
        if self._closed:
            raise SchedulerClosedError(f"model {self._name} is not accepting requests")
        policy = self._policy
        if policy.max_queue_size and self.queued >= policy.max_queue_size:
            self.stats.record_request(False, 0, None)
            raise ResourceExhaustedError(
                f"model {self._name}: the queue is full ({policy.max_queue_size} requests "
                "waiting, max_queue_size); retry later"
            )
        if top_k and self._max_batch_size <= 0:
            raise ValueError("top_k needs a model with a batch dimension")
        if time_remaining is not None and time_remaining <= 0:
            self.stats.record_request(False, 0, None)
            raise DeadlineExceededError(
                f"model {self._name}: the request's deadline passed before it was queued "
                f"({-time_remaining * 1e3:.1f} ms ago); it was not computed")
        inputs = self._runners[0].prepare(inputs)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if self._inline and not self._max_delay_s and not self._waiting and not self._delayed:
            # Nothing waits to join it: run it now, without the round trip through the
            # worker task (two event loop turns, a third of a tiny model's time), and
            # without the queue's bookkeeping (it cannot expire: it never waits).
            return self._run_now(_Pending(inputs, tuple(outputs), batch_size, (), future,
                                          top_k=dict(top_k or {})), then)
        key = _batch_key(inputs) if self._batching else ()
        pending = _Pending(inputs, tuple(outputs), batch_size, key, future, dict(top_k or {}))
        now = time.perf_counter()
        timeout_s = policy.timeout_s
        if timeout_us and policy.allow_timeout_override:
            # Triton's ModelQueuePolicy: a request "can set a timeout that is less than the
            # default timeout value but may not increase the timeout" (0: no default)
            timeout_s = min(timeout_s, timeout_us / 1e6) if timeout_s else timeout_us / 1e6
        if timeout_s:
            pending.queue_deadline = now + timeout_s
        if time_remaining is not None:
            pending.caller_deadline = now + time_remaining
        self._waiting[pending] = None
        self._arm(pending)
        self._wake()
        self._in_flight.enter()
        ok = False
        try:
            result = await future
            if then is not None:
                result = then(result)
            ok = True
            return result
        finally:
            # Still queued here only when the caller left (this task was cancelled).
            self._withdraw(pending)
            self._in_flight.leave()
            queued = None if pending.started_ns is None else (
                pending.started_ns - pending.enqueued_ns)
            self.stats.record_request(ok, time.perf_counter_ns() - pending.enqueued_ns, queued)

    def _run_now(self, pending: _Pending,
                 then: Callable[[dict[str, OutputValue]], Any] | None) -> Any:
        pending.started_ns = time.perf_counter_ns()
        ok = False
        try:
            try:
                (result,) = self._run_batch(self._runners[0], self._inline_buffers, [pending])
            except ServingError:
                raise
            except Exception as exc:
                log.exception("batch of model %s failed", self._name)
                raise InferenceFailedError(f"model {self._name} failed: {exc}") from exc
            answer = result if then is None else then(result)
            ok = True
            return answer
        finally:
            self.stats.record_request(ok, time.perf_counter_ns() - pending.enqueued_ns, 0)

    # --- the queue: deadlines, callers that leave, batch forming --------------------------

    def _wake(self) -> None:
        """Tell the worker forming a batch that the queue changed."""
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _withdraw(self, pending: _Pending) -> bool:
        """Take ``pending`` out of the queue (and its deadline out of the heap); whether it
        was queued."""
        if pending.armed_at is not None:
            pending.armed_at = None
            self._stale += 1
            if self._stale > _STALE_KEPT and self._stale * 2 > len(self._deadlines):
                self._deadlines = [e for e in self._deadlines if e[2].armed_at == e[0]]
                heapq.heapify(self._deadlines)
                self._stale = 0
        for queue in (self._waiting, self._delayed):
            if pending in queue:
                del queue[pending]
                self._wake()
                return True
        return False

    def _arm(self, pending: _Pending) -> None:
        """Put the nearer of ``pending``'s deadlines (if any) in the deadline heap."""
        caller, queue = pending.caller_deadline, pending.queue_deadline
        if caller is None and queue is None:
            return
        if queue is None or (caller is not None and caller <= queue):
            at, kind = cast(float, caller), _CALLER
        else:
            at, kind = queue, _QUEUE
        pending.armed_at = at
        heapq.heappush(self._deadlines, (at, next(self._order), pending, kind))
        if self._deadline_timer is None or at < self._deadline_timer_at:
            self._set_deadline_timer()

    def _set_deadline_timer(self) -> None:
        """(Re)set the one timer for the first live deadline of the heap."""
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        heap = self._deadlines
        while heap and heap[0][2].armed_at != heap[0][0]:
            heapq.heappop(heap)
            self._stale -= 1
        if heap:
            self._deadline_timer_at = heap[0][0]
            self._deadline_timer = asyncio.get_running_loop().call_later(
                max(heap[0][0] - time.perf_counter(), 0.0), self._deadlines_passed)

    def _deadlines_passed(self) -> None:
        """The deadline timer fired: act on every deadline passed, then set it again."""
        self._deadline_timer = None
        heap, now = self._deadlines, time.perf_counter()
        while heap and heap[0][0] <= now:
            at, _, pending, kind = heapq.heappop(heap)
            if pending.armed_at != at:
                self._stale -= 1  # withdrawn, or its deadline changed
                continue
            pending.armed_at = None
            self._expire(pending, kind)
        self._set_deadline_timer()

    def _expire(self, pending: _Pending, kind: str) -> None:
        """A queued request's deadline (``kind``) passed: fail it now, or, for the queue
        policy's DELAY, move it behind the requests that have not timed out (Triton's
        ModelQueuePolicy: "delay the request until all other requests at the same (or
        higher) priority levels that have not reached their timeouts are processed")."""
        if pending not in self._waiting and pending not in self._delayed:
            return  # running or answered: too late to drop it
        waited_ms = (time.perf_counter_ns() - pending.enqueued_ns) / 1e6
        if kind == _QUEUE and self._policy.timeout_action == "delay":
            pending.queue_deadline = None
            del self._waiting[pending]
            self._delayed[pending] = None
            self._arm(pending)  # the caller's own deadline still holds
            self._wake()
            return
        self._withdraw(pending)
        if pending.future.done():
            return
        if kind == _CALLER:
            pending.future.set_exception(DeadlineExceededError(
                f"model {self._name}: request dropped after {waited_ms:.1f} ms in the queue "
                "(the request's deadline passed before its batch ran); it was not computed"))
        else:
            pending.future.set_exception(QueueTimeoutError(
                f"model {self._name}: Request timeout expired after {waited_ms:.1f} ms in "
                "the queue (dynamic_batching.default_queue_policy: timeout_action REJECT; "
                "the timeout is default_timeout_microseconds, or the request's 'timeout' "
                "parameter where allow_timeout_override is true); it was not computed"))

    def _form(self) -> tuple[list[_Pending], float | None]:
        """The batch the queue holds now, and how long it may still wait for more: 0 to
        run it now; None when nothing is queued."""
        queued = itertools.chain(self._waiting, self._delayed)
        first = next(queued, None)
        if first is None:
            return [], None
        batch = [first]
        if not self._batching:
            return batch, 0.0
        size, oldest = first.batch_size, first.enqueued_ns
        full = size >= self._target
        while not full:
            nxt = next(queued, None)
            if nxt is None:
                break
            if nxt.key != first.key or size + nxt.batch_size > self._max_batch_size:
                full = True  # the batch cannot grow past this request: run it as it is
                break
            batch.append(nxt)
            size += nxt.batch_size
            oldest = min(oldest, nxt.enqueued_ns)
            full = size >= self._target
        if full or not self._max_delay_s:
            return batch, 0.0
        # Triton's max_queue_delay counts from the oldest request of the batch.
        waited = (time.perf_counter_ns() - oldest) / 1e9
        return batch, max(self._max_delay_s - waited, 0.0)

    async def _gather(self) -> list[_Pending]:
        """Wait for the next batch to be due and take its requests out of the queue."""
        async with self._forming:
            loop = asyncio.get_running_loop()
            while True:
                batch, wait = self._form()
                gone = [pending for pending in batch if pending.future.done()]
                if gone:
                    # callers cancelled a moment ago, whose tasks have not yet run to take
                    # their requests out: take them out here, and form the batch anew
                    for pending in gone:
                        self._withdraw(pending)
                    continue
                if batch and not wait:
                    for pending in batch:
                        self._withdraw(pending)
                    return batch
                self._wakeup = waiter = loop.create_future()
                timer = None if wait is None else loop.call_later(wait, self._wake)
                try:
                    await waiter
                finally:
                    self._wakeup = None
                    if timer is not None:
                        timer.cancel()

    async def _work(self, runner: Instance) -> None:
        buffers = _Buffers(max(self._max_batch_size, 1), runner.host_buffer)
        while True:
            batch = await self._gather()
            try:
                await self._dispatch(runner, buffers, batch)
            except asyncio.CancelledError:  # closed: no request taken is left unanswered
                self._fail(batch, UnavailableError(f"model {self._name} was unloaded"))
                raise
            except Exception as exc:  # a bug here, not in the run: answer, and go on
                log.exception("batch of model %s could not be answered", self._name)
                self._fail(batch, InferenceFailedError(f"model {self._name} failed: {exc}"))

    async def _dispatch(self, runner: Instance, buffers: _Buffers,
                        batch: list[_Pending]) -> None:
        """Run ``batch`` and answer each of its requests with its outputs or its failure."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter_ns()
        for pending in batch:
            pending.started_ns = started
        results: Sequence[dict[str, OutputValue] | Exception]
        try:
            if self._inline:
                results = self._run_batch(runner, buffers, batch)
            else:
                results = await loop.run_in_executor(
                    self._executor, self._run_batch, runner, buffers, batch
                )
        except InvalidInputError as exc:
            # One request's input the model cannot compute must not fail the others
            # batched with it: run each alone, so only the culprits fail (and not those
            # whose callers left meanwhile).
            if len(batch) == 1:
                self._settle(batch, [exc])
                return
            batch = [pending for pending in batch if not pending.future.done()]
            if not batch:
                return
            if self._inline:
                results = self._run_each(runner, buffers, batch)
            else:
                results = await loop.run_in_executor(
                    self._executor, self._run_each, runner, buffers, batch)
        except Exception as exc:
            if not isinstance(exc, InferenceFailedError):
                log.exception("batch of model %s failed", self._name)
                exc = InferenceFailedError(f"model {self._name} failed: {exc}")
            self._fail(batch, exc)
            return
        self._settle(batch, results)

    @staticmethod
    def _fail(batch: list[_Pending], exc: Exception) -> None:
        """Fail every request of ``batch`` not answered yet with ``exc``."""
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(exc)

    def _run_each(self, runner: Instance, buffers: _Buffers,
                  batch: list[_Pending]) -> list[dict[str, OutputValue] | Exception]:
        """Run each request of a failed batch alone: its outputs, or its own failure."""
        results: list[dict[str, OutputValue] | Exception] = []
        for pending in batch:
            try:
                results.extend(self._run_batch(runner, buffers, [pending]))
            except ServingError as exc:
                results.append(exc)
            except Exception as exc:
                log.exception("request of model %s failed", self._name)
                results.append(InferenceFailedError(f"model {self._name} failed: {exc}"))
        return results

    @staticmethod
    def _settle(batch: list[_Pending],
                results: Sequence[dict[str, OutputValue] | Exception]) -> None:
        for pending, result in zip(batch, results, strict=True):
            if pending.future.done():
                continue
            if isinstance(result, Exception):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)

    def _padded(self, rows: int) -> int:
        """The smallest bucket that holds ``rows`` (``rows`` itself without buckets)."""
        index = bisect.bisect_left(self._buckets, rows)
        return self._buckets[index] if index < len(self._buckets) else rows

    def _run_batch(
        self, runner: Instance, buffers: _Buffers, batch: list[_Pending]
    ) -> list[dict[str, OutputValue]]:
        """Concatenate, run and split one batch (in a worker thread)."""
        t0 = time.perf_counter_ns()
        wanted = list(dict.fromkeys(name for p in batch for name in p.outputs))
        top: dict[str, int] = {}
        for pending in batch:
            for name, k in pending.top_k.items():
                top[name] = max(top.get(name, 0), k)
        filled = sum(p.batch_size for p in batch)
        rows = self._padded(filled) if self._max_batch_size > 0 else filled
        if len(batch) == 1 and rows == filled:
            inputs = batch[0].inputs
        else:
            inputs = {name: buffers.concatenate(name, [p.inputs[name] for p in batch], rows)
                      for name in batch[0].inputs}
        t1 = time.perf_counter_ns()
        if top:
            outputs, best = runner.run_with_top_k(inputs, wanted, top)
        else:
            outputs, best = runner.run(inputs, wanted), {}
        t2 = time.perf_counter_ns()
        if self._max_batch_size > 0:
            check_output_rows(f"model {self._name}", rows, len(batch), outputs, best)
        if len(batch) == 1 and rows == filled and not top:
            results: list[dict[str, OutputValue]] = [cast(dict[str, OutputValue], outputs)]
        else:
            results = []
            start = 0
            for pending in batch:
                stop = start + pending.batch_size
                result: dict[str, OutputValue] = {
                    name: outputs[name][start:stop] for name in pending.outputs}
                for name, k in pending.top_k.items():
                    result[name] = best[name].rows(start, stop, k)
                results.append(result)
                start = stop
        samples = sum(max(p.batch_size, 1) for p in batch)
        self.stats.record_batch(samples, t1 - t0, t2 - t1, time.perf_counter_ns() - t2,
                                len(batch), max(rows, samples))
        return results
