"""Triton's metric families on /metrics: names, types, units, labels and HELP as Triton's
metric documentation gives them, values that agree with the statistics extension, and the
Grafana dashboard under deploy/ asking only for metrics the server exports."""

from __future__ import annotations

import json
import re
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import ROOT
from support.repositories import build_test_models
from support.served import start_server

from onnxserve.clients.client import Client, InferenceServerError
from onnxserve.serving.process import ServerProcess

#: Triton's families (docs/user_guide/metrics.md; HELP as core src/metrics.cc writes it):
#: name -> (type, HELP). Counters are exposed without a _total suffix.
TRITON = {
    "nv_inference_request_success": (
        "counter", "Number of successful inference requests, all batch sizes"),
    "nv_inference_request_failure": (
        "counter", "Number of failed inference requests, all batch sizes"),
    "nv_inference_count": (
        "counter", "Number of inferences performed (does not include cached requests)"),
    "nv_inference_exec_count": (
        "counter", "Number of model executions performed (does not include cached requests)"),
    "nv_inference_request_duration_us": (
        "counter", "Cumulative inference request duration in microseconds (includes cached "
                   "requests)"),
    "nv_inference_queue_duration_us": (
        "counter", "Cumulative inference queuing duration in microseconds (includes cached "
                   "requests)"),
    "nv_inference_compute_input_duration_us": (
        "counter", "Cumulative compute input duration in microseconds (does not include "
                   "cached requests)"),
    "nv_inference_compute_infer_duration_us": (
        "counter", "Cumulative compute inference duration in microseconds (does not include "
                   "cached requests)"),
    "nv_inference_compute_output_duration_us": (
        "counter", "Cumulative inference compute output duration in microseconds (does not "
                   "include cached requests)"),
    "nv_inference_pending_request_count": (
        "gauge", "Instantaneous number of pending requests awaiting execution per-model."),
}
REQUESTS = 12


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[ServerProcess, str]:
    """A server that answered REQUESTS requests of 2 samples to add_one (version 2, the one
    loaded), and refused one; returns it and its /metrics text."""
    folder = tmp_path_factory.mktemp("triton_metrics")
    build_test_models(folder)
    server = start_server(folder, folder / "server.log", metrics=True)
    try:
        with Client(server.url) as client:
            for _ in range(REQUESTS):
                out = client.infer("add_one", {"x": np.zeros((2, 4), np.float32)},
                                   version="2")
                assert out["y"].shape == (2, 4)
            with pytest.raises(InferenceServerError, match="INVALID_ARGUMENT"):
                client.infer("add_one", {"x": np.zeros((2, 3), np.float32)},
                             version="2")
    except BaseException:
        server.stop()
        raise
    yield server, _scrape(server)
    server.stop()


def _scrape(server: ServerProcess) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                  timeout=10).read().decode()


def _values(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of family ``name`` (prometheus-client's parser names a counter's samples
    ``_total`` whatever the text says; the text's own names are checked above)."""
    return {tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name in (name, f"{name}_total")}


def test_families_have_tritons_names_types_help_and_labels(
        served: tuple[ServerProcess, str]) -> None:
    _, text = served
    for name, (kind, help_text) in TRITON.items():
        assert f"# HELP {name} {help_text}\n" in text, name
        assert f"# TYPE {name} {kind}\n" in text, name
        assert re.search(rf"^{name}\{{model=\"add_one\",(reason=\"OTHER\",)?version=\"2\"\}} ",
                         text, re.M), name
        assert f"{name}_total" not in text  # Triton's counters carry no suffix
    for name in TRITON:
        labels = {key for series in _values(text, name) for key, _ in series}
        expected = {"model", "version", "reason"} if name.endswith("failure") else {
            "model", "version"}
        assert labels == expected, (name, labels)


def test_values_mean_what_tritons_mean(served: tuple[ServerProcess, str]) -> None:
    server, text = served
    one = (("model", "add_one"), ("version", "2"))

    def value(name: str, **extra: str) -> float:
        return _values(text, name)[tuple(sorted((*one, *extra.items())))]

    assert value("nv_inference_request_success") == REQUESTS
    assert value("nv_inference_count") == 2 * REQUESTS  # samples
    assert 1 <= value("nv_inference_exec_count") <= REQUESTS  # batches
    failures = {reason: value("nv_inference_request_failure", reason=reason)
                for reason in ("REJECTED", "CANCELED", "BACKEND", "OTHER")}
    assert failures == {"REJECTED": 0, "CANCELED": 0, "BACKEND": 0, "OTHER": 1}
    assert value("nv_inference_pending_request_count") == 0
    with Client(server.url) as client:
        (stats,) = client.statistics("add_one", "2")
    # cumulative microseconds: the statistics extension's nanoseconds
    assert value("nv_inference_request_duration_us") == stats["success"]["ns"] // 1000 > 0
    assert value("nv_inference_queue_duration_us") == stats["queue"]["ns"] // 1000
    for phase in ("compute_input", "compute_infer", "compute_output"):
        assert value(f"nv_inference_{phase}_duration_us") == stats[phase]["ns"] // 1000
    assert value("nv_inference_compute_infer_duration_us") > 0
    # a version that served nothing has its series, at zero
    assert _values(text, "nv_inference_request_success")[
        (("model", "scores"), ("version", "1"))] == 0


#: PromQL words that are not metric names
_PROMQL = {"sum", "avg", "min", "max", "count", "rate", "irate", "increase", "by", "without",
           "histogram_quantile", "on", "ignoring", "group_left", "group_right", "and", "or",
           "unless", "offset", "bool", "topk", "bottomk", "label_values"}


def _metric_names(expr: str) -> set[str]:
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r",\s*[a-z_]+\)", ")", expr)  # label_values(metric, label)
    return {word for word in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr)
            if word not in _PROMQL}


def test_the_grafana_dashboard_asks_only_for_exported_metrics(
        served: tuple[ServerProcess, str]) -> None:
    _, text = served
    exported = {s.name for family in text_string_to_metric_families(text)
                for s in family.samples} | {family.name for family in
                                            text_string_to_metric_families(text)}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "onnxserve-triton.json").read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queries += [variable["query"]["query"] for variable in dashboard["templating"]["list"]
                if variable["type"] == "query"]
    assert len(queries) >= 8
    asked = set()
    for query in queries:
        names = _metric_names(query)
        assert names, query
        asked |= names
    assert asked <= exported, sorted(asked - exported)
    assert set(TRITON) <= asked  # a panel for every Triton family


def test_the_metric_name_reader_sees_a_misspelt_name() -> None:
    assert _metric_names('sum by (model) (rate(nv_inference_cout{model=~"$m"}[1m])) / 1000'
                         ) == {"nv_inference_cout"}
    assert _metric_names("label_values(nv_inference_count, model)") == {"nv_inference_count"}


def test_metrics_are_served_in_prometheus_text_format_0_0_4(
        served: tuple[ServerProcess, str]) -> None:
    server, _ = served
    request = urllib.request.Request(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                     headers={"Accept": "application/openmetrics-text"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert b"# TYPE nv_inference_count counter\n" in answer.read()
    head = urllib.request.Request(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                  method="HEAD")
    with urllib.request.urlopen(head, timeout=10) as answer:
        assert answer.status == 200 and answer.read() == b""


def test_the_triton_page_lists_every_family() -> None:
    text = (ROOT / "docs" / "triton.md").read_text()
    table = text.split("| family | type | what it counts |", 1)[1].split("\n\n", 1)[0]
    listed = {name for line in table.splitlines()[2:]
              for name in re.findall(r"`(nv_inference_[a-z_]+)`", line.split("|")[1])}
    assert listed == set(TRITON), (sorted(set(TRITON) - listed), sorted(listed - set(TRITON)))
    for line in table.splitlines()[2:]:
        names = re.findall(r"`(nv_inference_[a-z_]+)`", line.split("|")[1])
        assert {TRITON[name][0] for name in names} == {line.split("|")[2].strip()}, line
