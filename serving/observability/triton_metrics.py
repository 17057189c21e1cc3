"""Triton's Prometheus metric families (``nv_inference_*``), beside onnxserve's own.

Triton's dashboards and alerts read these names, so onnxserve serves them with Triton's
names, types, units, labels and HELP texts (Triton's core ``src/metrics.cc`` and
docs/user_guide/metrics.md): counters without a ``_total`` suffix, durations as cumulative
integer microseconds, labels ``model`` and ``version``. They are computed at each scrape
from the figures onnxserve keeps anyway, so the request path is unchanged:

- each model version's statistics (serving/observability/statistics.py, the figures of
  Triton's statistics extension, from which Triton derives these metrics too):
  inferences (samples), executions (batches), and the cumulative durations of successful
  requests, of their wait in the queue and of their batches' compute phases, the batch's
  phases added once per request in it, as Triton adds them;
- the requests answered OK and the failures by Triton's reason (``FAILURE_REASONS``), from
  serving/observability/metrics.py;
- the requests waiting in the queue (``nv_inference_pending_request_count``).

Where onnxserve counts more than Triton: a request refused before it is queued (invalid
input, a full queue) is a failure with reason ``OTHER`` or ``REJECTED`` here, while Triton
answers such requests without counting them. A model version's series go when it unloads,
as Triton's do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from onnxserve.serving.errors import (
    CANCELLED,
    DeadlineExceededError,
    InferenceFailedError,
    QueueFullError,
    QueueTimeoutError,
)
from onnxserve.serving.observability.metrics import Metrics

#: Triton's failure reasons (the ``reason`` label of nv_inference_request_failure, Triton
#: 24.08 on): a request rejected by the scheduler (queue full, queue or caller deadline
#: passed), cancelled by its caller, failed in the model's run, or anything else
FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")

_LABELS = ["model", "version"]
#: name -> HELP, as Triton writes them (core src/metrics.cc)
_COUNTERS = {
    "nv_inference_request_success": "Number of successful inference requests, all batch "
                                    "sizes",
    "nv_inference_request_failure": "Number of failed inference requests, all batch sizes",
    "nv_inference_count": "Number of inferences performed (does not include cached "
                          "requests)",
    "nv_inference_exec_count": "Number of model executions performed (does not include "
                               "cached requests)",
    "nv_inference_request_duration_us": "Cumulative inference request duration in "
                                        "microseconds (includes cached requests)",
    "nv_inference_queue_duration_us": "Cumulative inference queuing duration in "
                                      "microseconds (includes cached requests)",
    "nv_inference_compute_input_duration_us": "Cumulative compute input duration in "
                                              "microseconds (does not include cached "
                                              "requests)",
    "nv_inference_compute_infer_duration_us": "Cumulative compute inference duration in "
                                              "microseconds (does not include cached "
                                              "requests)",
    "nv_inference_compute_output_duration_us": "Cumulative inference compute output "
                                               "duration in microseconds (does not include "
                                               "cached requests)",
}
PENDING = "nv_inference_pending_request_count"
PENDING_HELP = "Instantaneous number of pending requests awaiting execution per-model."
#: every family this module serves
FAMILIES = (*_COUNTERS, PENDING)


def failure_reason(exc: BaseException | None, code: str) -> str:
    """Triton's reason for a failed request: its error ``exc`` (None: none was raised, as
    for a caller that left) and the canonical ``code`` it was answered with."""
    if isinstance(exc, (QueueFullError, QueueTimeoutError, DeadlineExceededError)):
        return "REJECTED"
    if isinstance(exc, InferenceFailedError):
        return "BACKEND"
    if isinstance(exc, asyncio.CancelledError) or exc is None:
        return "CANCELED" if code == CANCELLED else "REJECTED" if code == (
            DeadlineExceededError.code) else "OTHER"
    return "OTHER"


def _counter(name: str) -> Metric:
    """A counter whose samples carry the family's name (no ``_total``), as Triton's do."""
    return Metric(name, _COUNTERS[name], "counter")


def triton_families(entries: Callable[[], Iterable[Any]], metrics: Metrics
                    ) -> Callable[[], list[Metric]]:
    """The collector of Triton's families over the registry's ``entries`` (each with
    ``name`` and ``model``: its ``versions`` by number, each with a ``scheduler``) and the
    request outcomes ``metrics`` counts."""

    metrics.keep_names(_COUNTERS)

    def collect() -> list[Metric]:
        outcomes = metrics.request_outcomes()
        counters = {name: _counter(name) for name in _COUNTERS}
        pending = GaugeMetricFamily(PENDING, PENDING_HELP, labels=_LABELS)
        for entry in entries():
            if entry.model is None:
                continue
            # a copy: loads and unloads change it on the event loop's thread meanwhile
            for number, version in list(entry.model.versions.items()):
                labels = {"model": entry.name, "version": str(number)}
                stats = version.scheduler.stats.snapshot(entry.name, str(number))
                ok, failed = outcomes.get((entry.name, str(number)), (0, {}))

                def add(name: str, value: float, extra: dict[str, str] | None = None,
                        labels: dict[str, str] = labels) -> None:
                    counters[name].add_sample(name, {**labels, **(extra or {})}, value)

                add("nv_inference_request_success", ok)
                for reason in FAILURE_REASONS:
                    add("nv_inference_request_failure", failed.get(reason, 0),
                        {"reason": reason})
                add("nv_inference_count", stats.inference_count)
                add("nv_inference_exec_count", stats.execution_count)
                add("nv_inference_request_duration_us", stats.success.ns // 1000)
                add("nv_inference_queue_duration_us", stats.queue.ns // 1000)
                add("nv_inference_compute_input_duration_us", stats.compute_input.ns // 1000)
                add("nv_inference_compute_infer_duration_us", stats.compute_infer.ns // 1000)
                add("nv_inference_compute_output_duration_us",
                    stats.compute_output.ns // 1000)
                pending.add_metric([entry.name, str(number)], version.scheduler.queued)
        return [*counters.values(), pending]

    return collect
