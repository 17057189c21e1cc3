"""Triton's perf_analyzer against onnxserve (benchmarks/perf_analyzer.py, `onnxserve bench
--client`): its CSV and console output read right, and what is missing said with how to get
it (the real binary measuring a test server: tests/served/test_perf_analyzer_served.py)."""

from __future__ import annotations

import base64
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from support.repositories import build_test_models

from onnxserve.benchmarks import bench
from onnxserve.benchmarks import perf_analyzer as pa
from onnxserve.serving.process import onnxserve_command

# Captured from perf_analyzer 2.41.0 against onnxserve's "scores" test model.
PLAIN_CSV = """\
Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,\
Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,\
p90 latency,p95 latency,p99 latency
1,2464.91,1,375,0,2,19,4,0,368,449,504,991
"""
VERBOSE_CSV = """\
Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,\
Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,\
p90 latency,p95 latency,p99 latency,Avg latency,request/response,response wait
4,4280.54,2,1829,0,3,23,4,0,1646,2129,4323,7572,1863,2,1856
"""
RATE_CSV = """\
Request Rate,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,\
Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,\
p90 latency,p95 latency,p99 latency,Avg latency,request/response,response wait
200,588.766,8,1190,0,6,77,9,1,1074,1690,3044,6283,1295,9,1268
"""
VERBOSE_OUTPUT = """\
*** Measurement Settings ***
  Batch size: 2
  Measurement window: 500 msec

Request concurrency: 4
  Pass [1] throughput: 4706.49 infer/sec. Avg latency: 1696 usec (std 1062 usec). \n\
  Pass [2] throughput: 3808.35 infer/sec. Avg latency: 2099 usec (std 2073 usec). \n\
  Pass [3] throughput: 4326.16 infer/sec. Avg latency: 1839 usec (std 1387 usec). \n\
  Client: \n\
    Request count: 3863
    Throughput: 4280.54 infer/sec
  Server: \n\
    Inference count: 7728
    Successful request count: 3864
"""
# Captured from perf_analyzer 2.41.0 against a server whose ServerMetadata does not name the
# statistics extension: no server-side columns.
NO_SERVER_STATS_CSV = """\
Concurrency,Inferences/Second,Client Send,Client Recv,p50 latency,p90 latency,p95 latency,\
p99 latency
1,3729.45,3,1,231,310,347,920
"""
LDD_WITHOUT_LIBB64 = """\
\tlinux-vdso.so.1 (0x00007fae70dda000)
\tlibb64.so.0d => not found
\tlibcudart.so.12 => x/libcudart.so.12 (0x00007fae6fc00000)
\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007fae70daa000)
"""


def test_csv_report_in_milliseconds() -> None:
    (row,) = pa.parse_csv(PLAIN_CSV)
    assert (row.concurrency, row.rate, row.throughput) == (1, None, 2464.91)
    assert (row.p50_ms, row.p90_ms, row.p95_ms, row.p99_ms) == (0.368, 0.449, 0.504, 0.991)
    assert row.network_server_ms == 0.375 and row.server_compute_infer_ms == 0.019
    assert row.avg_latency_ms is None  # only in --verbose-csv

    (row,) = pa.parse_csv(VERBOSE_CSV)
    assert (row.concurrency, row.throughput, row.avg_latency_ms) == (4, 4280.54, 1.863)
    assert row.p99_ms == 7.572

    (row,) = pa.parse_csv(RATE_CSV)
    assert (row.concurrency, row.rate, row.throughput) == (None, 200.0, 588.766)
    assert row.server_compute_output_ms == 0.009


def test_a_report_without_the_servers_side_leaves_it_out() -> None:
    (row,) = pa.parse_csv(NO_SERVER_STATS_CSV)
    assert (row.concurrency, row.throughput, row.p50_ms, row.p99_ms) == (1, 3729.45, 0.231,
                                                                         0.92)
    assert (row.client_send_ms, row.client_recv_ms) == (0.003, 0.001)
    assert row.network_server_ms is None and row.server_queue_ms is None
    assert row.server_compute_infer_ms is None


def test_a_run_without_the_servers_side_measures_the_clients(tmp_path: Path) -> None:
    analyzer = _fake_perf_analyzer(tmp_path, f"""
csv=$(echo "$*" | sed 's/.* -f \\([^ ]*\\) .*/\\1/')
printf '%s' '{NO_SERVER_STATS_CSV}' > "$csv"
""")
    result = pa.run_perf_analyzer(analyzer, "127.0.0.1:9", "m", window_s=0.1, max_windows=3)
    assert (result.throughput, result.p50_ms, result.errors) == (3729.45, 0.231, 0)
    assert result.pa_server_compute_ms is None and result.network_server_ms is None


@pytest.mark.parametrize(("text", "message"), [
    ("", "perf_analyzer CSV is empty"),
    (PLAIN_CSV.replace(",Server Queue", ",Queue"), "lacks column(s) Server Queue"),
    (PLAIN_CSV.splitlines()[0] + "\n", "has a header but no row"),
    (PLAIN_CSV.replace(",p99 latency", ",p99").replace(",991", ",991"),
     "lacks column(s) p99 latency"),
    (PLAIN_CSV.replace("Concurrency,", "Level,"), "lacks column(s) Concurrency or Request Rate"),
    (PLAIN_CSV.replace("2464.91", "fast"), "line 2: Inferences/Second is 'fast', not a number"),
    (PLAIN_CSV.replace("2464.91", "nan"), "line 2: Inferences/Second is 'nan', not a finite"),
])
def test_unreadable_csv_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="perf_analyzer CSV") as caught:
        pa.parse_csv(text)
    assert message in str(caught.value)


def test_console_output_windows_and_request_count() -> None:
    assert pa.parse_windows(VERBOSE_OUTPUT) == [4706.49, 3808.35, 4326.16]
    assert pa.parse_request_count(VERBOSE_OUTPUT) == 3863
    assert pa.parse_request_count("error: failed to get model metadata") is None
    assert pa.error_lines("*** Measurement Settings ***\nerror: failed to get model metadata: "
                          "Method not found!\n") == (
        "error: failed to get model metadata: Method not found!")


def test_a_missing_library_is_named_with_how_to_get_it() -> None:
    assert pa.parse_ldd(LDD_WITHOUT_LIBB64) == ["libb64.so.0d"]
    message = pa.describe_missing(["libb64.so.0d", "libcudart.so.12"], Path("/x/perf_analyzer"))
    assert "libb64.so.0d: apt-get install libb64-0d" in message
    assert "libcudart.so.12: the CUDA 12 runtime" in message
    assert "pip download nvidia-cuda-runtime-cu12==" in message


def test_command_for_a_closed_loop_and_for_poisson_arrivals(tmp_path: Path) -> None:
    closed = pa.build_command("pa", "127.0.0.1:9", "m", csv_path=tmp_path / "r.csv",
                              concurrency=16, batch_size=4, input_data_path=tmp_path / "d.json",
                              window_s=1.5, max_windows=2)
    flags = " ".join(closed)
    assert closed[:7] == ["pa", "-i", "grpc", "-u", "127.0.0.1:9", "-m", "m"]
    assert "-b 4 -p 1500 -r 3 -s 10 " in flags  # at least 3 windows: it compares three
    assert f"-f {tmp_path / 'r.csv'} --verbose-csv -v" in flags
    assert "--concurrency-range 16:16" in flags and f"--input-data {tmp_path}/d.json" in flags
    poisson = " ".join(pa.build_command("pa", "h:1", "m", csv_path=tmp_path / "r.csv",
                                        rate=50.0, shapes={"x": [3, 4]}))
    assert "--request-rate-range 50:50 --request-distribution poisson" in poisson
    assert "--concurrency-range" not in poisson and "--shape x:3,4" in poisson


def test_command_for_each_protocol_and_mode(tmp_path: Path) -> None:
    def flags(transport: pa.Transport, size: int | None = None) -> str:
        return " ".join(pa.build_command("pa", "h:1", "m", csv_path=tmp_path / "r.csv",
                                         transport=transport, output_shared_memory_size=size))

    assert flags(pa.Transport("http")).startswith("pa -i http -u h:1 -m m ")
    streaming = flags(pa.Transport("grpc", "streaming"))
    assert "-i grpc " in streaming and " --streaming --async" in streaming
    shared = flags(pa.Transport("http", "shared-memory"), 512)
    assert "-i http " in shared and "--shared-memory system --output-shared-memory-size 512" in (
        shared)
    assert "--output-shared-memory-size" not in flags(pa.Transport("grpc", "shared-memory"))
    plain = flags(pa.Transport())
    assert "--streaming" not in plain and "--shared-memory" not in plain
    assert [t.label for t in (pa.Transport(), pa.Transport("http", "shared-memory"),
                              pa.Transport("grpc", "streaming"))] == [
        "grpc", "http shared-memory", "grpc streaming"]
    with pytest.raises(ValueError, match="perf_analyzer streams over gRPC only"):
        pa.Transport("http", "streaming")
    with pytest.raises(ValueError, match="protocol 'tcp' is not one of grpc, http"):
        pa.Transport("tcp")
    with pytest.raises(ValueError, match="mode 'shm' is not one of plain, streaming"):
        pa.Transport("grpc", "shm")


def test_bench_measures_each_protocol_and_mode_it_can() -> None:
    from onnxserve.serving.cli import build_parser

    args = build_parser().parse_args([
        "bench", "--client", "both", "--pa-protocol", "grpc", "http", "--pa-mode", "plain",
        "streaming", "shared-memory", "--workers", "1", "--batching", "on",
        "--concurrency", "4"])
    runs = [(client, t and t.label) for client, t in bench._runs(args)]
    assert runs == [("python", None), ("perf_analyzer", "grpc"),
                    ("perf_analyzer", "grpc streaming"), ("perf_analyzer", "grpc shared-memory"),
                    ("perf_analyzer", "http"), ("perf_analyzer", "http shared-memory")]
    assert bench.measurements_per_model(args) == 2 * 6  # the null server and onnxserve
    assert [t.label for t in bench._transports(build_parser().parse_args(
        ["bench", "--client", "perf_analyzer"]))] == ["grpc"]
    assert bench._null_refusal(pa.Transport()) is None
    assert "unary gRPC inference only" in bench._null_refusal(pa.Transport("http"))
    assert bench._workers_refusal(1)(pa.Transport("http", "shared-memory")) is None
    assert "with 2 workers" in bench._workers_refusal(2)(pa.Transport("grpc", "shared-memory"))
    assert bench._workers_refusal(2)(pa.Transport("grpc", "streaming")) is None
    assert "statistics calls over HTTP reach any of the 2 workers" in bench._workers_refusal(2)(
        pa.Transport("http"))
    assert bench.client_label({"client": "python"}) == "python"
    assert bench.client_label({"client": "perf_analyzer"}) == "perf_analyzer"
    assert bench.client_label({"client": "perf_analyzer", "pa_protocol": "http",
                               "pa_mode": "shared-memory"}) == (
        "perf_analyzer (http shared-memory)")


@pytest.mark.parametrize(("flags", "message"), [
    (["--pa-mode", "streaming"], "--pa-mode applies to --client perf_analyzer or both, not "
                                 "--client python"),
    (["--pa-protocol", "http"], "--pa-protocol applies to --client perf_analyzer or both"),
    (["--client", "perf_analyzer", "--pa-protocol", "http", "--pa-mode", "streaming"],
     "--pa-mode streaming needs --pa-protocol grpc (perf_analyzer streams over gRPC only)"),
])
def test_bench_refuses_transports_it_cannot_measure(tmp_path: Path, flags: list[str],
                                                    message: str) -> None:
    build_test_models(tmp_path / "repo")
    result = subprocess.run(onnxserve_command(
        "bench", "--model-repository", str(tmp_path / "repo"), "--models", "scores", *flags),
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_input_data_is_one_sample_per_input_in_base64() -> None:
    sample = np.arange(6, dtype=np.float32).reshape(2, 3)
    (step,) = pa.input_data({"x": sample})["data"]
    assert step["x"]["shape"] == [2, 3]
    assert np.frombuffer(base64.b64decode(step["x"]["b64"]), np.float32).tolist() == list(
        range(6))


def test_not_found_says_every_way_to_get_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(pa.ENV_VAR, raising=False)
    with pytest.raises(pa.PerfAnalyzerMissing) as caught:
        pa.find_perf_analyzer(cache=tmp_path / "cache", fetch=False)
    message = str(caught.value)
    assert f"nothing in {tmp_path / 'cache'}" in message and pa.ENV_VAR in message
    assert "pip download tritonclient==2.41.0 nvidia-cuda-runtime-cu12==" in message
    assert "apt-get install libb64-0d" in message

    monkeypatch.setenv(pa.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(pa.PerfAnalyzerMissing, match=f"{pa.ENV_VAR} .*nowhere is not a file"):
        pa.find_perf_analyzer(cache=tmp_path / "cache", fetch=False)
    plain = tmp_path / "perf_analyzer"
    plain.write_text("not a program")
    with pytest.raises(pa.PerfAnalyzerMissing, match="is not executable"):
        pa.find_perf_analyzer(plain, cache=tmp_path / "cache", fetch=False)


def test_a_failed_download_quotes_pip_and_the_manual_steps(tmp_path: Path) -> None:
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'ERROR: No matching distribution found' >&2\n"
                           "exit 1\n")
    fake_python.chmod(0o755)
    with pytest.raises(pa.PerfAnalyzerMissing) as caught:
        pa.fetch_perf_analyzer(tmp_path / "cache", python=str(fake_python))
    message = str(caught.value)
    assert "`pip download nvidia-cuda-runtime-cu12==12.3.101` failed (exit 1)" in message
    assert "No matching distribution found" in message
    assert "to install it by hand: pip download tritonclient==2.41.0" in message
    assert not (tmp_path / "cache" / "perf_analyzer").exists()


def _fake_perf_analyzer(folder: Path, script: str) -> pa.PerfAnalyzer:
    """A stand-in binary: a shell script given perf_analyzer's arguments."""
    binary = folder / "perf_analyzer"
    binary.write_text("#!/bin/bash\n" + script)
    binary.chmod(0o755)
    return pa.PerfAnalyzer(binary)


def test_an_unstable_measurement_is_retried_and_marked(tmp_path: Path) -> None:
    # Unstable at -s 10 (perf_analyzer then writes no report); three windows at any spread.
    analyzer = _fake_perf_analyzer(tmp_path, f"""
args="$*"
csv=$(echo "$args" | sed 's/.* -f \\([^ ]*\\) .*/\\1/')
echo "  Pass [1] throughput: 10 infer/sec. Avg latency: 1 usec (std 1 usec)."
if [[ "$args" == *"-s 10 "* ]]; then
  echo "Failed to obtain stable measurement within 3 measurement windows for concurrency 2."
  exit 2
fi
printf '%s' '{VERBOSE_CSV}' > "$csv"
echo "    Request count: 77"
""")
    result = pa.run_perf_analyzer(analyzer, "127.0.0.1:9", "m", concurrency=2, window_s=0.1,
                                  max_windows=3)
    assert (result.stable, result.windows, result.requests) == (False, 2, 77)
    assert (result.throughput, result.p50_ms, result.errors) == (4280.54, 1.646, 0)
    assert result.pa_server_compute_ms == pytest.approx(0.030)


def test_a_failed_run_quotes_perf_analyzer(tmp_path: Path) -> None:
    analyzer = _fake_perf_analyzer(tmp_path, "echo '*** Measurement Settings ***'\n"
                                   "echo 'error: failed to get model metadata: Method not found!'"
                                   "\nexit 99\n")
    with pytest.raises(pa.PerfAnalyzerFailed) as caught:
        pa.run_perf_analyzer(analyzer, "127.0.0.1:9", "m", window_s=0.1)
    assert str(caught.value) == ("perf_analyzer against 127.0.0.1:9 model m failed (exit 99): "
                                 "error: failed to get model metadata: Method not found!")
    assert caught.value.returncode == 99
    loader = _fake_perf_analyzer(tmp_path, (
        "echo \"$0: error while loading shared libraries: libb64.so.0d: cannot open shared "
        "object file: No such file or directory\" >&2\nexit 127\n"))
    with pytest.raises(pa.PerfAnalyzerMissing,
                       match=re.escape("libb64.so.0d: apt-get install libb64-0d")):
        pa.run_perf_analyzer(loader, "127.0.0.1:9", "m", window_s=0.1)


def test_markdown_puts_each_client_in_its_own_column() -> None:
    row = {"mode": "closed", "concurrency": 16, "rate": None, "throughput": 3000.0,
           "p50_ms": 5.0, "p90_ms": 6.0, "p99_ms": 9.0, "errors": 0, "client_cpu_percent": 50.0,
           "server_cpu_percent": 90.0, "workers": 1, "batching": "on", "stable": True}
    results = [{"model": "lenet5", "samples_per_request": 1,
                "raw_onnxruntime": {"1": {"throughput": 6000.0, "p50_ms": 0.1}},
                "null_server": [{k: v for k, v in row.items() if k not in ("workers", "batching")}
                                | {"client": "python", "throughput": 6000.0}],
                "onnxserve": [{**row, "client": "python"},
                              {**row, "client": "perf_analyzer", "throughput": 4500.0,
                               "stable": False}],
                "perf_analyzer_not_measured": [
                    {"server": "null", "client": "perf_analyzer", "mode": "closed",
                     "concurrency": 16, "rate": None, "reason": "error: Method not found!"}]}]
    meta = {"command": "onnxserve bench", "machine": "2 cores", "warmup": 2.0, "window": 3.0,
            "clients": ["python", "perf_analyzer"], "perf_analyzer": "Perf Analyzer 2.41.0"}
    text = bench.markdown(results, meta)
    assert "| load | client | inf/s |" in text
    assert "| null |  |  | c=16 | python | 6000 | 1.00 |  |" in text
    assert "| onnxserve | 1 | on | c=16 | python | 3000 | 0.50 | 0.50 |" in text
    assert "| onnxserve | 1 | on | c=16 | perf_analyzer (unstable) | 4500 | 0.75 |  |" in text
    assert ("perf_analyzer cannot measure the null server, whose rows are the Python client's "
            "only: error: Method not found!") in text
    assert "`Perf Analyzer 2.41.0`" in text and "none of it is Python's" in text


def test_markdown_names_each_transport_and_why_one_was_not_measured() -> None:
    row = {"mode": "closed", "concurrency": 4, "rate": None, "throughput": 1000.0,
           "p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0, "errors": 0, "client_cpu_percent": 50.0,
           "server_cpu_percent": 90.0, "stable": True, "client": "perf_analyzer"}
    load = {"mode": "closed", "concurrency": 4, "rate": None, "client": "perf_analyzer"}
    results = [{"model": "lenet5", "samples_per_request": 1,
                "raw_onnxruntime": {"1": {"throughput": 2000.0, "p50_ms": 0.1}},
                "null_server": [{**row, "pa_protocol": "grpc", "pa_mode": "plain",
                                 "throughput": 4000.0}],
                "onnxserve": [{**row, "workers": 1, "batching": "on", "pa_protocol": p,
                               "pa_mode": m}
                              for p, m in (("grpc", "plain"), ("grpc", "streaming"),
                                           ("http", "shared-memory"))],
                "perf_analyzer_not_measured": [
                    {**load, "server": "null", "pa_protocol": "http", "pa_mode": "plain",
                     "reason": "the null server answers unary gRPC inference only",
                     "skipped": True},
                    *({**load, "concurrency": c, "server": "onnxserve", "workers": 2,
                       "batching": "on", "pa_protocol": "grpc", "pa_mode": "shared-memory",
                       "reason": "regions belong to one process", "skipped": True}
                      for c in (1, 4))]}]
    meta = {"command": "onnxserve bench", "machine": "2 cores", "warmup": 2.0, "window": 3.0,
            "clients": ["perf_analyzer"], "perf_analyzer": "Perf Analyzer 2.41.0"}
    text = bench.markdown(results, meta)
    assert "| onnxserve | 1 | on | c=4 | perf_analyzer (grpc) | 1000 | 0.50 | 0.25 |" in text
    assert "| onnxserve | 1 | on | c=4 | perf_analyzer (grpc streaming) | 1000 | 0.50 |  |" in text
    assert "| c=4 | perf_analyzer (http shared-memory) | 1000 |" in text
    assert ("perf_analyzer (http) does not measure the null server: the null server answers "
            "unary gRPC inference only") in text
    assert ("perf_analyzer (grpc shared-memory) did not measure onnxserve, 2 worker(s), "
            "batching on, at c=1, c=4: regions belong to one process") in text


def test_bench_refuses_a_perf_analyzer_it_would_not_use(tmp_path: Path) -> None:
    build_test_models(tmp_path / "repo")
    base = ["bench", "--model-repository", str(tmp_path / "repo"), "--models", "scores"]
    unused = subprocess.run(onnxserve_command(*base, "--perf-analyzer", "/bin/true"),
                            capture_output=True, text=True, timeout=60)
    assert unused.returncode == 2
    assert ("--perf-analyzer applies to --client perf_analyzer or both, not --client python"
            in unused.stderr)
    missing = subprocess.run(onnxserve_command(*base, "--client", "both"), capture_output=True,
                             text=True, timeout=60,
                             env={**os.environ, pa.ENV_VAR: str(tmp_path / "none")})
    assert missing.returncode == 2
    assert (f"--client both needs perf_analyzer: {pa.ENV_VAR} {tmp_path / 'none'} is not a file"
            in missing.stderr), missing.stderr
