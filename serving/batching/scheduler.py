"""Per-model-version dynamic batcher: queue requests, form batches, run them, split results.

Requests wait in one queue per model version. A worker (one per model instance) takes the
oldest request and adds queued requests with the same per-sample shapes and datatypes,
counting samples (a request may carry its own batch), until it reaches the largest
preferred batch size (or ``max_batch_size``), or until ``max_queue_delay`` has passed
(0: take what is queued when the instance frees). It copies the inputs into one
preallocated buffer per input, runs the batch on its runner in a thread, and hands each
request a view of its own rows of the outputs. A request whose caller went away before
its batch formed is dropped, never computed. Without batching, each request runs alone.
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
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from onnxserve.serving.batching.inflight import InFlight
from onnxserve.serving.errors import (
    DeadlineExceededError,
    InferenceFailedError,
    InvalidInputError,
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
    """Triton's ModelQueuePolicy: queue bound and how long a request may wait."""

    #: queued requests beyond this are refused at once (0: no bound)
    max_queue_size: int = 0
    #: seconds a request may wait before its batch forms (0: no limit)
    timeout_s: float = 0.0
    #: what happens on timeout: "reject" fails the request, "delay" moves it behind the others
    timeout_action: str = "reject"
    #: whether a request's own "timeout" parameter (microseconds) may replace timeout_s
    allow_timeout_override: bool = False


@dataclass
class _Pending:
    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...]
    batch_size: int
    #: requests batch together only when these match
    key: tuple
    future: asyncio.Future
    #: time.monotonic() after which the request may no longer start (None: never expires)
    deadline: float | None = None
    #: the deadline comes from the queue policy (else from the caller's own deadline)
    policy_deadline: bool = False
    #: outputs asked for as their k best classes (the classification extension)
    top_k: dict[str, int] = field(default_factory=dict)
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
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._carry: collections.deque[_Pending] = collections.deque()
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
        """Stop taking requests, fail what is still queued, and stop the workers."""
        self._closed = True
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        while self._carry or not self._queue.empty():
            pending = self._carry.popleft() if self._carry else self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(UnavailableError(f"model {self._name} was unloaded"))
        self._executor.shutdown(wait=True)

    @property
    def queued(self) -> int:
        """Requests waiting for a batch (not counting the ones running)."""
        return self._queue.qsize() + len(self._carry)

    async def infer(
        self,
        inputs: dict[str, np.ndarray],
        outputs: Sequence[str],
        batch_size: int,
        *,
        time_remaining: float | None = None,
        timeout_us: int | None = None,
        top_k: dict[str, int] | None = None,
    ) -> dict[str, OutputValue]:
        """Queue one request and wait for its outputs.

        ``batch_size`` is the request's own leading dimension (0 for models without batching).
        ``top_k`` names outputs wanted as their k best classes per sample (models with a
        batch dimension only), found where the batch runs.
        ``time_remaining`` is the caller's deadline in seconds from now: a request still
        queued when it passes is dropped, never computed. ``timeout_us`` is the request's
        own queue timeout, used when the queue policy allows overriding.
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
        inputs = self._runners[0].prepare(inputs)
        future = asyncio.get_running_loop().create_future()
        if self._inline and not self._max_delay_s and self._queue.empty() and not self._carry:
            # Nothing waits to join it: run it now, without the round trip through the
            # worker task (two event loop turns, a third of a tiny model's time), and
            # without the queue's bookkeeping (it cannot expire: it never waits).
            return self._run_now(_Pending(inputs, tuple(outputs), batch_size, (), future,
                                          top_k=dict(top_k or {})))
        key = _batch_key(inputs) if self._batching else ()
        now = time.monotonic()
        timeout_s = policy.timeout_s
        if timeout_us and policy.allow_timeout_override:
            timeout_s = timeout_us / 1e6
        deadline, from_policy = None, False
        if timeout_s:
            deadline, from_policy = now + timeout_s, True
        if time_remaining is not None and (deadline is None or now + time_remaining < deadline):
            deadline, from_policy = now + max(time_remaining, 0.0), False
        pending = _Pending(inputs, tuple(outputs), batch_size, key, future, deadline,
                           from_policy, dict(top_k or {}))
        self._queue.put_nowait(pending)
        self._in_flight.enter()
        ok = False
        try:
            result = await future
            ok = True
            return result
        finally:
            self._in_flight.leave()
            queued = None if pending.started_ns is None else (
                pending.started_ns - pending.enqueued_ns)
            self.stats.record_request(ok, time.perf_counter_ns() - pending.enqueued_ns, queued)

    def _run_now(self, pending: _Pending) -> dict[str, OutputValue]:
        pending.started_ns = time.perf_counter_ns()
        ok = False
        try:
            (result,) = self._run_batch(self._runners[0], self._inline_buffers, [pending])
            ok = True
            return result
        except ServingError:
            raise
        except Exception as exc:
            log.exception("batch of model %s failed", self._name)
            raise InferenceFailedError(f"model {self._name} failed: {exc}") from exc
        finally:
            self.stats.record_request(ok, time.perf_counter_ns() - pending.enqueued_ns, 0)

    async def _next(self, timeout: float | None) -> _Pending | None:
        while True:
            if self._carry:
                pending = self._carry.popleft()
            elif timeout is None:
                pending = await self._queue.get()
            elif timeout <= 0:
                if self._queue.empty():
                    return None
                pending = self._queue.get_nowait()
            else:
                got = await self._get_within(timeout)
                if got is None:
                    return None
                pending = got
            if pending.future.done():  # skip requests whose caller is gone
                continue
            if pending.deadline is not None and time.monotonic() > pending.deadline:
                if not self._expire(pending):
                    continue
            return pending

    def _expire(self, pending: _Pending) -> bool:
        """Handle a request whose deadline passed in the queue; True if it may still run."""
        waited = (time.perf_counter_ns() - pending.enqueued_ns) / 1e6
        if pending.policy_deadline and self._policy.timeout_action == "delay":
            # Triton's DELAY: the request loses its place, and its deadline, and waits
            # behind everything queued now.
            pending.deadline = None
            if self._queue.empty() and not self._carry:
                return True
            self._queue.put_nowait(pending)
            return False
        reason = ("the model's queue timeout" if pending.policy_deadline
                  else "the request's deadline")
        pending.future.set_exception(DeadlineExceededError(
            f"model {self._name}: request dropped after {waited:.1f} ms in the queue "
            f"({reason} passed before a batch formed)"))
        return False

    async def _get_within(self, timeout: float) -> _Pending | None:
        # Not asyncio.wait_for: on Python 3.11 it can drop an item that arrives as the
        # timeout fires.
        getter = asyncio.ensure_future(self._queue.get())
        done, _ = await asyncio.wait({getter}, timeout=timeout)
        if getter not in done:
            getter.cancel()
            try:
                return await getter
            except asyncio.CancelledError:
                return None
        return getter.result()

    async def _gather(self) -> list[_Pending]:
        first = await self._next(None)
        assert first is not None
        batch = [first]
        if not self._batching:
            return batch
        size = first.batch_size
        deadline = time.monotonic() + self._max_delay_s
        while size < self._target:
            nxt = await self._next(deadline - time.monotonic())
            if nxt is None:
                break
            if nxt.key != first.key or size + nxt.batch_size > self._max_batch_size:
                self._carry.appendleft(nxt)
                break
            batch.append(nxt)
            size += nxt.batch_size
        return batch

    async def _work(self, runner: Instance) -> None:
        loop = asyncio.get_running_loop()
        buffers = _Buffers(max(self._max_batch_size, 1), runner.host_buffer)
        while True:
            batch = await self._gather()
            started = time.perf_counter_ns()
            for pending in batch:
                pending.started_ns = started
            try:
                if self._inline:
                    results = self._run_batch(runner, buffers, batch)
                else:
                    results = await loop.run_in_executor(
                        self._executor, self._run_batch, runner, buffers, batch
                    )
            except InvalidInputError as exc:
                # One request's input the model cannot compute must not fail the others
                # batched with it: run each alone, so only the culprits fail.
                if len(batch) == 1:
                    self._settle(batch, [exc])
                elif self._inline:
                    self._settle(batch, self._run_each(runner, buffers, batch))
                else:
                    self._settle(batch, await loop.run_in_executor(
                        self._executor, self._run_each, runner, buffers, batch))
                continue
            except asyncio.CancelledError:
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(
                            UnavailableError(f"model {self._name} was unloaded")
                        )
                raise
            except Exception as exc:
                if not isinstance(exc, InferenceFailedError):
                    log.exception("batch of model %s failed", self._name)
                    exc = InferenceFailedError(f"model {self._name} failed: {exc}")
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            for pending, outputs in zip(batch, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(outputs)

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
