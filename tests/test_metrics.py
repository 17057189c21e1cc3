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
