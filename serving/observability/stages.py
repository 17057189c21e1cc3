"""Where a request's time goes on the server, stage by stage (``--stage-timing``).

Off by default: each timed stage costs two clock reads. On, every ModelInfer adds the
nanoseconds of each stage it went through to process-wide totals, which /metrics serves as
``onnxserve_stage_seconds_total{stage}`` and ``onnxserve_stage_count_total{stage}`` (so a
benchmark can read the mean per request from two scrapes) and the server logs at exit.
The batcher's own stages (queue wait, input copy, onnxruntime run, output split) are in
ModelStatistics and the per-version histograms; these are the rest of the handler:

    build     the front end's request object from the message (no tensor decoded yet)
    validate  the declared inputs against the model's rules
    decode    each tensor's payload into an array (views of the message's bytes)
    images    encoded images decoded (off the event loop, so waiting here is not busy)
    prepare   reshape, output checks, classification and timeout parameters
    batch     handed to the batcher until its result came back (queue + run + split)
    strings   classification results formatted
    observe   the request's metrics
    encode    the answer message built
    handler   the whole handler, from its first line to its return
"""

from __future__ import annotations

import logging
import time

from prometheus_client.core import CounterMetricFamily

log = logging.getLogger(__name__)

STAGES = ("build", "validate", "decode", "images", "prepare", "batch", "strings", "observe",
          "encode", "handler")
BUILD, VALIDATE, DECODE, IMAGES, PREPARE, BATCH, STRINGS, OBSERVE, ENCODE, HANDLER = range(
    len(STAGES))


class StageClock:
    """Process-wide totals per stage; ``enabled`` false makes every call a no-op."""

    def __init__(self) -> None:
        self.enabled = False
        self.ns = [0] * len(STAGES)
        self.count = [0] * len(STAGES)

    def add(self, stage: int, started_ns: int) -> int:
        """Add the time since ``started_ns`` to ``stage``; returns now (the next stage's
        start). Only call when ``enabled``."""
        now = time.perf_counter_ns()
        self.ns[stage] += now - started_ns
        self.count[stage] += 1
        return now

    def summary(self) -> str:
        """``stage mean_us (count)`` for every stage that ran."""
        return ", ".join(f"{name} {self.ns[i] / self.count[i] / 1e3:.1f} us ({self.count[i]})"
                         for i, name in enumerate(STAGES) if self.count[i])


    def metric_families(self) -> list[CounterMetricFamily]:
        """The totals as Prometheus counters (read at each scrape)."""
        seconds = CounterMetricFamily("onnxserve_stage_seconds", "Server time spent in each "
                                      "stage of ModelInfer requests (--stage-timing)",
                                      labels=("stage",))
        count = CounterMetricFamily("onnxserve_stage_count", "ModelInfer requests that went "
                                    "through each stage (--stage-timing)", labels=("stage",))
        for i, name in enumerate(STAGES):
            seconds.add_metric((name,), self.ns[i] / 1e9)
            count.add_metric((name,), self.count[i])
        return [seconds, count]


#: the process's clock (the server enables it with --stage-timing)
CLOCK = StageClock()
