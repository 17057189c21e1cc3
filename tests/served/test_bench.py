"""The benchmark tool and multi-process serving, on small models and short windows."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from support import ROOT
from support.repositories import build_test_models
from support.served import start_server

from onnxserve.clients.client import Client
from onnxserve.serving.process import onnxserve_command


def test_bench_writes_results(tmp_path: Path) -> None:
    build_test_models(tmp_path / "repo")
    out = tmp_path / "results"
    result = subprocess.run(
        onnxserve_command("bench", "--model-repository", str(tmp_path / "repo"), "--models",
                          "scores", "--concurrency", "1", "4", "--rate", "50", "--batching",
                          "on", "off", "--workers", "1", "--warmup", "0.3", "--window", "0.5",
                          "--max-windows", "3", "--out", str(out)),
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((out / "bench.json").read_text())
    (model,) = data["results"]
    assert set(model["raw_onnxruntime"]) == {"1", "8", "32"}
    assert len(model["null_server"]) == 3 and len(model["onnxserve"]) == 6
    for row in model["onnxserve"]:
        assert row["errors"] == 0 and row["throughput"] > 0 and row["p50_ms"] > 0
        assert "server_compute_ms" in row
    assert "| onnxserve | 1 | off | c=4 |" in (out / "bench.md").read_text()


def test_bench_measures_each_grpc_transport_and_a_cpp_null_server(tmp_path: Path) -> None:
    from onnxserve.serving.frontends import native

    repo = tmp_path / "repo"
    build_test_models(repo)
    # stands in for the C++ null server (--cpp-null): takes its command line, serves scores
    config = tmp_path / "scores.pbtxt"
    config.write_text('name: "scores"\n' + (repo / "scores" / "config.pbtxt").read_text())
    fake = tmp_path / "null_server"
    fake.write_text(
        "#!/bin/sh\n"
        'while [ $# -gt 0 ]; do [ "$1" = --port ] && port=$2; shift; done\n'
        f"exec {shlex.quote(sys.executable)} -m onnxserve.benchmarks.null_server --port "
        f'"$port" --model-config {shlex.quote(str(config))}\n')
    fake.chmod(0o755)
    transports = ["python"] if native.transport is None else ["native", "python"]
    out = tmp_path / "results"
    result = subprocess.run(
        onnxserve_command("bench", "--model-repository", str(repo), "--models", "scores",
                          "--concurrency", "1", "--batching", "on", "--workers", "1",
                          "--grpc-transport", *transports, "--cpp-null", str(fake),
                          "--warmup", "0.2", "--window", "0.3", "--max-windows", "3",
                          "--out", str(out), "--tag", "transport"),
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "scores null server (C++), concurrency 1" in result.stdout
    data = json.loads((out / "transport.json").read_text())
    assert data["meta"]["cpp_null"] == str(fake)
    (model,) = data["results"]
    (cpp_null,) = model["null_cpp_server"]
    assert cpp_null["errors"] == 0 and cpp_null["throughput"] > 0
    assert [r["grpc_transport"] for r in model["onnxserve"]] == transports
    assert all(r["errors"] == 0 and r["throughput"] > 0 for r in model["onnxserve"])
    table = (out / "transport.md").read_text()
    assert "| vs null | vs C++ null |" in table and "| null (C++) |  |  | c=1 | python" in table
    for transport in transports:
        cells = next(line for line in table.splitlines()
                     if line.startswith(f"| onnxserve ({transport}) | 1 | on | c=1 |"))
        vs_null, vs_cpp_null = cells.split("|")[8:10]
        assert float(vs_null) > 0 and float(vs_cpp_null) > 0, cells


def test_two_workers_share_the_port(tmp_path: Path) -> None:
    build_test_models(tmp_path / "repo")
    server = start_server(tmp_path / "repo", tmp_path / "server.log", "--workers", "2")
    try:
        deadline = time.monotonic() + 60
        while server.output().count("models loaded") < 2:  # both workers, not only the first
            assert time.monotonic() < deadline and server.process.poll() is None, server.output()
            time.sleep(0.1)
        x = np.ones((2, 5), np.float32)
        for _ in range(4):  # separate connections may land on either worker
            with Client(server.url) as client:
                assert client.infer("scores", {"scores_in": x})["scores"].tolist() == x.tolist()
    finally:
        assert server.stop() == 0
    assert server.output().count("gRPC server listening") == 2
    # Every line says which process wrote it.
    lines = [line for line in server.output().splitlines() if " INFO " in line]
    assert {"[worker 0]", "[worker 1]", "[supervisor]"} <= {
        line.split("INFO ", 1)[1].split(" onnxserve", 1)[0] for line in lines}
    listening = [line for line in lines if "gRPC server listening" in line]
    assert sorted(line.split("[", 1)[1][:8] for line in listening) == ["worker 0", "worker 1"]


def test_profile_summary_shares() -> None:
    from onnxserve.benchmarks.profile import summarize

    raw = "main;loop;decode 3\nmain;loop;run 1\n"
    total, own, inclusive = summarize(raw)
    assert total == 4
    assert own[0] == ("decode", 75.0)
    assert dict(inclusive)["loop"] == 100.0


def test_stage_breakdown_compares_a_baseline_checkout_with_this_one(tmp_path: Path) -> None:
    build_test_models(tmp_path / "repo")
    checkout = ROOT  # this tree, as its own baseline
    result = subprocess.run(
        [sys.executable, "-m", "onnxserve.benchmarks.profile", "--tool", "stages",
         "--model-repository", str(tmp_path / "repo"), "--model", "scores",
         "--concurrency", "2", "--seconds", "0.5", "--repeat", "1", "--baseline",
         str(checkout), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = (tmp_path / "out" / "stages_scores_c2.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| |"))
    assert "baseline" in header and "this revision" in header
    for row in ("inferences/s", "server CPU us per request", "handler", "validate"):
        cells = next(line for line in table.splitlines() if line.startswith(f"| {row} |"))
        values = [float(c) for c in cells.strip("|").split("|")[1:]]
        assert len(values) == 2 and all(v > 0 for v in values), cells


def test_first_request_table_compares_warm_up_on_and_off() -> None:
    from onnxserve.benchmarks.first_request import markdown

    results = [{"model": "m", "warmup": {"first_ms": [2.0, 3.0, 4.0], "steady_p50_ms": [1.0] * 3},
                "no_warmup": {"first_ms": [30.0, 20.0, 40.0], "steady_p50_ms": [1.0] * 3}}]
    table = markdown(results, "cmd")
    assert "| m | on | 3.00 | 1.00 | 3.0 |" in table
    assert "| m | off | 30.00 | 1.00 | 30.0 |" in table
