"""`onnxserve tune` run on a test model with a short --max-minutes: it measures, stops in
time, reports every configuration, and writes a config the server loads (its parts:
tests/unit/benchmarks/test_tune.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from google.protobuf import text_format
from support.repositories import build_test_models

from onnxserve.benchmarks import perf_analyzer as pa
from onnxserve.protos.model_config_pb2 import ModelConfig
from onnxserve.serving.models.options import model_options
from onnxserve.serving.models.repository import read_model
from onnxserve.serving.process import ServerProcess, onnxserve_command

#: A short measurement: tune's loads at these windows take about a second each.
SHORT = ("--window", "0.25", "--max-windows", "3", "--warmup", "0.1", "--max-concurrency", "4")


def _repository(folder: Path) -> Path:
    """The test models, with scores_int8: a copy of scores standing in for its variant."""
    build_test_models(folder)
    shutil.copytree(folder / "scores", folder / "scores_int8")
    config = folder / "scores_int8" / "config.pbtxt"
    config.write_text('name: "scores_int8"\n' + config.read_text())
    return folder


def test_tune_measures_reports_and_chooses_within_its_minutes(tmp_path: Path) -> None:
    repository = _repository(tmp_path / "repo")
    before = (repository / "scores" / "config.pbtxt").read_text()
    started = time.monotonic()
    result = subprocess.run(
        onnxserve_command("tune", "scores", "--model-repository", str(repository),
                          "--latency-budget-ms", "200", "--max-minutes", "1",
                          "--client", "python", "--runs", "2", *SHORT),
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    out = result.stdout
    # one minute of measuring, plus the start and the last server run it began
    assert elapsed < 100, f"took {elapsed:.0f} s for --max-minutes 1"
    # progress: the phases, what is measured, the time left
    for phase in ("[costs] raw onnxruntime, scores:", "[costs] raw onnxruntime, scores_int8:",
                  "[costs] do-nothing server", "[search] the model's own configuration",
                  "[search: predicted 1 of "):
        assert phase in out, out
    assert "min left)" in out and "concurrency 1:" in out
    assert "variant scores_int8 (int8): agreement with fp32 top-1 100.0%" in out
    report = json.loads((tmp_path / "tune_results" / "tune.json").read_text())
    trials = report["trials"]
    assert trials[0]["phase"] == "default" and len(trials) >= 3
    # the variant is a candidate (served when the minute allowed: under load it may not)
    assert {t["candidate"]["model"] for t in trials} <= {"scores", "scores_int8"}
    assert any(p["candidate"].startswith("scores_int8") for p in report["predictions"])
    assert all(t["points"] and t["failure"] is None for t in trials), trials
    assert report["meta"]["budget_ms"] == 200 and "cores" in report["meta"]["machine"]
    assert report["front"], "a Pareto front of the measured points"
    decision = report["decision"]
    assert decision["chosen"] is not None and decision["reason"]
    assert [f["describe"] for f in report["finalists"]][-1] == decision["default"]
    # the confirmation ran the finalists again, or said the time ran out
    assert any(t["phase"] == "confirm" for t in trials) or "--max-minutes" in out
    markdown = (tmp_path / "tune_results" / "tune.md").read_text()
    for trial in trials:  # a row of the table of every server run for each
        assert f"| {trial['number']} | {trial['run']} | {trial['phase']} | " in markdown
    assert (tmp_path / "tune_results" / "tune.png").read_bytes()[:4] == b"\x89PNG"
    # the chosen config is written under --out, never into the repository without --apply
    written = tmp_path / decision["config"]  # as given: --out is relative
    assert written.is_file() and written.parent.parent == tmp_path / "tune_results"
    assert (repository / "scores" / "config.pbtxt").read_text() == before
    name = written.parent.name
    config = text_format.Parse(written.read_text(), ModelConfig())
    assert config.name == name and config.max_batch_size == 4
    model_options(config)  # its parameters parse
    # and a server loads it
    served = tmp_path / "served"
    shutil.copytree(repository / name, served / name)
    shutil.copy(written, served / name / "config.pbtxt")
    assert read_model(served, name).config.name == name
    server = ServerProcess.serve(served, *decision["serve_flags"])
    try:
        server.wait_ready(60)
    finally:
        server.stop()


def test_tune_measures_with_perf_analyzer_at_a_fixed_concurrency(tmp_path: Path) -> None:
    analyzer = pa.find_perf_analyzer(log=print)
    repository = _repository(tmp_path / "repo")
    result = subprocess.run(
        onnxserve_command("tune", "scores", "--model-repository", str(repository),
                          "--latency-budget-ms", "200", "--concurrency", "2",
                          "--max-minutes", "0.5", "--no-variants", "--client", "perf_analyzer",
                          "--perf-analyzer", str(analyzer.binary), "--out", "pa", "--apply",
                          *SHORT),
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    assert f"client: perf_analyzer {analyzer.binary}" in result.stdout
    report = json.loads((tmp_path / "pa" / "tune.json").read_text())
    assert report["meta"]["client"].startswith("perf_analyzer")
    assert {t["candidate"]["model"] for t in report["trials"]} == {"scores"}
    # a fixed load: each server run measured once, at concurrency 2
    assert all([p["concurrency"] for p in t["points"]] == [2] for t in report["trials"])
    decision = report["decision"]
    target = repository / "scores" / "config.pbtxt"
    if decision["applied"]:
        assert target.read_text() == (tmp_path / decision["config"]).read_text()
        assert (tmp_path / "pa" / "scores" / "config.pbtxt.before").is_file()
    else:
        assert "--apply: nothing written into" in result.stdout
        assert not (tmp_path / "pa" / "scores" / "config.pbtxt.before").exists()
