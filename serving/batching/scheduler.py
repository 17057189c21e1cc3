"""Per-model-version dynamic batcher: admit requests, run their batches, answer each.

The scheduler admits a request (queue bound, deadline already passed, closed) into its
queue (batching/queue.py: deadlines, the queue policy, callers that leave), and one worker
per model instance runs batches: one forms a batch at a time, as Triton's one batcher
thread feeds every instance (batching/assembly.py says which queued requests make it and
how long it may wait for more), takes its requests out of the queue, runs it on its instance
in a thread, and answers each request with its own rows of the outputs, or its failure.
Without batching, each request runs alone. A batch that fails on one request's input is
rerun request by request, so only the culprits fail.

A scheduler made with ``run_on_event_loop=True`` runs its batches on the event loop's own
thread instead: for models so small that the hand-off to a thread costs more than the run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from onnxserve.serving.batching.assembly import BatchPlan, Buffers, batch_key, run_batch
from onnxserve.serving.batching.inflight import InFlight
from onnxserve.serving.batching.queue import QueuedRequest, QueuePolicy, RequestQueue
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
from onnxserve.serving.types import Instance, OutputValue

log = logging.getLogger(__name__)

Outcome = dict[str, OutputValue] | Exception


class Scheduler:
    """Queues and batches inference requests for one model version."""

    def __init__(
        self,
        instances: Sequence[Instance],
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
        if not instances:
            raise ValueError("a scheduler needs at least one instance")
        self._instances = list(instances)
        if run_on_event_loop and len(self._instances) != 1:
            raise ValueError("a scheduler that runs on the event loop takes exactly one instance")
        self._inline = run_on_event_loop
        self._inline_buffers = Buffers(max(max_batch_size, 1), self._instances[0].host_buffer)
        self._policy = queue_policy or QueuePolicy()
        self._plan = BatchPlan.of(max_batch_size, batching=batching,
                                  max_queue_delay_us=max_queue_delay_us,
                                  preferred_batch_sizes=preferred_batch_sizes,
                                  batch_buckets=batch_buckets)
        self._name = name
        self.stats = stats or ModelStats()
        self._queue = RequestQueue(name, self._policy, self._wake)
        #: one batch forms at a time; the worker forming it waits on ``_wakeup``
        self._forming = asyncio.Lock()
        self._wakeup: asyncio.Future[None] | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=len(self._instances), thread_name_prefix=f"run-{name}"
        )
        self._workers: list[asyncio.Task] = []
        self._closed = False
        self._in_flight = InFlight()

    @property
    def buckets(self) -> tuple[int, ...]:
        """The batch sizes batches are padded up to (empty: none)."""
        return self._plan.buckets

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet answered."""
        return self._in_flight.count

    @property
    def queued(self) -> int:
        """Requests waiting for a batch (not counting the ones running)."""
        return len(self._queue)

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start one worker task per instance on the running event loop."""
        loop = asyncio.get_running_loop()
        self._workers = [
            loop.create_task(self._work(r), name=f"batcher-{self._name}-{i}")
            for i, r in enumerate(self._instances)
        ]

    async def drain(self, timeout: float) -> bool:
        """Take no new requests and wait up to ``timeout`` s for the admitted ones to finish.

        Returns whether they all finished. ``close`` fails whatever is left.
        """
        self._closed = True
        return await self._in_flight.wait_idle(timeout)

    async def close(self) -> None:
        """Stop taking requests, fail what is still queued, stop the workers and their
        threads, and let go of the batch buffers and the statistics' metrics.

        Afterwards no batch runs and nothing of the scheduler refers back to it: a worker
        task ended by ``cancel`` keeps its CancelledError, whose traceback holds the
        worker's frames and so this scheduler, its instances and their sessions; kept in
        ``_workers`` that was a reference cycle, freed only by Python's cyclic garbage
        collector (every reload kept a retired version alive until it ran).
        """
        self._closed = True
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        self._fail(self._queue.close(), self._unloaded())
        # the run a cancelled worker left in its thread ends there; wait for it off the
        # event loop, which goes on serving the other models meanwhile
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        self._inline_buffers.clear()
        self.stats.close()

    # --- admission -------------------------------------------------------------------------

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
        if policy.max_queue_size and len(self._queue) >= policy.max_queue_size:
            self.stats.record_request(False, 0, None)
            raise ResourceExhaustedError(
                f"model {self._name}: the queue is full ({policy.max_queue_size} requests "
                "waiting, max_queue_size); retry later"
            )
        if top_k and self._plan.max_batch_size <= 0:
            raise ValueError("top_k needs a model with a batch dimension")
        if time_remaining is not None and time_remaining <= 0:
            self.stats.record_request(False, 0, None)
            raise DeadlineExceededError(
                f"model {self._name}: the request's deadline passed before it was queued "
                f"({-time_remaining * 1e3:.1f} ms ago); it was not computed")
        inputs = self._instances[0].prepare(inputs)
        future = asyncio.get_running_loop().create_future()
        if self._inline and not self._plan.max_delay_s and not len(self._queue):
            # Nothing waits to join it: run it now, without the round trip through the
            # worker task (two event loop turns, a third of a tiny model's time), and
            # without the queue's bookkeeping (it cannot expire: it never waits).
            return self._run_now(QueuedRequest(inputs, tuple(outputs), batch_size, (), future,
                                               top_k=dict(top_k or {})), then)
        key = batch_key(inputs) if self._plan.batching else ()
        request = QueuedRequest(inputs, tuple(outputs), batch_size, key, future,
                                dict(top_k or {}))
        now = time.perf_counter()
        timeout_s = policy.timeout_for(timeout_us)
        if timeout_s:
            request.queue_deadline = now + timeout_s
        if time_remaining is not None:
            request.caller_deadline = now + time_remaining
        self._queue.add(request)
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
            self._queue.withdraw(request)
            self._in_flight.leave()
            queued = None if request.started_ns is None else (
                request.started_ns - request.enqueued_ns)
            self.stats.record_request(ok, time.perf_counter_ns() - request.enqueued_ns, queued)

    def _run_now(self, request: QueuedRequest,
                 then: Callable[[dict[str, OutputValue]], Any] | None) -> Any:
        request.started_ns = time.perf_counter_ns()
        ok = False
        try:
            try:
                (result,) = self._run_batch(self._instances[0], self._inline_buffers, [request])
            except ServingError:
                raise
            except Exception as exc:
                raise self._failure(exc) from exc
            answer = result if then is None else then(result)
            ok = True
            return answer
        finally:
            self.stats.record_request(ok, time.perf_counter_ns() - request.enqueued_ns, 0)

    # --- forming batches -------------------------------------------------------------------

    def _wake(self) -> None:
        """Tell the worker forming a batch that the queue changed."""
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _gather(self) -> list[QueuedRequest]:
        """Wait for the next batch to be due and take its requests out of the queue."""
        async with self._forming:
            loop = asyncio.get_running_loop()
            while True:
                batch, wait = self._plan.form(self._queue)
                gone = [request for request in batch if request.future.done()]
                if gone:
                    # callers cancelled a moment ago, whose tasks have not yet run to take
                    # their requests out: take them out here, and form the batch anew
                    for request in gone:
                        self._queue.withdraw(request)
                    continue
                if batch and not wait:
                    for request in batch:
                        self._queue.withdraw(request)
                    return batch
                self._wakeup = waiter = loop.create_future()
                timer = None if wait is None else loop.call_later(wait, self._wake)
                try:
                    await waiter
                finally:
                    self._wakeup = None
                    if timer is not None:
                        timer.cancel()

    # --- dispatch and failures -------------------------------------------------------------

    async def _work(self, instance: Instance) -> None:
        buffers = Buffers(max(self._plan.max_batch_size, 1), instance.host_buffer)
        while True:
            batch = await self._gather()
            try:
                await self._dispatch(instance, buffers, batch)
            except asyncio.CancelledError:  # closed: no request taken is left unanswered
                self._fail(batch, self._unloaded())
                raise
            except Exception as exc:  # a bug here, not in the run: answer, and go on
                self._fail(batch, self._failure(exc))

    async def _dispatch(self, instance: Instance, buffers: Buffers,
                        batch: list[QueuedRequest]) -> None:
        """Run ``batch`` and answer each of its requests with its outputs or its failure."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter_ns()
        for request in batch:
            request.started_ns = started
        results: Sequence[Outcome]
        try:
            if self._inline:
                results = self._run_batch(instance, buffers, batch)
            else:
                results = await loop.run_in_executor(
                    self._executor, self._run_batch, instance, buffers, batch
                )
        except InvalidInputError as exc:
            # One request's input the model cannot compute must not fail the others
            # batched with it: run each alone, so only the culprits fail (and not those
            # whose callers left meanwhile).
            if len(batch) == 1:
                self._settle(batch, [exc])
                return
            batch = [request for request in batch if not request.future.done()]
            if not batch:
                return
            if self._inline:
                results = self._run_each(instance, buffers, batch)
            else:
                results = await loop.run_in_executor(
                    self._executor, self._run_each, instance, buffers, batch)
        except Exception as exc:
            self._fail(batch, self._failure(exc))
            return
        self._settle(batch, results)

    def _run_batch(self, instance: Instance, buffers: Buffers,
                   batch: list[QueuedRequest]) -> list[dict[str, OutputValue]]:
        return run_batch(self._plan, instance, buffers, batch, self.stats, f"model {self._name}")

    def _run_each(self, instance: Instance, buffers: Buffers,
                  batch: list[QueuedRequest]) -> list[Outcome]:
        """Run each request of a failed batch alone: its outputs, or its own failure."""
        results: list[Outcome] = []
        for request in batch:
            try:
                results.extend(self._run_batch(instance, buffers, [request]))
            except Exception as exc:
                results.append(self._failure(exc))
        return results

    def _failure(self, exc: Exception) -> ServingError:
        """What a request is failed with when its run raised ``exc``: a ServingError as it
        is; anything else (a bug, or the runtime's own error) logged with its traceback and
        answered as InferenceFailedError naming the model."""
        if isinstance(exc, ServingError):
            return exc
        log.error("batch of model %s failed", self._name, exc_info=exc)
        return InferenceFailedError(f"model {self._name} failed: {exc}")

    def _unloaded(self) -> UnavailableError:
        return UnavailableError(f"model {self._name} was unloaded")

    @staticmethod
    def _fail(batch: Sequence[QueuedRequest], exc: Exception) -> None:
        """Fail every request of ``batch`` not answered yet with ``exc``."""
        for request in batch:
            if not request.future.done():
                request.future.set_exception(exc)

    @staticmethod
    def _settle(batch: Sequence[QueuedRequest], results: Sequence[Outcome]) -> None:
        """Answer each request not answered yet with its result (outputs or failure)."""
        for request, result in zip(batch, results, strict=True):
            if request.future.done():
                continue
            if isinstance(result, Exception):
                request.future.set_exception(result)
            else:
                request.future.set_result(result)
