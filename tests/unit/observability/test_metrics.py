"""The request path's own histograms give what prometheus-client's would."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client import Histogram as PrometheusHistogram

from onnxserve.serving.observability.metrics import _LATENCY_BUCKETS, Histogram


def test_buckets_and_sums_match_prometheus_client() -> None:
    values = [*np.random.default_rng(0).exponential(0.003, 500), *_LATENCY_BUCKETS, 0.0, 99.0]
    ours = Histogram(_LATENCY_BUCKETS)
    registry = CollectorRegistry()
    theirs = PrometheusHistogram("h", "h", buckets=_LATENCY_BUCKETS, registry=registry)
    for value in values:
        ours.observe(value)
        theirs.observe(value)
    expected = {s.labels["le"]: s.value for family in registry.collect()
                for s in family.samples if s.name == "h_bucket"}
    buckets, total = ours.samples()
    assert {float(le): count for le, count in buckets} == {
        float(le): count for le, count in expected.items()}
    assert np.isclose(total, sum(values))


def test_request_metrics_are_labelled_by_protocol() -> None:
    from onnxserve.serving.observability.metrics import Metrics

    metrics = Metrics()
    metrics.for_version("m", 1)
    metrics.observe_request("m", "1", "OK", 0.001, "grpc")
    metrics.observe_request("m", "1", "OK", 0.002, "http")
    metrics.observe_request("m", "1", "OK", 0.003, "http")
    metrics.observe_request("m", "1", "NOT_FOUND", 0.001, "http")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in metrics.registry.collect() for s in family.samples}
    base = (("model", "m"),)
    assert samples[("onnxserve_requests_total",
                    (*base, ("protocol", "grpc"), ("status", "OK"), ("version", "1")))] == 1
    assert samples[("onnxserve_requests_total",
                    (*base, ("protocol", "http"), ("status", "OK"), ("version", "1")))] == 2
    assert samples[("onnxserve_requests_total", (*base, ("protocol", "http"),
                                                 ("status", "NOT_FOUND"), ("version", "1")))] == 1
    assert samples[("onnxserve_request_duration_seconds_count",
                    (*base, ("protocol", "http"), ("version", "1")))] == 2
    assert samples[("onnxserve_request_duration_seconds_count",
                    (*base, ("protocol", "grpc"), ("version", "1")))] == 1


def test_a_released_version_stays_released_when_its_last_callers_are_counted() -> None:
    """Requests failed by an unload are counted after the version's series went: under
    version "", not in a series of that version nothing would ever remove again."""
    from onnxserve.serving.observability.metrics import Metrics

    metrics = Metrics()
    figures = metrics.for_version("m", 7)
    metrics.observe_request("m", "7", "OK", 0.001, "grpc")
    metrics.release_version(("m", "7"), figures)
    metrics.observe_request("m", "7", "UNAVAILABLE", 0.001, "grpc")
    versions = {s.labels["version"] for family in metrics.registry.collect()
                for s in family.samples if s.name == "onnxserve_requests_total"}
    assert versions == {""}
