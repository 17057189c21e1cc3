"""Batch assembly: which queued requests make the next batch, the buffers their inputs are
copied into, padding up to a bucket, the run on an instance, and splitting its outputs back
to the requests (checking their rows).

A batch starts with the oldest queued request and takes the requests after it with the
same per-sample shapes and datatypes, counting samples (a request may carry its own batch),
until they reach the largest preferred batch size (or ``max_batch_size``), or until the
oldest of them has waited ``max_queue_delay`` (0: take what is queued when the instance
frees). With ``batch_buckets`` (GPU instances by default, see serving/runtime/accelerators.py)
a batch is padded with zero rows up to the smallest bucket that holds it, so the model only
ever sees the few batch shapes that were warmed up; the padding rows' outputs are dropped.
"""

from __future__ import annotations

import bisect
import collections
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from onnxserve.serving.batching.queue import QueuedRequest
from onnxserve.serving.errors import InferenceFailedError
from onnxserve.serving.observability.statistics import ModelStats
from onnxserve.serving.types import Instance, OutputValue, TopK

Allocate = Callable[[tuple[int, ...], np.dtype], np.ndarray]


def batch_key(inputs: dict[str, np.ndarray]) -> tuple:
    """What requests must share to be batched together: each input's name, datatype and
    per-sample shape."""
    return tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items()))


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


class Buffers:
    """Reusable input buffers of one instance, one per (input, dtype, sample shape).

    ``allocate`` makes them (the instance's: pinned host memory for a GPU instance). Only
    the most recently used ``KEEP`` are kept, for models whose sample shapes vary.
    """

    KEEP = 8

    def __init__(self, capacity: int, allocate: Allocate) -> None:
        self._capacity = capacity
        self._allocate = allocate
        self._buffers: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()

    def __len__(self) -> int:
        """How many buffers are kept."""
        return len(self._buffers)

    def holds(self, name: str, dtype: np.dtype, sample_shape: tuple[int, ...]) -> bool:
        """Whether a buffer for ``name`` with this datatype and sample shape is kept."""
        return (name, np.dtype(dtype).str, tuple(sample_shape)) in self._buffers

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


@dataclass(frozen=True)
class BatchPlan:
    """How one model version's batches are made: their sizes, how long they may wait for
    more requests, and the buckets they are padded up to."""

    #: the model's max_batch_size (0: no batch dimension)
    max_batch_size: int
    #: whether queued requests are batched together (else each runs alone)
    batching: bool
    #: samples at which a batch runs without waiting more (the largest preferred size)
    target: int
    #: seconds the oldest request of a batch may wait for more (max_queue_delay)
    max_delay_s: float
    #: batch sizes batches are padded up to (empty: none)
    buckets: tuple[int, ...]

    @classmethod
    def of(cls, max_batch_size: int, *, batching: bool = True, max_queue_delay_us: int = 0,
           preferred_batch_sizes: Sequence[int] = (),
           batch_buckets: Sequence[int] = ()) -> BatchPlan:
        """The plan of a dynamic_batching config (sizes outside 1..max_batch_size ignored)."""
        preferred = [p for p in preferred_batch_sizes if 0 < p <= max_batch_size]
        return cls(max_batch_size, batching and max_batch_size > 0,
                   max(preferred) if preferred else max_batch_size, max_queue_delay_us / 1e6,
                   tuple(sorted({b for b in batch_buckets if 0 < b <= max_batch_size})))

    def form(self, queued: Iterable[QueuedRequest]) -> tuple[list[QueuedRequest], float | None]:
        """The batch the queued requests (in queue order) make now, and how long it may
        still wait for more: 0 to run it now; None when nothing is queued."""
        queue = iter(queued)
        first = next(queue, None)
        if first is None:
            return [], None
        batch = [first]
        if not self.batching:
            return batch, 0.0
        size, oldest = first.batch_size, first.enqueued_ns
        full = size >= self.target
        while not full:
            nxt = next(queue, None)
            if nxt is None:
                break
            if nxt.key != first.key or size + nxt.batch_size > self.max_batch_size:
                full = True  # the batch cannot grow past this request: run it as it is
                break
            batch.append(nxt)
            size += nxt.batch_size
            oldest = min(oldest, nxt.enqueued_ns)
            full = size >= self.target
        if full or not self.max_delay_s:
            return batch, 0.0
        # Triton's max_queue_delay counts from the oldest request of the batch.
        waited = (time.perf_counter_ns() - oldest) / 1e9
        return batch, max(self.max_delay_s - waited, 0.0)

    def padded(self, rows: int) -> int:
        """The smallest bucket that holds ``rows`` (``rows`` itself without buckets)."""
        index = bisect.bisect_left(self.buckets, rows)
        return self.buckets[index] if index < len(self.buckets) else rows


def run_batch(plan: BatchPlan, instance: Instance, buffers: Buffers,
              batch: list[QueuedRequest], stats: ModelStats,
              where: str) -> list[dict[str, OutputValue]]:
    """Concatenate, run and split one batch (in a worker thread, or on the event loop for
    models run there): each request's outputs, its rows only. ``where`` names the model
    in failures.

    Raises:
        InferenceFailedError: an output without one row per batch row (check_output_rows).
        What the instance raises.
    """
    t0 = time.perf_counter_ns()
    wanted = list(dict.fromkeys(name for p in batch for name in p.outputs))
    top: dict[str, int] = {}
    for request in batch:
        for name, k in request.top_k.items():
            top[name] = max(top.get(name, 0), k)
    filled = sum(p.batch_size for p in batch)
    rows = plan.padded(filled) if plan.max_batch_size > 0 else filled
    if len(batch) == 1 and rows == filled:
        inputs = batch[0].inputs
    else:
        inputs = {name: buffers.concatenate(name, [p.inputs[name] for p in batch], rows)
                  for name in batch[0].inputs}
    t1 = time.perf_counter_ns()
    if top:
        outputs, best = instance.run_with_top_k(inputs, wanted, top)
    else:
        outputs, best = instance.run(inputs, wanted), {}
    t2 = time.perf_counter_ns()
    if plan.max_batch_size > 0:
        check_output_rows(where, rows, len(batch), outputs, best)
    if len(batch) == 1 and rows == filled and not top:
        results: list[dict[str, OutputValue]] = [cast(dict[str, OutputValue], outputs)]
    else:
        results = []
        start = 0
        for request in batch:
            stop = start + request.batch_size
            result: dict[str, OutputValue] = {
                name: outputs[name][start:stop] for name in request.outputs}
            for name, k in request.top_k.items():
                result[name] = best[name].rows(start, stop, k)
            results.append(result)
            start = stop
    samples = sum(max(p.batch_size, 1) for p in batch)
    t3 = time.perf_counter_ns()
    stats.record_batch(samples, t1 - t0, t2 - t1, t3 - t2, len(batch), max(rows, samples))
    for request in batch:
        timing = request.timing
        if timing is not None:
            timing.compute_start_ns, timing.input_end_ns = t0, t1
            timing.output_start_ns, timing.compute_end_ns = t2, t3
            timing.batch_size, timing.batch_requests = samples, len(batch)
    return results
