"""Operating the server: metrics, request ids and logs, auth and TLS, drain, overload."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.repositories import build_test_models, write_config
from support.served import certificates, slow_repository, slow_request, start_server, tls_server

from onnxserve.clients.client import Client, InferenceServerError
from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos import inference_pb2_grpc
from onnxserve.serving.process import free_port, onnxserve_command

pytestmark = pytest.mark.grpc  # run over both gRPC transports (make test)


def _add_one_request(request_id: str = "", shape=(1, 4)) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="add_one", id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=shape)
    request.raw_input_contents.append(np.zeros(shape, np.float32).tobytes())
    return request


def _samples(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_count_requests_by_model_version_and_status(tmp_path: Path) -> None:
    build_test_models(tmp_path)
    port = free_port()
    server = start_server(tmp_path, tmp_path / "server.log", "--metrics-port", str(port))
    try:
        with grpc.insecure_channel(server.url) as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(3):
                stub.ModelInfer(_add_one_request(), timeout=10)
            for request in (_add_one_request(shape=(1, 5)),
                            pb.ModelInferRequest(model_name="no_such_model")):
                with pytest.raises(grpc.RpcError):
                    stub.ModelInfer(request, timeout=10)
        m = _samples(port)
        ok = ("onnxserve_requests_total", (("model", "add_one"), ("protocol", "grpc"),
                                           ("status", "OK"), ("version", "2")))
        assert m[ok] == 3
        bad = ("onnxserve_requests_total", (("model", "add_one"), ("protocol", "grpc"),
                                            ("status", "INVALID_ARGUMENT"), ("version", "2")))
        assert m[bad] == 1
        unknown = ("onnxserve_requests_total", (("model", "_unknown"), ("protocol", "grpc"),
                                                ("status", "NOT_FOUND"), ("version", "")))
        assert m[unknown] == 1
        labels = (("model", "add_one"), ("version", "2"))
        assert m[("onnxserve_inferences_total", labels)] == 3
        assert m[("onnxserve_batch_size_count", labels)] == 3
        assert m[("onnxserve_request_duration_seconds_count",
                  (("model", "add_one"), ("protocol", "grpc"), ("version", "2")))] == 3
        assert m[("onnxserve_queue_duration_seconds_count", labels)] == 3
        assert m[("onnxserve_compute_duration_seconds_sum", labels)] > 0
        assert m[("onnxserve_inflight_requests", labels)] == 0
        assert m[("onnxserve_queue_depth", labels)] == 0
        assert m[("onnxserve_model_state", (("model", "echo"), ("state", "READY")))] == 1
        assert m[("onnxserve_model_instances", (("device", "CPU"), ("model", "add_one"),
                                                ("provider", "CPUExecutionProvider"),
                                                ("version", "2")))] == 1
    finally:
        server.stop()


def test_request_ids_are_echoed_generated_and_logged(tmp_path: Path) -> None:
    build_test_models(tmp_path)
    server = start_server(tmp_path, tmp_path / "server.log", "--log-format", "json")
    try:
        with grpc.insecure_channel(server.url) as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ModelInfer(_add_one_request("mine-1"), timeout=10).id == "mine-1"
            generated = stub.ModelInfer(_add_one_request(), timeout=10).id
            assert len(generated) == 32 and int(generated, 16) >= 0
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(_add_one_request("bad-1", shape=(1, 5)), timeout=10)
            assert ("request-id", "bad-1") in tuple(err.value.trailing_metadata())
    finally:
        server.stop()
    events = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    loaded = [e for e in events if e.get("event") == "model_loaded"]
    assert {e["model"] for e in loaded} == {"add_one", "echo", "scores"}
    (failed,) = [e for e in events if e.get("event") == "request_failed"]
    assert failed["request_id"] == "bad-1" and failed["status"] == "INVALID_ARGUMENT"
    assert failed["model"] == "add_one" and failed["version"] == "2"
    assert "expected shape" in failed["reason"]


TOKEN = "s3cret-token-0123456789"


def test_bearer_token_guards_everything_but_health(tmp_path: Path) -> None:
    build_test_models(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    metrics_port = free_port()
    server = start_server(tmp_path, tmp_path / "server.log", "--auth-token-file",
                          str(token_file), "--metrics-port", str(metrics_port), token=TOKEN)
    try:
        # the metrics stay open and plain, and the start-up log says so
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=10) as scraped:
            assert b"onnxserve_requests_total" in scraped.read()
        assert "plain HTTP, open to all: the token guards" in server.output()
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(server.url) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "liveness", "add_one"):
                request = health_pb2.HealthCheckRequest(service=service)
                status = health.Check(request, timeout=10).status
                assert status == health_pb2.HealthCheckResponse.SERVING, service
        from onnxserve.serving.commands.health import check

        assert check(server.url).status == "SERVING"
        assert check(server.url, "nope").status == "NOT_FOUND"
        for token, message in ((None, "missing authorization"), ("wrong-token-000000000",
                                                                "not valid")):
            with Client(server.url, token=token) as client:
                for call in (client.is_server_ready, lambda c=client: c.infer(
                        "add_one", {"x": np.zeros((1, 4), np.float32)})):
                    with pytest.raises(InferenceServerError) as err:
                        call()
                    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
                    assert message in err.value.message
        with Client(server.url, token=TOKEN) as client:
            assert client.is_server_ready()
            assert client.infer("add_one", {"x": np.zeros((1, 4), np.float32)})["y"].sum() == 4
    finally:
        server.stop()


def test_a_short_token_stops_the_server_at_start(tmp_path: Path) -> None:
    import subprocess

    (tmp_path / "token").write_text("short")
    result = subprocess.run(onnxserve_command("serve", "--model-repository", str(tmp_path),
                                              "--metrics-port", "0", "--auth-token-file",
                                              str(tmp_path / "token")),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "at least 16 characters" in result.stderr


def test_tls_and_mutual_tls(tmp_path: Path) -> None:
    build_test_models(tmp_path)
    files = certificates(tmp_path)
    ca = files["ca"].read_bytes()
    process, url = tls_server(tmp_path, files)
    try:
        with Client(url, root_certificates=ca, timeout=10) as client:
            assert client.is_server_ready()
        with Client(url, timeout=3) as plain, pytest.raises(InferenceServerError):
            plain.is_server_live()
    finally:
        process.stop()
    process, url = tls_server(tmp_path, files, "--tls-client-ca", str(files["ca"]))
    try:
        with Client(url, root_certificates=ca, timeout=5) as anonymous, pytest.raises(
                InferenceServerError):
            anonymous.is_server_live()
        with Client(url, root_certificates=ca, private_key=files["client_key"].read_bytes(),
                    certificate_chain=files["client_cert"].read_bytes(), timeout=10) as client:
            assert client.is_server_ready()
    finally:
        process.stop()


def test_sigterm_under_load_answers_every_admitted_request(tmp_path: Path) -> None:
    slow_repository(tmp_path)
    server = start_server(tmp_path, tmp_path / "server.log", "--drain-seconds", "20")
    outcomes: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + 30

    def load() -> None:
        with grpc.insecure_channel(server.url) as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            while time.monotonic() < stop_at:
                try:
                    stub.ModelInfer(slow_request(), timeout=30)
                    result = "OK"
                except grpc.RpcError as exc:
                    result = exc.code().name
                with lock:
                    outcomes.append(result)
                if result == "UNAVAILABLE":
                    return  # refused: the server is going away

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    ok_before = outcomes.count("OK")
    server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(60)
    for t in threads:
        t.join(60)
    print(f"drain: {outcomes.count('OK')} answered, {outcomes.count('UNAVAILABLE')} refused "
          f"after SIGTERM, exit {code}")
    assert code == 0
    assert ok_before > 10
    # Admitted requests all succeed; the only failures are refusals of new ones.
    assert set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes
    output = server.output()
    assert "stopping: finishing in-flight requests" in output
    # The refusals of the drain are a few lines and a summary, logged before the exit.
    refused = [line for line in output.splitlines()
               if " request_failed " in line and "status=UNAVAILABLE" in line]
    assert len(refused) <= 5, refused
    if outcomes.count("UNAVAILABLE") > 5:
        assert "requests_failed_summary status=UNAVAILABLE" in output


def test_overload_is_refused_promptly_and_admitted_requests_succeed(tmp_path: Path) -> None:
    """About 3x capacity for 20 s against a queue bounded at 16 requests."""
    import asyncio
    import os

    slow_repository(tmp_path, queue=16)
    server = start_server(tmp_path, tmp_path / "server.log")
    payload = slow_request().SerializeToString()
    results: dict[str, list[float]] = {}

    def rss_mb() -> float:
        fields = Path(f"/proc/{server.process.pid}/status").read_text().split("VmRSS:")[1]
        return int(fields.split()[0]) / 1024

    async def client(url: str, seconds: float) -> None:
        async with grpc.aio.insecure_channel(url) as channel:
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            deadline = time.monotonic() + seconds

            async def one_caller() -> None:
                while time.monotonic() < deadline:
                    started = time.perf_counter()
                    try:
                        await infer(payload, timeout=30)
                        code = "OK"
                    except grpc.aio.AioRpcError as exc:
                        code = exc.code().name
                        if code == "UNAVAILABLE":
                            await asyncio.sleep(0.005)
                    results.setdefault(code, []).append(time.perf_counter() - started)

            # 72 callers against at most 24 admitted (a queue of 16, a batch of 8 running).
            await asyncio.gather(*(one_caller() for _ in range(72)))

    try:
        asyncio.run(client(server.url, 2.0))  # warm up and settle memory
        before = rss_mb()
        results.clear()
        asyncio.run(client(server.url, 20.0))
        after = rss_mb()
        with Client(server.url) as check:
            assert check.is_server_ready()
    finally:
        server.stop()
    assert set(results) <= {"OK", "UNAVAILABLE"}, {k: len(v) for k, v in results.items()}
    assert len(results.get("OK", [])) > 100
    refusals = sorted(results.get("UNAVAILABLE", []))
    assert len(refusals) > 100
    assert refusals[int(len(refusals) * 0.99)] < 0.25  # refused at once, not after a wait
    assert after - before < 100, f"server memory grew from {before:.0f} to {after:.0f} MB"
    # Thousands of refusals: a few lines and a summary per 10 s window, not a line each.
    log_lines = server.output().splitlines()
    per_request = [line for line in log_lines if " request_failed " in line]
    summaries = [line for line in log_lines if " requests_failed_summary " in line]
    assert len(per_request) <= 5 * 4, per_request[:10]
    assert summaries and all("status=UNAVAILABLE" in line for line in summaries)
    print(f"overload: {len(results['OK'])} ok, {len(refusals)} refused (p99 "
          f"{refusals[int(len(refusals) * 0.99)] * 1e3:.1f} ms), RSS {before:.0f} -> "
          f"{after:.0f} MB, pid {os.getpid()}")


def test_waiting_for_readiness_reports_a_failed_load_at_once(tmp_path: Path) -> None:
    build_test_models(tmp_path)
    write_config(tmp_path / "broken", 'name: "broken"\nmax_batch_size: -1\n')
    (tmp_path / "broken" / "1").mkdir()
    server = start_server(tmp_path, tmp_path / "server.log")
    try:
        with Client(server.url, timeout=5) as client:
            started = time.monotonic()
            with pytest.raises(RuntimeError, match=r"models failed to load: broken: .*"
                                                   r"max_batch_size must be >= 0"):
                client.wait_until_ready(60)
            assert time.monotonic() - started < 5
            with pytest.raises(RuntimeError, match="exited before it was ready"):
                client.wait_until_ready(60, alive=lambda: False)
    finally:
        server.stop()
    healthy = tmp_path / "healthy"
    build_test_models(healthy)
    server = start_server(healthy, tmp_path / "healthy.log")
    try:
        with Client(server.url, timeout=5) as client:
            client.wait_until_ready(10)
    finally:
        server.stop()


def test_json_and_text_logs_name_the_worker() -> None:
    import io
    import logging

    from onnxserve.serving.observability.logs import configure, event

    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        for fmt in ("json", "text"):
            configure("INFO", fmt, "worker 3")
            root.handlers[0].setStream(stream)
            event(logging.getLogger("onnxserve.test"), logging.INFO, "model_loaded", model="m")
        json_line, text_line = stream.getvalue().splitlines()
        assert json.loads(json_line)["worker"] == "worker 3"
        assert "[worker 3] onnxserve.test: model_loaded model=m" in text_line
        configure("INFO", "json")
        root.handlers[0].setStream(stream)
        logging.getLogger("onnxserve.test").info("alone")
        assert "worker" not in json.loads(stream.getvalue().splitlines()[-1])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_stage_timing_adds_up_each_stage_of_a_request(tmp_path: Path) -> None:
    build_test_models(tmp_path)
    port = free_port()
    server = start_server(tmp_path, tmp_path / "server.log", "--stage-timing",
                          "--metrics-port", str(port))
    try:
        with Client(server.url) as client:
            for _ in range(5):
                client.infer("add_one", {"x": np.zeros((1, 4), np.float32)})
        samples = _samples(port)
        count = {labels[0][1]: value for (name, labels), value in samples.items()
                 if name == "onnxserve_stage_count_total"}
        seconds = {labels[0][1]: value for (name, labels), value in samples.items()
                   if name == "onnxserve_stage_seconds_total"}
        for stage in ("build", "validate", "decode", "prepare", "batch", "strings", "observe",
                      "encode", "handler"):
            assert count[stage] == 5, stage
            assert seconds[stage] > 0, stage
        assert count["images"] == 0  # add_one takes no encoded images
        assert seconds["handler"] > seconds["batch"]
    finally:
        server.stop()
    assert "stage timing, mean per request: build" in server.output()


def test_stage_timing_is_off_by_default(tmp_path: Path) -> None:
    build_test_models(tmp_path)
    port = free_port()
    server = start_server(tmp_path, tmp_path / "server.log", "--metrics-port", str(port))
    try:
        with Client(server.url) as client:
            client.infer("add_one", {"x": np.zeros((1, 4), np.float32)})
        assert not any(name.startswith("onnxserve_stage") for name, _ in _samples(port))
    finally:
        server.stop()
