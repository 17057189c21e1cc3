"""Prometheus metrics: per model version counters and histograms, plus gauges read at scrape.

Served over HTTP by prometheus-client (``--metrics-port``, default 8002, 0 = off). On the
request path nothing but integers and floats are added up: a request's status and
duration on the event loop's thread (``Metrics.observe_request``), a batch's and a
request's figures by the model version's statistics under their own lock
(``VersionMetrics``, called from serving/observability/statistics.py); the metric families
are built from those totals when /metrics is scraped. (prometheus-client's own Counter and
Histogram take a lock and resolve their labels on every update, a third of onnxserve's
per-request bookkeeping on a tiny model.) Gauges (in flight, queue depth, model state) are
computed at scrape too. Unknown model names are counted under ``model="_unknown"``: request
contents never become label values.
"""

from __future__ import annotations

import bisect
import logging
import socket
import threading
import weakref
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

UNKNOWN_MODEL = "_unknown"
#: what generate_latest writes: Prometheus' text format 0.0.4 (the one Triton serves)
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    """Observations counted into buckets (upper bounds, ``le``), and their sum. Not locked:
    its owner serialises updates."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def samples(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative ``(le, count)`` buckets and the sum, as HistogramMetricFamily takes."""
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            buckets.append((bound, total))
        return buckets, self.sum


class VersionMetrics:
    """One model version's batch and queue figures; ModelStats updates them under its lock."""

    def __init__(self, owner: Metrics | None = None, key: tuple[str, str] = ("", "")) -> None:
        #: the Metrics that serves these figures (weak: no reference cycle through it)
        self._owner = weakref.ref(owner) if owner is not None else None
        self._key = key
        #: loaded schedulers reporting here (a reload of the same version shares them)
        self.users = 0
        self.inferences = 0
        self.executions = 0
        self.batch_size = Histogram(_BATCH_BUCKETS)
        self.compute_seconds = Histogram(_LATENCY_BUCKETS)
        self.queue_seconds = Histogram(_LATENCY_BUCKETS)

    def batch(self, samples: int, compute_s: float) -> None:
        self.executions += 1
        self.inferences += samples
        self.batch_size.observe(samples)
        self.compute_seconds.observe(compute_s)

    def queued(self, queue_s: float) -> None:
        self.queue_seconds.observe(queue_s)

    def close(self) -> None:
        """A scheduler reporting here closed (its model version was unloaded or replaced)."""
        owner = self._owner() if self._owner is not None else None
        if owner is not None:
            owner.release_version(self._key, self)


class Metrics:
    """All of onnxserve's metric families, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        #: (model, version) -> that version's batch figures, while a scheduler reports there
        self._versions: dict[tuple[str, str], VersionMetrics] = {}
        #: guards _versions (model loads run in threads)
        self._lock = threading.Lock()
        #: (model, version, protocol, status) -> answered requests (event loop only)
        self._requests: dict[tuple[str, str, str, str], int] = {}
        #: (model, version, protocol) -> durations of successful requests (event loop only)
        self._request_seconds: dict[tuple[str, str, str], Histogram] = {}
        #: (model, version, Triton's failure reason) -> failed requests (event loop only)
        self._failures: dict[tuple[str, str, str], int] = {}
        metrics = self

        class _Totals(Collector):
            def collect(self) -> Iterable[Metric]:
                return metrics._families()

        self.registry.register(_Totals())
        self._server: WSGIServer | None = None
        #: counter families exposed without the _total suffix (keep_names)
        self._unsuffixed: set[str] = set()

    def for_version(self, model: str, version: int) -> VersionMetrics:
        """The figures of a model version for one more scheduler (a reload of the same
        version adds to them); its ``close`` hands them back (``release_version``)."""
        key = (model, str(version))
        with self._lock:
            figures = self._versions.get(key)
            if figures is None:
                figures = self._versions[key] = VersionMetrics(self, key)
            figures.users += 1
            return figures

    def release_version(self, key: tuple[str, str], figures: VersionMetrics) -> None:
        """One scheduler of a model version is gone; when it was the last, the version's
        series go from /metrics (its batch figures and its request counts), as Triton
        drops a model version's metrics when the version unloads. Without this, a server
        that loads a new version number at every reload would keep every retired
        version's series, and their memory, for ever."""
        with self._lock:
            figures.users -= 1
            if figures.users > 0 or self._versions.get(key) is not figures:
                return
            del self._versions[key]
        # list(): one C-level copy, so the event loop's thread may add keys meanwhile (this
        # can run in a loader thread, for a load that failed part-way)
        for request_key in [k for k in list(self._requests) if k[:2] == key]:
            self._requests.pop(request_key, None)
        for seconds_key in [k for k in list(self._request_seconds) if k[:2] == key]:
            self._request_seconds.pop(seconds_key, None)
        for failure_key in [k for k in list(self._failures) if k[:2] == key]:
            self._failures.pop(failure_key, None)

    def observe_request(self, model: str, version: str, status: str, seconds: float,
                        protocol: str, failure_reason: str = "OTHER") -> None:
        """An inference request that came over ``protocol`` (grpc or http) answered with
        ``status`` (OK or the error code) after ``seconds``; a failure's ``failure_reason``
        is Triton's (``FAILURE_REASONS``). Call on the event loop's thread. A version whose
        figures were released (unloaded, or replaced while this request waited) is counted
        under version "", so that its series do not come back for ever."""
        if version and (model, version) not in self._versions:
            version = ""
        key = (model, version, protocol, status)
        self._requests[key] = self._requests.get(key, 0) + 1
        if status != "OK":
            failure = (model, version, failure_reason)
            self._failures[failure] = self._failures.get(failure, 0) + 1
        else:
            histogram = self._request_seconds.get((model, version, protocol))
            if histogram is None:
                histogram = self._request_seconds[(model, version, protocol)] = Histogram(
                    _LATENCY_BUCKETS)
            histogram.observe(seconds)

    def request_outcomes(self) -> dict[tuple[str, str], tuple[int, dict[str, int]]]:
        """(model, version) -> (requests answered OK, failed requests by Triton's reason),
        for the versions whose figures are held (call on the event loop's thread or at a
        scrape: the dicts are copied first)."""
        out: dict[tuple[str, str], tuple[int, dict[str, int]]] = {
            key: (0, {}) for key in list(self._versions)}
        for (model, version, _protocol, status), count in list(self._requests.items()):
            if status == "OK" and (model, version) in out:
                ok, failed = out[(model, version)]
                out[(model, version)] = (ok + count, failed)
        for (model, version, reason), count in list(self._failures.items()):
            if (model, version) in out:
                out[(model, version)][1][reason] = count
        return out

    def _families(self) -> list[Metric]:
        """The counters and histograms, from the totals (at each scrape)."""
        labels = ["model", "version"]
        requests = CounterMetricFamily(
            "onnxserve_requests", "Inference requests answered, by transport (grpc, http) "
            "and status (OK or the canonical error code)",
            labels=[*labels, "protocol", "status"])
        for status_key, count in list(self._requests.items()):
            requests.add_metric(list(status_key), count)
        inferences = CounterMetricFamily(
            "onnxserve_inferences", "Samples computed (a request may carry several)",
            labels=labels)
        executions = CounterMetricFamily("onnxserve_executions", "Model runs (batches)",
                                         labels=labels)
        histograms = {
            "request": HistogramMetricFamily(
                "onnxserve_request_duration_seconds", "Time from receiving an inference "
                "request to its answer, in the server, by transport (grpc, http)",
                labels=[*labels, "protocol"]),
            "queue": HistogramMetricFamily(
                "onnxserve_queue_duration_seconds", "Time a request waited for its batch "
                "to start", labels=labels),
            "compute": HistogramMetricFamily(
                "onnxserve_compute_duration_seconds", "Time of one model run (a batch): "
                "copying inputs, onnxruntime, splitting outputs", labels=labels),
            "batch": HistogramMetricFamily("onnxserve_batch_size", "Samples per model run",
                                           labels=labels),
        }
        for request_key, histogram in list(self._request_seconds.items()):
            histograms["request"].add_metric(list(request_key), *histogram.samples())
        for key, version in list(self._versions.items()):
            inferences.add_metric(list(key), version.inferences)
            executions.add_metric(list(key), version.executions)
            histograms["queue"].add_metric(list(key), *version.queue_seconds.samples())
            histograms["compute"].add_metric(list(key), *version.compute_seconds.samples())
            histograms["batch"].add_metric(list(key), *version.batch_size.samples())
        return [requests, inferences, executions, *histograms.values()]

    def watch(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Add metrics computed at each scrape by ``collect``."""

        class _Computed(Collector):
            def collect(self) -> Iterable[Metric]:
                return collect()

        self.registry.register(_Computed())

    def keep_names(self, counters: Iterable[str]) -> None:
        """Counter families whose samples carry their family's name, without the ``_total``
        suffix prometheus-client gives counters (Triton's ``nv_inference_*``): /metrics
        names them so in its HELP and TYPE lines too."""
        self._unsuffixed.update(counters)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format (0.0.4), as /metrics serves it."""
        text = generate_latest(self.registry)
        for name in self._unsuffixed:
            for kind in (b"HELP", b"TYPE"):
                text = text.replace(b"# %s %s_total " % (kind, name.encode()),
                                    b"# %s %s " % (kind, name.encode()))
        return text

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics (any path) over HTTP in a background thread; returns the bound
        port."""
        metrics = self

        def app(environ: dict, start_response: Callable) -> list[bytes]:
            body = metrics.exposition()
            start_response("200 OK", [("Content-Type", TEXT_FORMAT),
                                      ("Content-Length", str(len(body)))])
            return [body] if environ.get("REQUEST_METHOD") != "HEAD" else []

        class Server(ThreadingMixIn, WSGIServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        class Quiet(WSGIRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

        server = make_server(host, port, app, Server, handler_class=Quiet)
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
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
            # a copy: loads and unloads change it on the event loop's thread meanwhile
            for number, version in list(entry.model.versions.items()):
                in_flight.add_metric((entry.name, str(number)), version.scheduler.in_flight)
                queued.add_metric((entry.name, str(number)), version.scheduler.queued)
                placed: dict[tuple[str, str], int] = {}
                for instance in version.instances:
                    key = (instance.device.describe(), instance.provider)
                    placed[key] = placed.get(key, 0) + 1
                for (device, provider), count in placed.items():
                    instances.add_metric((entry.name, str(number), device, provider), count)
        return [in_flight, queued, state, instances]

    return collect
