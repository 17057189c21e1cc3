"""Per-model-version dynamic batcher: admit requests, run their batches, answer each.

The scheduler admits a request (queue bound, deadline already passed, closed) into its
queue (batching/queue.py: deadlines, the queue policy, callers that leave), and one worker
per model instance runs batches: one forms a batch at a time, as Triton's one batcher
thread feeds every instance (batching/assembly.py says which queued requests make it and
how long it may wait for more), takes its requests out of the queue, and hands it to the
dispatcher (batching/dispatch.py), which runs it on the instance in a thread and answers
each request with its own rows of the outputs, or its failure. Without batching, each
request runs alone.

A scheduler made with ``run_on_event_loop=True`` runs its batches on the event loop's own
thread instead: for models so small that the hand-off to a thread costs more than the run.
A request there that knows of no other in progress and finds the queue empty runs at once,
in its caller's task; requests that arrive together batch on the next event loop turn.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from onnxserve.serving.batching.assembly import BatchPlan, Buffers, batch_key
from onnxserve.serving.batching.dispatch import Dispatcher, fail
from onnxserve.serving.batching.inflight import InFlight
from onnxserve.serving.batching.queue import QueuedRequest, QueuePolicy, RequestQueue
from onnxserve.serving.errors import (
    DeadlineExceededError,
    QueueFullError,
    SchedulerClosedError,
)
from onnxserve.serving.observability.statistics import ModelStats
from onnxserve.serving.types import Instance, OutputValue, RequestTiming


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
        self._dispatcher = Dispatcher(self._plan, self.stats, name,
                                      threads=0 if run_on_event_loop else len(self._instances))
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
        fail(self._queue.close(), self._dispatcher.unloaded())
        # the run a cancelled worker left in its thread ends there; wait for it off the
        # event loop, which goes on serving the other models meanwhile
        await self._dispatcher.close()
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
        alone: bool = True,
        timing: RequestTiming | None = None,
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
        ``alone``: the caller knows of no other request in progress (serving/contract.py's
        OTHERS_IN_PROGRESS). On a scheduler that runs on the event loop, such a request
        that finds the queue empty runs at once, in the caller's task; any other is
        queued, and the worker forms its batch on the next event loop turn, with the
        requests that arrived with it.
        ``timing`` (a traced request's) is filled with the times the request was queued
        and its batch ran, and the batch's size.

        Raises:
            SchedulerClosedError: the scheduler was closed or is draining.
            QueueFullError: the queue holds ``max_queue_size`` requests (UNAVAILABLE, as
                Triton answers).
            DeadlineExceededError: the caller's deadline passed before the request ran.
            QueueTimeoutError: the queue policy's timeout (REJECT) expired first.
            UnavailableError: the model was unloaded while the request waited.
            InferenceFailedError, InvalidInputError: the run failed.
            What ``then`` raises.
        """
        self._admit(time_remaining, top_k)
        inputs = self._instances[0].prepare(inputs)
        future = asyncio.get_running_loop().create_future()
        if alone and self._inline and not self._plan.max_delay_s and not len(self._queue):
            # Nothing waits to join it: run it now, without the round trip through the
            # worker task (two event loop turns, a third of a tiny model's time), and
            # without the queue's bookkeeping (it cannot expire: it never waits).
            lone = QueuedRequest(inputs, tuple(outputs), batch_size, (), future,
                                 top_k=dict(top_k or {}), timing=timing)
            if timing is not None:
                timing.enqueued_ns = lone.enqueued_ns
            return self._run_now(lone, then)
        request = QueuedRequest(inputs, tuple(outputs), batch_size,
                                batch_key(inputs) if self._plan.batching else (), future,
                                dict(top_k or {}), timing=timing)
        if timing is not None:
            timing.enqueued_ns = request.enqueued_ns
        self._set_deadlines(request, time_remaining, timeout_us)
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

    def _admit(self, time_remaining: float | None, top_k: dict[str, int] | None) -> None:
        """Refuse a request the scheduler cannot take now (see ``infer``'s Raises)."""
        if self._closed:
            raise SchedulerClosedError(f"model {self._name} is not accepting requests")
        max_queue_size = self._policy.max_queue_size
        if max_queue_size and len(self._queue) >= max_queue_size:
            self.stats.record_request(False, 0, None)
            raise QueueFullError(
                f"model {self._name}: the queue is full ({max_queue_size} requests "
                "waiting, max_queue_size); retry later"
            )
        if top_k and self._plan.max_batch_size <= 0:
            raise ValueError("top_k needs a model with a batch dimension")
        if time_remaining is not None and time_remaining <= 0:
            self.stats.record_request(False, 0, None)
            raise DeadlineExceededError(
                f"model {self._name}: the request's deadline passed before it was queued "
                f"({-time_remaining * 1e3:.1f} ms ago); it was not computed")

    def _set_deadlines(self, request: QueuedRequest, time_remaining: float | None,
                       timeout_us: int | None) -> None:
        """Arm the request's queue timeout (the policy's) and its caller's deadline."""
        now = time.perf_counter()
        timeout_s = self._policy.timeout_for(timeout_us)
        if timeout_s:
            request.queue_deadline = now + timeout_s
        if time_remaining is not None:
            request.caller_deadline = now + time_remaining

    def _run_now(self, request: QueuedRequest,
                 then: Callable[[dict[str, OutputValue]], Any] | None) -> Any:
        ok = False
        try:
            result = self._dispatcher.run_now(self._instances[0], self._inline_buffers, request)
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

    # --- running batches -------------------------------------------------------------------

    async def _work(self, instance: Instance) -> None:
        buffers = Buffers(max(self._plan.max_batch_size, 1), instance.host_buffer)
        while True:
            batch = await self._gather()
            try:
                await self._dispatcher.dispatch(instance, buffers, batch)
            except asyncio.CancelledError:  # closed: no request taken is left unanswered
                fail(batch, self._dispatcher.unloaded())
                raise
            except Exception as exc:  # a bug here, not in the run: answer, and go on
                fail(batch, self._dispatcher.failure(exc))
