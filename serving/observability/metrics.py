"""Prometheus metrics: per model version counters and histograms, plus gauges read at scrape.

Served over HTTP by prometheus-client (``--metrics-port``, default 8002, 0 = off). Counters
and histograms are updated on the request path through label children resolved once per
model version; gauges (in flight, queue depth, model state) are computed when scraped, so
they cost nothing per request. Unknown model names are counted under ``model="_unknown"``:
request contents never become label values.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

UNKNOWN_MODEL = "_unknown"
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class VersionMetrics:
    """The metric children of one model version; ModelStats calls it on every update."""

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        labels = (model, version)
        self._queue = metrics.queue_seconds.labels(*labels)
        self._compute = metrics.compute_seconds.labels(*labels)
        self._batch = metrics.batch_size.labels(*labels)
        self._inferences = metrics.inferences.labels(*labels)
        self._executions = metrics.executions.labels(*labels)

    def batch(self, samples: int, compute_s: float) -> None:
        self._executions.inc()
        self._inferences.inc(samples)
        self._batch.observe(samples)
        self._compute.observe(compute_s)

    def queued(self, queue_s: float) -> None:
        self._queue.observe(queue_s)


class Metrics:
    """All of onnxserve's metric families, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("model", "version")
        self.requests = Counter(
            "onnxserve_requests", "ModelInfer requests answered, by gRPC status "
            "(OK or the error code)", (*labels, "status"), registry=self.registry)
        self.inferences = Counter(
            "onnxserve_inferences", "Samples computed (a request may carry several)", labels,
            registry=self.registry)
        self.executions = Counter(
            "onnxserve_executions", "Model runs (batches)", labels, registry=self.registry)
        self.request_seconds = Histogram(
            "onnxserve_request_duration_seconds", "Time from receiving a ModelInfer request "
            "to its answer, in the server", labels, buckets=_LATENCY_BUCKETS,
            registry=self.registry)
        self.queue_seconds = Histogram(
            "onnxserve_queue_duration_seconds", "Time a request waited for its batch to start",
            labels, buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.compute_seconds = Histogram(
            "onnxserve_compute_duration_seconds", "Time of one model run (a batch): copying "
            "inputs, onnxruntime, splitting outputs", labels, buckets=_LATENCY_BUCKETS,
            registry=self.registry)
        self.batch_size = Histogram(
            "onnxserve_batch_size", "Samples per model run", labels, buckets=_BATCH_BUCKETS,
            registry=self.registry)
        self._server: WSGIServer | None = None

    def for_version(self, model: str, version: int) -> VersionMetrics:
        return VersionMetrics(self, model, str(version))

    def observe_request(self, model: str, version: str, status: str, seconds: float) -> None:
        self.requests.labels(model, version, status).inc()
        if status == "OK":
            self.request_seconds.labels(model, version).observe(seconds)

    def watch(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Add metrics computed at each scrape by ``collect``."""

        class _Computed(Collector):
            def collect(self) -> Iterable[Metric]:
                return collect()

        self.registry.register(_Computed())

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP in a background thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


def registry_gauges(entries: Callable[[], Iterable]) -> Callable[[], list[GaugeMetricFamily]]:
    """Gauges of in-flight requests, queue depth, model state and instances per provider."""

    def collect() -> list[GaugeMetricFamily]:
        in_flight = GaugeMetricFamily("onnxserve_inflight_requests",
                                      "Requests admitted and not yet answered",
                                      labels=("model", "version"))
        queued = GaugeMetricFamily("onnxserve_queue_depth",
                                   "Requests waiting for a batch", labels=("model", "version"))
        state = GaugeMetricFamily("onnxserve_model_state",
                                  "1 for the model's current state (READY, LOADING, "
                                  "UNAVAILABLE, UNLOADING)", labels=("model", "state"))
        instances = GaugeMetricFamily("onnxserve_model_instances",
                                      "Sessions of a model version, by the device and the "
                                      "execution provider they really run on",
                                      labels=("model", "version", "device", "provider"))
        for entry in entries():
            if entry.state:
                state.add_metric((entry.name, entry.state), 1)
            if entry.model is None:
                continue
            for number, version in entry.model.versions.items():
                in_flight.add_metric((entry.name, str(number)), version.scheduler.in_flight)
                queued.add_metric((entry.name, str(number)), version.scheduler.queued)
                placed: dict[tuple[str, str], int] = {}
                for runner in version.runners:
                    key = (runner.device.describe(), runner.provider)
                    placed[key] = placed.get(key, 0) + 1
                for (device, provider), count in placed.items():
                    instances.add_metric((entry.name, str(number), device, provider), count)
        return [in_flight, queued, state, instances]

    return collect
