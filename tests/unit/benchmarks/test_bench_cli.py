"""`onnxserve bench` and the other benchmark tools as users meet them: where results go,
progress while they run, how long they take, what each option does (a bench run on a test
model: tests/served/test_bench_cli_served.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import ClassVar

import grpc
import pytest
from support import ROOT
from support.repositories import build_test_models

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


def test_bench_grpc_transport_and_cpp_null_options() -> None:
    from onnxserve.serving.cli import build_parser

    defaults = build_parser().parse_args(["bench"])
    assert defaults.grpc_transport is None and defaults.cpp_null is None
    assert bench._grpc_transports(defaults) == [None]  # no flag: the server's own default
    args = build_parser().parse_args([
        "bench", "--grpc-transport", "native", "python", "native", "--cpp-null",
        "/tmp/cpp_null/null_server", "--workers", "1", "2", "--batching", "on",
        "--concurrency", "1", "16"])
    assert bench._grpc_transports(args) == ["native", "python"]
    assert args.cpp_null == Path("/tmp/cpp_null/null_server")
    # the two null servers, then onnxserve: 2 workers x 1 batching x 2 transports, 2 loads
    assert bench.configurations_per_model(args) == (2 + 2 * 2) * 2
    refused = subprocess.run(onnxserve_command("bench", "--grpc-transport", "auto"),
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "argument --grpc-transport: invalid choice: 'auto'" in refused.stderr, refused.stderr


def _not_executable(folder: Path) -> Path:
    script = folder / "plain"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    return script


def _not_a_server(folder: Path) -> Path:
    script = folder / "not_a_server"
    script.write_text("#!/bin/sh\necho 'unknown option --threads' >&2\nexit 3\n")
    script.chmod(0o755)
    return script


@pytest.mark.parametrize(("make", "message"), [
    (lambda folder: folder / "missing", "no such file"),
    (lambda folder: folder, "not a file"),
    (_not_executable, "not executable"),
    (_not_a_server, "it did not start serving: the server exited before it was ready"),
])
def test_bench_refuses_a_cpp_null_it_cannot_run_before_measuring(tmp_path: Path, make,
                                                                  message: str) -> None:
    build_test_models(tmp_path / "repo")
    binary = make(tmp_path)
    result = subprocess.run(onnxserve_command(
        "bench", "--model-repository", str(tmp_path / "repo"), "--models", "scores",
        "--cpp-null", str(binary), "--out", str(tmp_path / "out")),
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"onnxserve bench: --cpp-null {binary}: {message}" in result.stderr, result.stderr
    assert "raw onnxruntime" not in result.stdout and not (tmp_path / "out").exists()
    if make is _not_a_server:
        assert "unknown option --threads" in result.stderr  # what the program said


def test_bench_refuses_the_native_transport_where_it_is_not_built(tmp_path: Path, monkeypatch,
                                                                  capsys) -> None:
    from onnxserve.serving.cli import build_parser
    from onnxserve.serving.frontends import native

    build_test_models(tmp_path / "repo")
    monkeypatch.setattr(native, "transport", None)
    monkeypatch.setattr(native, "BUILD_PROBLEM", "no module named _transport")
    monkeypatch.setattr(bench, "bench_model", lambda *a, **k: pytest.fail("it measured"))
    args = build_parser().parse_args([
        "bench", "--model-repository", str(tmp_path / "repo"), "--models", "scores",
        "--grpc-transport", "python", "native", "--out", str(tmp_path / "out")])
    assert bench.run_bench(args) == 2
    err = capsys.readouterr().err
    assert ("--grpc-transport native: the native gRPC transport is not built (no module named "
            "_transport)") in err and "--grpc-transport python only" in err, err


class _FakeServer:
    """Stands in for ServerProcess in bench_model: records how each server was started."""

    started: ClassVar[list[list[str]]] = []

    def __init__(self, command, url, log_path=None, *, serve=True, **kwargs) -> None:
        self.command, self.url, self.http_url, self.pid = list(command), url, None, 1
        self.started.append(self.command)

    @classmethod
    def serve(cls, repository, *flags, **kwargs) -> _FakeServer:
        return cls(["onnxserve", "serve", *flags], "127.0.0.1:1")

    def wait_ready(self, timeout: float = 120.0) -> None:
        pass

    def stop(self) -> int:
        return 0


def _fake_bench(monkeypatch, metadata) -> list[str]:
    """bench_model without servers or measurements: each _measure gives one row at
    concurrency 1; ``metadata`` is what the C++ null server's ModelMetadata answers (an
    exception is raised). Returns the ``what`` of each measurement."""
    from onnxserve.clients.client import InferenceServerError

    measured: list[str] = []
    _FakeServer.started = []

    def measure(url, payload, samples, args, pid, progress, what, *a, **k) -> bench.Measured:
        measured.append(what)
        return bench.Measured(rows=[{
            "client": "python", "mode": "closed", "concurrency": 1, "rate": None,
            "throughput": 100.0 * len(measured), "p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0,
            "errors": 0, "client_cpu_percent": 50.0, "server_cpu_percent": 90.0}])

    class FakeClient:
        def __init__(self, url, **kwargs) -> None:
            pass

        def __enter__(self) -> FakeClient:
            return self

        def __exit__(self, *exc) -> None:
            pass

        def model_metadata(self, name: str):
            if isinstance(metadata, InferenceServerError):
                raise metadata
            return metadata

    monkeypatch.setattr(bench, "ServerProcess", _FakeServer)
    monkeypatch.setattr(bench, "_measure", measure)
    monkeypatch.setattr(bench, "Client", FakeClient)
    monkeypatch.setattr(bench, "raw_onnxruntime", lambda *a, **k: {
        1: {"throughput": 1000.0, "p50_ms": 1.0}})
    return measured


def _scores_metadata(name: str = "scores", input_name: str = "scores_in"):
    from onnxserve.clients.client import ModelMetadata, TensorInfo

    return ModelMetadata(name, ("1",), "none", (TensorInfo(input_name, "FP32", (-1, 5)),), ())


def test_bench_model_measures_each_grpc_transport_and_the_cpp_null(tmp_path: Path,
                                                                   monkeypatch) -> None:
    from onnxserve.serving.cli import build_parser

    build_test_models(tmp_path / "repo")
    measured = _fake_bench(monkeypatch, _scores_metadata())
    args = build_parser().parse_args([
        "bench", "--model-repository", str(tmp_path / "repo"), "--models", "scores",
        "--concurrency", "1", "--batching", "on", "--workers", "1", "--grpc-transport",
        "native", "python", "--cpp-null", "bin/null_server"])
    progress = bench.Progress(bench.measurements_per_model(args))
    out = bench.bench_model(tmp_path / "repo", "scores", args, progress)
    assert measured == ["scores null server", "scores null server (C++)",
                        "scores onnxserve (native), batching on, 1 worker",
                        "scores onnxserve (python), batching on, 1 worker"]
    null, cpp_null, native, python = _FakeServer.started
    assert "onnxserve.benchmarks.null_server" in null
    # started by absolute path (through setpriv --pdeathsig TERM -- where there is one)
    assert cpp_null[-7:-5] == [str(Path("bin/null_server").absolute()), "--port"]
    assert cpp_null[-4:] == ["--threads", "2", "--host", "127.0.0.1"]
    assert native[-2:] == ["--grpc-transport", "native"]
    assert python[-2:] == ["--grpc-transport", "python"]
    assert [r["throughput"] for r in out["null_cpp_server"]] == [200.0]
    assert [(r["grpc_transport"], r["workers"], r["batching"]) for r in out["onnxserve"]] == [
        ("native", 1, "on"), ("python", 1, "on")]
    assert "null_cpp_not_measured" not in out

    # no --grpc-transport: no flag passed, no field in the rows
    measured = _fake_bench(monkeypatch, _scores_metadata())
    args = build_parser().parse_args([
        "bench", "--model-repository", str(tmp_path / "repo"), "--models", "scores",
        "--concurrency", "1", "--batching", "on", "--workers", "1"])
    out = bench.bench_model(tmp_path / "repo", "scores", args, bench.Progress(2))
    assert measured == ["scores null server", "scores onnxserve, batching on, 1 worker"]
    assert "--grpc-transport" not in _FakeServer.started[-1]
    assert "grpc_transport" not in out["onnxserve"][0] and "null_cpp_server" not in out


def test_a_model_the_cpp_null_does_not_serve_is_not_measured_there(tmp_path: Path, monkeypatch,
                                                                    capsys) -> None:
    from onnxserve.clients.client import InferenceServerError
    from onnxserve.serving.cli import build_parser

    build_test_models(tmp_path / "repo")
    measured = _fake_bench(monkeypatch, InferenceServerError(
        grpc.StatusCode.NOT_FOUND, "unknown model scores"))
    args = build_parser().parse_args([
        "bench", "--model-repository", str(tmp_path / "repo"), "--models", "scores",
        "--concurrency", "1", "2", "--batching", "on", "--workers", "1", "--cpp-null",
        "/bin/null_server"])
    progress = bench.Progress(bench.measurements_per_model(args))
    out = bench.bench_model(tmp_path / "repo", "scores", args, progress)
    assert measured == ["scores null server", "scores onnxserve, batching on, 1 worker"]
    assert out["null_cpp_server"] == []
    assert out["null_cpp_not_measured"] == (
        "it does not serve scores (NOT_FOUND: unknown model scores)")
    assert progress.skipped == 2  # its two loads, announced, counted as skipped
    text = bench.markdown([out], {"command": "onnxserve bench", "machine": "2 cores",
                                  "warmup": 2.0, "window": 3.0, "cpp_null": "/bin/null_server"})
    assert ("The C++ null server measured nothing of scores: it does not serve scores "
            "(NOT_FOUND: unknown model scores)") in text
    assert "| vs null | vs C++ null | p50 ms |" in text and "| null (C++) |" not in text


def test_cpp_null_fit_judges_the_servers_metadata() -> None:
    from onnxserve.protos.model_config_pb2 import ModelConfig

    config = ModelConfig(name="scores", max_batch_size=8)
    config.input.add(name="scores_in", data_type=11, dims=[5])  # TYPE_FP32
    assert bench.cpp_null_fit("scores", config, _scores_metadata()) == (None, None)
    refused, _ = bench.cpp_null_fit("scores", config, _scores_metadata(name="lenet5"))
    assert refused == "it does not serve scores (its ModelMetadata names 'lenet5')"
    refused, pa_reason = bench.cpp_null_fit("scores", config,
                                            _scores_metadata(input_name="input"))
    assert refused is None
    assert pa_reason is not None and pa_reason.startswith(
        "its scores takes `input` FP32 [-1, 5] where the model takes `scores_in` FP32 [-1, 5], "
        "so perf_analyzer")


def test_markdown_names_the_grpc_transport_and_compares_with_the_cpp_null() -> None:
    row = {"client": "python", "mode": "closed", "concurrency": 16, "rate": None,
           "throughput": 3000.0, "p50_ms": 5.0, "p90_ms": 6.0, "p99_ms": 9.0, "errors": 0,
           "client_cpu_percent": 50.0, "server_cpu_percent": 90.0, "stable": True}
    onnxserve = {**row, "workers": 1, "batching": "on"}
    meta = {"command": "onnxserve bench", "machine": "2 cores", "warmup": 2.0, "window": 3.0}
    result = {"model": "lenet5", "samples_per_request": 1,
              "raw_onnxruntime": {"1": {"throughput": 6000.0, "p50_ms": 0.1}},
              "null_server": [{**row, "throughput": 6000.0}], "onnxserve": [onnxserve]}
    # neither option: the table as it always was
    plain = bench.markdown([result], meta)
    assert ("| server | workers | batching | load | client | inf/s | vs raw best | vs null | "
            "p50 ms |") in plain and "C++" not in plain and "grpc-transport" not in plain
    assert "| onnxserve | 1 | on | c=16 | python | 3000 | 0.50 | 0.50 | 5.00 |" in plain
    assert "|---" * 17 + "|\n" in plain

    both = {**result, "null_cpp_server": [{**row, "throughput": 12000.0}],
            "onnxserve": [{**onnxserve, "grpc_transport": "native"},
                          {**onnxserve, "grpc_transport": "python", "throughput": 1500.0}]}
    text = bench.markdown([both], {**meta, "cpp_null": "/tmp/cpp_null/null_server"})
    assert "| vs raw best | vs null | vs C++ null | p50 ms |" in text
    assert "|---" * 18 + "|\n" in text
    assert "| null |  |  | c=16 | python | 6000 | 1.00 |  | 0.50 | 5.00 |" in text
    assert "| null (C++) |  |  | c=16 | python | 12000 | 2.00 | 2.00 |  | 5.00 |" in text
    assert ("| onnxserve (native) | 1 | on | c=16 | python | 3000 | 0.50 | 0.50 | 0.25 | 5.00 |"
            in text)
    assert ("| onnxserve (python) | 1 | on | c=16 | python | 1500 | 0.25 | 0.25 | 0.12 | 5.00 |"
            in text)
    assert "`/tmp/cpp_null/null_server`, 2 threads" in text and "--grpc-transport native" in text
