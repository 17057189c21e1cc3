"""Per-model-version inference statistics, as Triton's ModelStatistics reports them.

Durations are cumulative nanoseconds. ``inference_count`` counts samples, and
``execution_count`` model runs (a batch of 8 from 3 requests: 8 and 1).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(frozen=True, slots=True)
class StatisticDuration:
    """``count`` events that took ``ns`` nanoseconds in all (Triton's StatisticDuration)."""

    count: int
    ns: int


@dataclass(frozen=True, slots=True)
class BatchStatistics:
    """The model runs of one batch size (as run: padded rows included)."""

    batch_size: int
    compute_input: StatisticDuration
    compute_infer: StatisticDuration
    compute_output: StatisticDuration


@dataclass(frozen=True, slots=True)
class VersionStatistics:
    """One model version's statistics read at one moment, as plain values: what the data
    plane hands the front ends, which encode them (gRPC's ModelStatistics, HTTP's
    statistics extension) without touching the live counters a scheduler updates."""

    name: str
    version: str
    last_inference_ms: int
    inference_count: int
    execution_count: int
    success: StatisticDuration
    fail: StatisticDuration
    queue: StatisticDuration
    compute_input: StatisticDuration
    compute_infer: StatisticDuration
    compute_output: StatisticDuration
    #: by batch size, smallest first
    batches: tuple[BatchStatistics, ...]


def _value(duration: Duration) -> StatisticDuration:
    return StatisticDuration(duration.count, duration.ns)


class StatsObserver(Protocol):
    def batch(self, samples: int, compute_s: float) -> None: ...

    def queued(self, queue_s: float) -> None: ...

    def close(self) -> None: ...


class ModelStats:
    """Counters one scheduler updates; read by the ModelStatistics RPC and /metrics."""

    def __init__(self, observer: StatsObserver | None = None) -> None:
        #: also told of every update (the Prometheus metrics of this model version)
        self.observer = observer
        self._lock = threading.Lock()
        self.last_inference_ms = 0
        self.inference_count = 0
        self.execution_count = 0
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.batches: dict[int, BatchStats] = defaultdict(BatchStats)

    def record_batch(self, samples: int, input_ns: int, infer_ns: int, output_ns: int,
                     requests: int, executed: int | None = None) -> None:
        """One model execution of ``samples`` samples from ``requests`` requests, run as a
        batch of ``executed`` rows (more than ``samples`` when padded up to a bucket)."""
        with self._lock:
            self.execution_count += 1
            self.inference_count += samples
            self.last_inference_ms = int(time.time() * 1000)
            self.compute_input.add(input_ns, requests)
            self.compute_infer.add(infer_ns, requests)
            self.compute_output.add(output_ns, requests)
            batch = self.batches[executed or samples]
            batch.compute_input.add(input_ns)
            batch.compute_infer.add(infer_ns)
            batch.compute_output.add(output_ns)
            if self.observer is not None:
                self.observer.batch(samples, (input_ns + infer_ns + output_ns) / 1e9)

    def snapshot(self, name: str, version: str) -> VersionStatistics:
        """The counters now, as values (read under the lock: one batch's updates are all
        in or all out)."""
        with self._lock:
            return VersionStatistics(
                name, version, self.last_inference_ms, self.inference_count,
                self.execution_count, _value(self.success), _value(self.fail),
                _value(self.queue), _value(self.compute_input), _value(self.compute_infer),
                _value(self.compute_output),
                tuple(BatchStatistics(size, _value(batch.compute_input),
                                      _value(batch.compute_infer), _value(batch.compute_output))
                      for size, batch in sorted(self.batches.items())))

    def close(self) -> None:
        """The model version is gone: tell the observer once (its metrics may go) and stop
        telling it of updates."""
        with self._lock:
            observer, self.observer = self.observer, None
        if observer is not None:
            observer.close()

    def record_request(self, ok: bool, total_ns: int, queue_ns: int | None) -> None:
        """One request finished (``queue_ns`` is None when it never reached a batch)."""
        with self._lock:
            (self.success if ok else self.fail).add(total_ns)
            if queue_ns is not None:
                self.queue.add(queue_ns)
                if self.observer is not None:
                    self.observer.queued(queue_ns / 1e9)
