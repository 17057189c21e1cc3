"""`onnxserve bench` and the other benchmark tools as users meet them: where results go,
progress while they run, how long they take, what each option does (a bench run on a test
model: tests/served/test_bench_cli_served.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from support import ROOT

from onnxserve.benchmarks import bench
from onnxserve.serving.process import onnxserve_command


def test_bench_default_output_is_a_folder_of_the_working_directory() -> None:
    from onnxserve.benchmarks import first_request, profile
    from onnxserve.serving.cli import build_parser

    assert build_parser().parse_args(["bench"]).out == Path("bench_results")
    assert first_request.build_parser().parse_args([]).out == Path("bench_results")
    assert profile.build_parser().parse_args([]).out == Path("bench_results")
    makefile = (ROOT / "Makefile").read_text()
    target = makefile[makefile.index("\nbench:"):makefile.index("\nlint:")]
    commands = [c for c in target.replace("\\\n", " ").splitlines()
                if "onnxserve bench" in c or "onnxserve.benchmarks" in c]
    # bench, bench_batch32, first_request, speed, protocols, shared_memory
    assert len(commands) == 6, commands
    assert all("--out benchmarks/results" in c for c in commands), commands


def test_bench_help_and_docs_say_how_long_it_takes() -> None:
    from onnxserve.serving.cli import build_parser

    defaults = build_parser().parse_args(["bench"])
    each = bench._duration_range(*bench.configuration_seconds(defaults))
    total = bench._duration_range(*bench.expected_seconds(defaults, len(defaults.models)))
    assert (each, total) == ("11-20 s", "8-14 min")
    assert bench.configurations_per_model(defaults) == 20
    help_text = subprocess.run(onnxserve_command("bench", "--help"), capture_output=True,
                               text=True, timeout=60).stdout
    flat = " ".join(help_text.split())
    assert "(11-20 s with the defaults)" in flat and "about 8-14 minutes" in flat, help_text
    section = " ".join((ROOT / "docs" / "benchmarks.md").read_text().split())
    assert "about 8-14 minutes" in section and "each 11-20 s" in section
    assert "20 configurations per model" in section


@pytest.mark.parametrize(("args", "message"), [
    (["--concurrency", "0"], "argument --concurrency: 0: expected 1 or more"),
    (["--workers", "1", "0"], "argument --workers: 0: expected 1 or more"),
    (["--window", "0"], "argument --window: 0: expected more than 0"),
    (["--warmup", "-1"], "argument --warmup: -1: expected at least 0"),
    (["--max-windows", "0"], "argument --max-windows: 0: expected 1 or more"),
    (["--rate", "0"], "argument --rate: 0: expected more than 0 requests/s"),
])
def test_bench_refuses_settings_that_measure_nothing(args: list[str], message: str) -> None:
    result = subprocess.run(onnxserve_command("bench", *args), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_seed_accuracy_says_which_recipe_it_trains(tmp_path: Path, monkeypatch,
                                                   capsys) -> None:
    from onnxserve.benchmarks import seed_accuracy

    def failing_export(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "no data set here\n")

    monkeypatch.setattr(seed_accuracy.subprocess, "run", failing_export)
    status = seed_accuracy.main(["--recipes", "lenet5", "fashion_cnn1", "--out",
                                 str(tmp_path)])
    assert status == 1
    out = capsys.readouterr().out
    assert "[1/2] training lenet5 at the seed's length ..." in out
    assert "[2/2] training fashion_cnn1 at the seed's length ..." in out
    assert "failed: no data set here" in (tmp_path / "seed_accuracy.md").read_text()


def test_export_report_says_which_export_it_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    from onnxserve.benchmarks import export_report

    monkeypatch.setattr(export_report, "run_export", lambda args: (1, 10.0, "it failed\n"))
    status = export_report.main(["--models", "lenet5", "--variants", "fp32", "int8", "--out",
                                 str(tmp_path)])
    assert status == 1
    out = capsys.readouterr().out
    assert "[1/2] exporting lenet5 fp32 ..." in out and "[2/2] exporting lenet5 int8 ..." in out


def test_progress_numbers_only_go_up_when_configurations_are_skipped(capsys) -> None:
    progress = bench.Progress(4)
    progress.next("a")
    progress.skip(1)  # e.g. perf_analyzer cannot measure one transport of this server
    progress.next("c")
    progress.next("d")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["[1/4]", "[3/4]", "[4/4]"], lines
