"""Triton's perf_analyzer against onnxserve: the real binary (fetched with pip into the cache on
first use; libb64-0d from apt, which .ci/run installs) measuring a test server over each
transport, on its own and in `onnxserve bench --client` (reading its output, and what is
missing: tests/unit/benchmarks/test_perf_analyzer.py)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
from support.repositories import build_test_models
from support.served import start_server

from onnxserve.benchmarks import perf_analyzer as pa
from onnxserve.clients.client import Client
from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos import inference_pb2_grpc
from onnxserve.serving.process import ServerProcess, onnxserve_command

pytestmark = pytest.mark.grpc  # run over both gRPC transports (make test)


@pytest.fixture(scope="module")
def analyzer() -> pa.PerfAnalyzer:
    """The real perf_analyzer: $ONNXSERVE_PERF_ANALYZER, the cache, or fetched with pip."""
    return pa.find_perf_analyzer(log=print)


@pytest.mark.parametrize(("model", "inputs", "batch_size"), [
    ("scores", {"scores_in": np.linspace(0, 1, 5, dtype=np.float32)}, 2),
    ("add_one", None, 1),  # no config.pbtxt (auto-completed); perf_analyzer's random data
])
def test_real_perf_analyzer_measures_onnxserve(analyzer: pa.PerfAnalyzer, tmp_path: Path,
                                               model: str, inputs: dict | None,
                                               batch_size: int) -> None:
    build_test_models(tmp_path / "repo")
    server = start_server(tmp_path / "repo", tmp_path / "server.log")
    try:
        with Client(server.url) as client:
            before = client.statistics(model)
        result = pa.run_perf_analyzer(analyzer, server.url, model, concurrency=2,
                                      batch_size=batch_size, inputs=inputs, window_s=0.5,
                                      max_windows=4)
        with Client(server.url) as client:
            after = client.statistics(model)
    finally:
        server.stop()
    assert result.throughput > 0 and result.errors == 0, result
    assert 0 < result.p50_ms <= result.p90_ms <= result.p99_ms, result
    assert result.windows >= 3 and result.requests, result
    # The server answered at least the requests perf_analyzer counted, every one a success.
    served = sum(s["success"]["count"] for s in after) - sum(s["success"]["count"]
                                                             for s in before)
    failed = sum(s["fail"]["count"] for s in after) - sum(s["fail"]["count"] for s in before)
    assert served >= result.requests and failed == 0, (served, failed, result)
    inferences = sum(s["inference_count"] for s in after) - sum(s["inference_count"]
                                                                for s in before)
    assert inferences == served * batch_size


@pytest.fixture(scope="module")
def served(test_models_server: ServerProcess) -> ServerProcess:
    return test_models_server


def _success_counts(server: ServerProcess, model: str) -> tuple[int, int, int]:
    with Client(server.url) as client:
        stats = client.statistics(model)
    return (sum(s["success"]["count"] for s in stats), sum(s["fail"]["count"] for s in stats),
            sum(s["inference_count"] for s in stats))


@pytest.mark.parametrize(("transport", "model", "output_size"), [
    (pa.Transport("http"), "scores", None),
    (pa.Transport("grpc", "streaming"), "scores", None),
    (pa.Transport("grpc", "shared-memory"), "scores", None),
    (pa.Transport("http", "shared-memory"), "scores", None),
    # no config.pbtxt: outputs of any batch size, so perf_analyzer is told their size
    (pa.Transport("grpc", "shared-memory"), "add_one", 64),
], ids=lambda v: v.label.replace(" ", "-") if isinstance(v, pa.Transport) else str(v))
def test_real_perf_analyzer_measures_onnxserve_over_each_transport(
        analyzer: pa.PerfAnalyzer, served: ServerProcess, transport: pa.Transport, model: str,
        output_size: int | None) -> None:
    url = served.url if transport.protocol == "grpc" else served.http_url
    assert url is not None
    inputs = ({"scores_in": np.linspace(0, 1, 5, dtype=np.float32)} if model == "scores"
              else None)
    batch_size = 2 if model == "scores" else 1
    before = _success_counts(served, model)
    result = pa.run_perf_analyzer(analyzer, url, model, concurrency=2, batch_size=batch_size,
                                  inputs=inputs, window_s=0.5, max_windows=4,
                                  transport=transport,
                                  output_shared_memory_size=output_size)
    after = _success_counts(served, model)
    assert (result.pa_protocol, result.pa_mode) == (transport.protocol, transport.mode)
    assert result.throughput > 0 and result.errors == 0, result
    assert result.windows >= 3 and result.requests, result
    served_count, failed, inferences = (a - b for a, b in zip(after, before, strict=True))
    assert served_count >= result.requests and failed == 0, (served_count, failed, result)
    assert inferences == served_count * batch_size
    # perf_analyzer unregisters its regions when it ends
    with grpc.insecure_channel(served.url) as channel:
        status = inference_pb2_grpc.GRPCInferenceServiceStub(channel).SystemSharedMemoryStatus(
            pb.SystemSharedMemoryStatusRequest(), timeout=10)
    assert dict(status.regions) == {}


def _tiny_bench(tmp_path: Path, analyzer: pa.PerfAnalyzer,
                *flags: str) -> tuple[Path, subprocess.CompletedProcess]:
    """`onnxserve bench` of the test model "scores" at concurrency 2 in short windows, with
    ``flags``; (its output folder, the finished process), which succeeded."""
    build_test_models(tmp_path / "repo")
    out = tmp_path / "results"
    result = subprocess.run(
        onnxserve_command("bench", "--model-repository", str(tmp_path / "repo"), "--models",
                          "scores", "--concurrency", "2", "--batching", "on", "--workers", "1",
                          "--warmup", "0.2", "--window", "0.4", "--max-windows", "3",
                          "--perf-analyzer", str(analyzer.binary), *flags, "--out", str(out)),
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def test_bench_measures_every_transport(analyzer: pa.PerfAnalyzer, tmp_path: Path) -> None:
    out, result = _tiny_bench(tmp_path, analyzer, "--client", "perf_analyzer",
                              "--pa-protocol", "grpc", "http", "--pa-mode", "plain",
                              "streaming", "shared-memory")
    assert "streaming is measured over grpc alone" in result.stdout
    (model,) = json.loads((out / "bench.json").read_text())["results"]
    measured = [(r["pa_protocol"], r["pa_mode"]) for r in model["onnxserve"]]
    assert measured == [("grpc", "plain"), ("grpc", "streaming"), ("grpc", "shared-memory"),
                        ("http", "plain"), ("http", "shared-memory")]
    for row in model["onnxserve"]:
        assert row["throughput"] > 0 and row["errors"] == 0 and row["server_compute_ms"] > 0
    assert [(r["pa_protocol"], r["pa_mode"]) for r in model["null_server"]] == [
        ("grpc", "plain")]
    skipped = model["perf_analyzer_not_measured"]
    assert {(i["pa_protocol"], i["pa_mode"]) for i in skipped} == set(measured[1:])
    assert all(i["server"] == "null" and i["skipped"] for i in skipped)
    table = (out / "bench.md").read_text()
    for label in ("grpc", "grpc streaming", "grpc shared-memory", "http", "http shared-memory"):
        assert re.search(rf"\| onnxserve \| 1 \| on \| c=2 \| perf_analyzer \({label}\)"
                         r"( \(unstable\))? \|", table), label
    assert "perf_analyzer (http) does not measure the null server" in table


def test_bench_measures_with_both_clients(analyzer: pa.PerfAnalyzer, tmp_path: Path) -> None:
    out, _ = _tiny_bench(tmp_path, analyzer, "--client", "both", "--null-parse")
    data = json.loads((out / "bench.json").read_text())
    assert data["meta"]["clients"] == ["python", "perf_analyzer"]
    assert data["meta"]["perf_analyzer"].startswith("Perf Analyzer Version 2.41.0")
    (model,) = data["results"]
    assert [r["client"] for r in model["onnxserve"]] == ["python", "perf_analyzer"]
    for row in model["onnxserve"]:
        assert row["throughput"] > 0 and row["errors"] == 0 and "server_compute_ms" in row
    # The null servers answer the metadata, config and statistics RPCs perf_analyzer asks
    # for, so both clients measure them too.
    for key in ("null_server", "null_parse_server"):
        assert [r["client"] for r in model[key]] == ["python", "perf_analyzer"]
        assert all(r["throughput"] > 0 and r["errors"] == 0 for r in model[key])
    assert model["perf_analyzer_not_measured"] == []
    table = (out / "bench.md").read_text()
    assert "| onnxserve | 1 | on | c=2 | perf_analyzer" in table
    assert "| null (parse) |  |  | c=2 | perf_analyzer" in table
