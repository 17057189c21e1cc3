"""Stopping at any moment, and the --workers supervisor.

A stop (SIGTERM) exits 0 in every phase: right after spawn, while importing, while loading
models (without waiting for the rest and without ever reporting ready), while serving under
load (every call ends OK or UNAVAILABLE, never CANCELLED). With --workers N, a worker that
dies while serving is logged and restarted; one that fails at start-up fails the command.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from support import SUPPORT
from support.onnx_models import slow_model
from support.repositories import build_test_models, write_config

from onnxserve.clients.client import Client
from onnxserve.protos import inference_pb2 as pb
from onnxserve.serving.process import free_port, onnxserve_command, spawn

pytestmark = pytest.mark.grpc  # run over both gRPC transports (make test)


def _spawn(repository: Path, log_path: Path, *extra: str, held: bool = True,
           port: int | None = None) -> tuple[subprocess.Popen, str]:
    """`onnxserve serve` on 127.0.0.1; ``held``: started with SIGTERM/SIGINT blocked, as
    onnxserve's own --workers parent starts its workers (the server unblocks them)."""
    port = port or free_port()
    process = spawn(
        onnxserve_command("serve", "--model-repository", str(repository), "--grpc-host",
                          "127.0.0.1", "--grpc-port", str(port), "--http-port", "0", *extra),
        hold_signals=held, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return process, f"127.0.0.1:{port}"


def _wait_for(condition: Callable[[], bool], timeout: float, what: str,
              process: subprocess.Popen | None = None, log_path: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode} before {what}:\n"
                                 f"{log_path.read_text() if log_path else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s:\n"
                                 f"{log_path.read_text() if log_path else ''}")
        time.sleep(0.02)


def _stop(process: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM, then the exit status (SIGKILL and fail if it does not exit in time)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"still running {timeout} s after SIGTERM") from None


@pytest.fixture(scope="module")
def small_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("repository")
    build_test_models(folder)
    return folder


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2, 0.5])
def test_a_stop_right_after_spawn_exits_0(small_repository: Path, tmp_path: Path,
                                           workers: int, delay: float) -> None:
    log_path = tmp_path / "server.log"
    process, _ = _spawn(small_repository, log_path, "--workers", str(workers),
                        "--metrics-port", "0")
    time.sleep(delay)
    code = _stop(process)
    assert code == 0, log_path.read_text()
    assert "Traceback" not in log_path.read_text()


def _signals_caught(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    return 0


@pytest.mark.parametrize("workers", [1, 2])
def test_the_stop_handler_comes_before_the_heavy_imports(small_repository: Path,
                                                         tmp_path: Path, workers: int) -> None:
    """Started as an orchestrator starts it (signals not held): from the moment its SIGTERM
    handler exists, before grpc or onnxruntime is loaded, a SIGTERM exits 0."""
    log_path = tmp_path / "server.log"
    process, _ = _spawn(small_repository, log_path, "--workers", str(workers),
                        "--metrics-port", "0", held=False)
    sigterm = 1 << (signal.SIGTERM - 1)
    _wait_for(lambda: _signals_caught(process.pid) & sigterm, 30, "SIGTERM handler",
              process, log_path)
    process.send_signal(signal.SIGSTOP)  # hold it still while we look at what it loaded
    try:
        maps = Path(f"/proc/{process.pid}/maps").read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGCONT)
    assert "cygrpc" not in maps and "onnxruntime" not in maps
    assert _stop(process) == 0, log_path.read_text()


def _slow_loading_repository(folder: Path, models: int = 6) -> Path:
    """``models`` models whose warm-up runs 400 batches of 64 (a second or two each)."""
    for i in range(models):
        slow_model(folder / f"slow{i}" / "1" / "model.onnx")
        write_config(folder / f"slow{i}", (
            "max_batch_size: 64\ndynamic_batching { }\n"
            'model_warmup { name: "long" batch_size: 64 count: 400 inputs { key: "x" '
            'value { data_type: TYPE_FP32 dims: [1024] zero_data: true } } }\n'))
    return folder


def test_a_stop_while_models_load_exits_0_without_loading_the_rest(tmp_path: Path) -> None:
    log_path = tmp_path / "server.log"
    process, _ = _spawn(_slow_loading_repository(tmp_path / "repo"), log_path,
                        "--metrics-port", "0", held=False)
    _wait_for(lambda: "model_loaded" in log_path.read_text(), 60, "first model loaded",
              process, log_path)
    loaded = log_path.read_text().count("model_loaded")
    signalled = time.monotonic()
    code = _stop(process)
    took = time.monotonic() - signalled
    log = log_path.read_text()
    print(f"stopped {took:.2f} s after SIGTERM, {loaded} of 6 models loaded then, "
          f"{log.count('model_loaded')} at exit")
    assert code == 0, log
    assert "stopping while loading models" in log
    assert "ready:" not in log  # never reported ready
    assert log.count("model_loaded") <= loaded + 1 < 6  # the rest were not loaded
    assert took < 5, log


def _slow_request_bytes() -> bytes:
    request = pb.ModelInferRequest(model_name="slow")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 1024])
    request.raw_input_contents.append(np.ones((1, 1024), np.float32).tobytes())
    return request.SerializeToString()


async def _closed_loop(url: str, process: subprocess.Popen, clients: int,
                       stop_after: float) -> Counter:
    """``clients`` raw grpc.aio clients, one connection each, each sending its next request
    when the last is answered, and retrying UNAVAILABLE after 1 ms, as long as the server
    runs (at most 30 s); SIGTERM to the server after ``stop_after`` s."""
    payload = _slow_request_bytes()
    codes: Counter = Counter()
    deadline = time.monotonic() + 30

    async def client() -> None:
        async with grpc.aio.insecure_channel(url) as channel:
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            while process.poll() is None and time.monotonic() < deadline:
                try:
                    await infer(payload, timeout=30)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        codes[f"{exc.code().name}: {exc.details()}"] += 1
                    await asyncio.sleep(0.001)

    async def stopper() -> None:
        await asyncio.sleep(stop_after)
        process.send_signal(signal.SIGTERM)

    await asyncio.gather(stopper(), *(client() for _ in range(clients)))
    return codes


def test_sigterm_under_closed_loop_load_answers_ok_or_unavailable(tmp_path: Path) -> None:
    slow_model(tmp_path / "slow" / "1" / "model.onnx")
    write_config(tmp_path / "slow", "max_batch_size: 8\ndynamic_batching { }\n")
    for attempt in range(4):
        log_path = tmp_path / f"server{attempt}.log"
        process, url = _spawn(tmp_path, log_path, "--metrics-port", "0", "--drain-seconds",
                              "20", held=False)
        _wait_for(lambda p=log_path: "ready:" in p.read_text(), 60, "ready", process,
                  log_path)
        codes = asyncio.run(_closed_loop(url, process, clients=16, stop_after=1.5))
        code = _stop(process)
        print(f"attempt {attempt}: exit {code}, {dict(codes)}")
        assert code == 0, log_path.read_text()
        assert codes["OK"] > 50 and codes["UNAVAILABLE"] > 0, codes
        assert set(codes) <= {"OK", "UNAVAILABLE"}, codes


def _children(pid: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def test_a_worker_killed_while_serving_is_restarted(small_repository: Path,
                                                    tmp_path: Path) -> None:
    log_path = tmp_path / "server.log"
    process, url = _spawn(small_repository, log_path, "--workers", "2", "--metrics-port", "0",
                          held=False)
    x = np.ones((1, 5), np.float32)

    def infer_on_new_connections(count: int) -> None:
        for _ in range(count):  # a new connection may land on either worker
            with Client(url, timeout=10) as client:
                assert client.infer("scores", {"scores_in": x})["scores"].tolist() == x.tolist()

    try:
        _wait_for(lambda: log_path.read_text().count("models loaded") == 2, 60,
                  "both workers ready", process, log_path)
        infer_on_new_connections(4)
        workers = _children(process.pid)
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        # The supervisor's line, which follows the worker's own "models loaded" (another
        # process) once it reads the worker's readiness pipe.
        _wait_for(lambda: len(re.findall(r"worker \d ready \(pid", log_path.read_text())) == 3,
                  60, "a new worker, ready", process, log_path)
        (replacement,) = _children(process.pid) - workers
        log = log_path.read_text()
        assert re.search(rf"worker \d \(pid {victim}\) was killed by SIGKILL while serving; "
                         r"restarting it in 1 s", log), log
        assert re.search(rf"worker \d ready \(pid {replacement}\)", log), log
        infer_on_new_connections(8)
    finally:
        code = _stop(process)
    assert code == 0, log_path.read_text()
    assert "all workers stopped" in log_path.read_text()


def test_a_worker_that_fails_at_start_up_fails_the_command(small_repository: Path) -> None:
    with socket.socket() as taken:
        while True:  # a metrics port P whose P + 1 we can hold
            metrics_port = free_port()
            try:
                taken.bind(("127.0.0.1", metrics_port + 1))
                break
            except OSError:
                continue
        taken.listen()
        started = time.monotonic()
        result = subprocess.run(
            onnxserve_command("serve", "--model-repository", str(small_repository),
                              "--grpc-host", "127.0.0.1", "--grpc-port", str(free_port()),
                              "--http-port", "0", "--workers", "2", "--metrics-port",
                              str(metrics_port)),
            capture_output=True, text=True, timeout=60)
        took = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert (f"cannot listen for metrics on 127.0.0.1:{metrics_port + 1}: Address already in "
            "use (choose another port with --metrics-port, 0 = off)") in output
    assert re.search(r"worker 1 \(pid \d+\) exited with status 2 before it was ready: it "
                     r"failed at start-up", output), output
    assert "worker 0" in output and "Traceback" not in output
    assert took < 30, output


SUPERVISOR = """
import logging, sys
from onnxserve.serving import workers
from onnxserve.serving.settings import ServerSettings
logging.basicConfig(level=logging.INFO, format="%(message)s")
workers.FIRST_RESTART_DELAY_S = 0.05
workers.RESTART_WINDOW_S = 60
command = [sys.executable, sys.argv[1], sys.argv[2]]
sys.exit(workers._Supervisor(ServerSettings(workers=2, metrics_port=0), command).run())
"""


@pytest.mark.parametrize("behaviour, status, message", [
    ("die", 1, "5 worker exits within 60 s are not a one-off"),
    ("fail-at-start", 3, "exited with status 3 before it was ready"),
])
def test_the_supervisor_gives_up_on_workers_that_keep_failing(
        tmp_path: Path, behaviour: str, status: int, message: str) -> None:
    """The restart policy with stand-in workers: a worker that keeps dying is restarted
    until RESTART_LIMIT exits, then everything stops with status 1; a worker that never
    gets ready fails the whole command with its status."""
    result = subprocess.run([sys.executable, "-c", SUPERVISOR,
                             str(SUPPORT / "fake_workers.py"), behaviour],
                            capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == status, output
    assert message in output
    if behaviour == "die":
        assert output.count("restarting it in") == 4, output


_MIDDLE = """
import sys, time
from onnxserve.serving.process import spawn
child = spawn([sys.executable, "-c", sys.argv[1]], hold_signals=sys.argv[2] == "held")
print(child.pid, flush=True)
time.sleep(60)
"""
_CHILD = """
import os, signal, sys, time
from onnxserve.serving.process import PARENT_PID_ENV, die_with_parent_if_asked
blocked = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
die_with_parent_if_asked()
assert PARENT_PID_ENV not in os.environ
print("blocked" if blocked else "open", flush=True)
signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
time.sleep(60)
"""


@pytest.mark.parametrize("held", ["held", "open"])
def test_spawned_children_die_with_their_parent(tmp_path: Path, held: str) -> None:
    """process.spawn (no preexec_fn): the child sets its own death signal, and with
    hold_signals starts with SIGTERM blocked; killing the parent ends the child."""
    log = tmp_path / "child.log"
    middle = subprocess.Popen([sys.executable, "-c", _MIDDLE, _CHILD.replace(
        "flush=True)", f"flush=True, file=open({str(log)!r}, 'w'))"), held],
        stdout=subprocess.PIPE, text=True)
    try:
        assert middle.stdout is not None
        child = int(middle.stdout.readline())
        _wait_for(lambda: log.is_file() and log.read_text().strip() != "", 30,
                  "the child to start")
        assert log.read_text().strip() == ("blocked" if held == "held" else "open")
    finally:
        middle.kill()
        middle.wait()

    def gone() -> bool:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        stat = Path(f"/proc/{child}/stat")
        return stat.exists() and stat.read_text().rpartition(")")[2].split()[0] == "Z"

    _wait_for(gone, 30, "the child to die with its parent")


_FORK_HANDLERS = """
import os, sys
from onnxserve.serving.process import ServerProcess, spawn
marker = sys.argv[1]
os.register_at_fork(after_in_child=lambda: open(marker, "a").write("forked "))
spawn([sys.executable, "-c", "pass"], hold_signals=True).wait()
spawn([sys.executable, "-c", "pass"], hold_signals=False).wait()
ServerProcess([sys.executable, "-c", "pass"], "127.0.0.1:1", serve=False).process.wait()
"""


def test_children_start_without_running_fork_handlers(tmp_path: Path) -> None:
    """gRPC's fork handlers (grpcio >= 1.80) crash a forked child whose parent has channels
    or servers ("epoll_wait: Bad file descriptor") before it runs: servers, workers and
    benchmark servers are started without a fork that runs them (no preexec_fn)."""
    marker = tmp_path / "marker"
    subprocess.run([sys.executable, "-c", _FORK_HANDLERS, str(marker)], check=True,
                   timeout=60)
    assert not marker.exists(), marker.read_text()


def test_the_server_runs_and_drains_on_uvloop(tmp_path: Path) -> None:
    """--event-loop uvloop: the same server (gRPC and HTTP on one loop) under load, and a
    SIGTERM that drains it (admitted requests answered, new ones UNAVAILABLE), exit 0."""
    slow_model(tmp_path / "slow" / "1" / "model.onnx")
    write_config(tmp_path / "slow", "max_batch_size: 8\ndynamic_batching { }\n")
    log_path = tmp_path / "server.log"
    process, url = _spawn(tmp_path, log_path, "--metrics-port", "0", "--drain-seconds", "20",
                          "--event-loop", "uvloop", held=False)
    _wait_for(lambda: "ready:" in log_path.read_text(), 60, "ready", process, log_path)
    assert "uvloop" in Path(f"/proc/{process.pid}/maps").read_text()
    codes = asyncio.run(_closed_loop(url, process, clients=16, stop_after=1.5))
    assert _stop(process) == 0, log_path.read_text()
    assert codes["OK"] > 50 and set(codes) <= {"OK", "UNAVAILABLE"}, codes
