"""One model version's queue: the requests waiting for a batch, their deadlines, the queue
policy, and callers that leave.

A request stays queued, and so can leave, until a batch takes it (``withdraw``): a caller
that goes away (its task cancelled: a gRPC cancel or deadline, a closed stream or HTTP
connection) takes its request out at once, and a request whose deadline passes is failed at
that moment, so neither is ever computed. The queue policy's timeout (Triton's
``default_queue_policy``) acts at the timeout: REJECT fails the request with Triton's
UNAVAILABLE "Request timeout expired", DELAY moves it behind every request that has not
timed out, those queued later included.

All deadlines share one ordered heap and one timer (a timer per request cost a third of
the queue's time). Runs on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from onnxserve.serving.errors import DeadlineExceededError, QueueTimeoutError
from onnxserve.serving.types import RequestTiming

#: which of a request's deadlines an entry of the deadline heap is for
_CALLER, _QUEUE = "caller", "queue"
#: withdrawn entries the deadline heap may hold before it is rebuilt without them
_STALE_KEPT = 64


def _unchanged() -> None:
    """``on_change`` of a closed queue."""


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

    def timeout_for(self, timeout_us: int | None) -> float:
        """Seconds a request with its own ``timeout_us`` parameter may wait (0: no limit).

        Triton's ModelQueuePolicy: with allow_timeout_override a request "can set a timeout
        that is less than the default timeout value but may not increase the timeout".
        """
        if not (timeout_us and self.allow_timeout_override):
            return self.timeout_s
        asked = timeout_us / 1e6
        return min(self.timeout_s, asked) if self.timeout_s else asked


@dataclass(eq=False)  # queued by identity
class QueuedRequest:
    """One request for a batch: its inputs, what it wants back, and where its answer goes."""

    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...]
    #: the request's own leading dimension (0 for models without batching)
    batch_size: int
    #: requests batch together only when these match (assembly.batch_key)
    key: tuple
    future: asyncio.Future
    #: outputs asked for as their k best classes (the classification extension)
    top_k: dict[str, int] = field(default_factory=dict)
    #: time.perf_counter() at which the caller's deadline passes (None: no deadline)
    caller_deadline: float | None = None
    #: time.perf_counter() at which the queue policy's timeout expires (None: no timeout,
    #: or it expired and the request was delayed)
    queue_deadline: float | None = None
    #: the nearer of the two deadlines while it is in the deadline heap
    armed_at: float | None = None
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)
    started_ns: int | None = None
    #: filled with its batch's times when the request is traced (None: not traced)
    timing: RequestTiming | None = None


class RequestQueue:
    """The requests waiting for a batch, oldest first, then those the policy delayed.

    ``on_change`` is called whenever a request joins or leaves (the scheduler wakes the
    worker forming a batch); ``name`` names the model in failures.
    """

    def __init__(self, name: str, policy: QueuePolicy, on_change: Callable[[], None]) -> None:
        self._name = name
        self._policy = policy
        self._on_change = on_change
        #: dicts as ordered sets: a caller that leaves is taken out at once
        self._waiting: dict[QueuedRequest, None] = {}
        self._delayed: dict[QueuedRequest, None] = {}
        #: (time, order, request, kind) of the queued requests' nearer deadlines; entries of
        #: requests no longer queued are skipped, or dropped when many
        self._deadlines: list[tuple[float, int, QueuedRequest, str]] = []
        self._order = itertools.count()
        self._stale = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def __len__(self) -> int:
        return len(self._waiting) + len(self._delayed)

    def __iter__(self) -> Iterator[QueuedRequest]:
        """The queued requests in the order batches take them."""
        return itertools.chain(self._waiting, self._delayed)

    def add(self, request: QueuedRequest) -> None:
        """Queue ``request``; its deadlines (if any) start counting."""
        self._waiting[request] = None
        self._arm(request)
        self._on_change()

    def withdraw(self, request: QueuedRequest) -> bool:
        """Take ``request`` out of the queue (and its deadline out of the heap); whether it
        was queued."""
        if request.armed_at is not None:
            request.armed_at = None
            self._stale += 1
            if self._stale > _STALE_KEPT and self._stale * 2 > len(self._deadlines):
                self._deadlines = [e for e in self._deadlines if e[2].armed_at == e[0]]
                heapq.heapify(self._deadlines)
                self._stale = 0
        for queue in (self._waiting, self._delayed):
            if request in queue:
                del queue[request]
                self._on_change()
                return True
        return False

    def close(self) -> list[QueuedRequest]:
        """Empty the queue, stop its timer and let go of ``on_change`` (the scheduler's: kept,
        it would hold the scheduler in a reference cycle after close); returns the requests
        that were queued."""
        left = list(self)
        for request in left:
            self.withdraw(request)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadlines.clear()
        self._stale = 0
        self._on_change = _unchanged
        return left

    # --- deadlines -------------------------------------------------------------------------

    def _arm(self, request: QueuedRequest) -> None:
        """Put the nearer of ``request``'s deadlines (if any) in the deadline heap."""
        caller, queue = request.caller_deadline, request.queue_deadline
        if caller is None and queue is None:
            return
        if queue is None or (caller is not None and caller <= queue):
            at, kind = cast(float, caller), _CALLER
        else:
            at, kind = queue, _QUEUE
        request.armed_at = at
        heapq.heappush(self._deadlines, (at, next(self._order), request, kind))
        if self._timer is None or at < self._timer_at:
            self._set_timer()

    def _set_timer(self) -> None:
        """(Re)set the one timer for the first live deadline of the heap."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        heap = self._deadlines
        while heap and heap[0][2].armed_at != heap[0][0]:
            heapq.heappop(heap)
            self._stale -= 1
        if heap:
            self._timer_at = heap[0][0]
            self._timer = asyncio.get_running_loop().call_later(
                max(heap[0][0] - time.perf_counter(), 0.0), self._deadlines_passed)

    def _deadlines_passed(self) -> None:
        """The deadline timer fired: act on every deadline passed, then set it again."""
        self._timer = None
        heap, now = self._deadlines, time.perf_counter()
        while heap and heap[0][0] <= now:
            at, _, request, kind = heapq.heappop(heap)
            if request.armed_at != at:
                self._stale -= 1  # withdrawn, or its deadline changed
                continue
            request.armed_at = None
            self._expire(request, kind)
        self._set_timer()

    def _expire(self, request: QueuedRequest, kind: str) -> None:
        """A queued request's deadline (``kind``) passed: fail it now, or, for the queue
        policy's DELAY, move it behind the requests that have not timed out (Triton's
        ModelQueuePolicy: "delay the request until all other requests at the same (or
        higher) priority levels that have not reached their timeouts are processed")."""
        if request not in self._waiting and request not in self._delayed:
            return  # running or answered: too late to drop it
        waited_ms = (time.perf_counter_ns() - request.enqueued_ns) / 1e6
        if kind == _QUEUE and self._policy.timeout_action == "delay":
            request.queue_deadline = None
            del self._waiting[request]
            self._delayed[request] = None
            self._arm(request)  # the caller's own deadline still holds
            self._on_change()
            return
        self.withdraw(request)
        if request.future.done():
            return
        if kind == _CALLER:
            request.future.set_exception(DeadlineExceededError(
                f"model {self._name}: request dropped after {waited_ms:.1f} ms in the queue "
                "(the request's deadline passed before its batch ran); it was not computed"))
        else:
            request.future.set_exception(QueueTimeoutError(
                f"model {self._name}: Request timeout expired after {waited_ms:.1f} ms in "
                "the queue (dynamic_batching.default_queue_policy: timeout_action REJECT; "
                "the timeout is default_timeout_microseconds, or the request's 'timeout' "
                "parameter where allow_timeout_override is true); it was not computed"))
