"""Keepalive: clients that ping every second, busy or idle, are never disconnected.

gRPC's server defaults (Triton's too) count a ping that comes sooner than 5 minutes after the
previous one while no data flows (2 hours on a connection with no call) as a strike, and
after 2 strikes close the connection with GOAWAY "too_many_pings": the calls in flight fail
UNAVAILABLE. tritonclient with KeepAliveOptions(keepalive_time_ms=1000,
http2_max_pings_without_data=0), Go and Rust clients and cloud load balancers ping like that.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import SUPPORT
from support.onnx_models import add_one_model
from support.repositories import write_config
from support.served import start_server

pytestmark = pytest.mark.grpc  # run over both gRPC transports (make test)

CLIENT = SUPPORT / "keepalive_client.py"
#: how long the model holds a request: its batcher waits this long for a batch of 8. Under
#: gRPC's default policy a client pinging every second is cut off 4-5 s into such a call
HOLD_S = 6.5


def _held_model(folder: Path) -> None:
    add_one_model(folder / "1" / "model.onnx")
    write_config(folder, (
        'max_batch_size: 8\n'
        'input { name: "x" data_type: TYPE_FP32 dims: [4] }\n'
        'output { name: "y" data_type: TYPE_FP32 dims: [4] }\n'
        'output { name: "z" data_type: TYPE_FP32 dims: [4] }\n'
        f'dynamic_batching {{ preferred_batch_size: [8] '
        f'max_queue_delay_microseconds: {int(HOLD_S * 1e6)} }}\n'))


def _run_clients(url: str, modes: list[str]) -> dict[str, tuple[int, dict | None, str]]:
    """Each mode's client in its own process, all at once; (exit code, result, stderr)."""
    processes = {
        mode: subprocess.Popen([sys.executable, str(CLIENT), mode, url, f"held_{mode}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for mode in modes
    }
    results = {}
    for mode, process in processes.items():
        try:
            out, err = process.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        results[mode] = (process.returncode, json.loads(out) if out.strip() else None, err)
    return results


def _repository(folder: Path, modes: list[str]) -> Path:
    for mode in modes:
        _held_model(folder / f"held_{mode}")
    return folder


def test_clients_pinging_every_second_keep_their_connection(tmp_path: Path) -> None:
    modes = ["aio", "triton", "triton-idle"]
    server = start_server(_repository(tmp_path, modes), tmp_path / "server.log")
    try:
        results = _run_clients(server.url, modes)
    finally:
        assert server.stop() == 0
    for mode, (code, result, err) in results.items():
        assert code == 0 and result is not None, f"{mode}: {err[-3000:]}"
        print(mode, result)
        assert "too_many_pings" not in err, f"{mode}: {err[-3000:]}"
        assert result["calls"], mode
        for status, seconds in result["calls"]:
            assert status == "OK", (mode, result)
            assert seconds >= HOLD_S - 1, (mode, result)  # the call really waited, pinging
        assert result["states"] == [], (mode, result)  # the connection never went away


def test_tritons_strict_ping_policy_is_still_available_by_flag(tmp_path: Path) -> None:
    """Triton's defaults, set by flag: the same client is cut off (the flags reach gRPC)."""
    server = start_server(_repository(tmp_path, ["triton"]), tmp_path / "server.log",
                          "--grpc-keepalive-permit-without-calls", "false",
                          "--grpc-http2-min-recv-ping-interval-without-data", "300000",
                          "--grpc-http2-max-ping-strikes", "2")
    try:
        ((code, result, err),) = _run_clients(server.url, ["triton"]).values()
    finally:
        assert server.stop() == 0
    assert code == 0 and result is not None, err[-3000:]
    first_status, seconds = result["calls"][0]
    assert first_status.startswith("StatusCode.UNAVAILABLE"), result
    assert seconds < HOLD_S, result
    assert "too_many_pings" in err


def test_keepalive_flags_and_environment_reach_the_grpc_options(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxserve.serving.cli import build_parser
    from onnxserve.serving.server import grpc_options
    from onnxserve.serving.settings import ServerSettings, settings_from_arguments

    monkeypatch.setenv("ONNXSERVE_GRPC_KEEPALIVE_TIME", "60000")
    monkeypatch.setenv("ONNXSERVE_GRPC_KEEPALIVE_PERMIT_WITHOUT_CALLS", "0")
    args = build_parser().parse_args(["serve", "--grpc-keepalive-timeout", "5000",
                                      "--grpc-http2-max-ping-strikes", "3",
                                      "--grpc-http2-min-recv-ping-interval-without-data",
                                      "10000", "--grpc-http2-max-pings-without-data", "0"])
    settings = settings_from_arguments(args)
    options = dict(grpc_options(settings))
    assert options["grpc.keepalive_time_ms"] == 60000
    assert options["grpc.keepalive_timeout_ms"] == 5000
    assert options["grpc.keepalive_permit_without_calls"] == 0
    assert options["grpc.http2.max_pings_without_data"] == 0
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 10000
    assert options["grpc.http2.max_ping_strikes"] == 3
    defaults = dict(grpc_options(ServerSettings()))
    assert defaults["grpc.keepalive_permit_without_calls"] == 1
    assert defaults["grpc.http2.max_ping_strikes"] == 0
    with pytest.raises(ValueError, match="--grpc-keepalive-time must be an integer from 1"):
        ServerSettings(grpc_keepalive_time_ms=0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--grpc-keepalive-permit-without-calls", "maybe"])
