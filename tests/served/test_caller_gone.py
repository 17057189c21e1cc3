"""Requests whose caller left, or whose queue timeout passed, are never computed: served end
to end against models whose batches wait 1.5 s for more requests (max_queue_delay 1.5 s,
preferred batch 64), so a request left in a forming batch would be computed at 1.5 s.

A cancelled or expired gRPC stream, a unary call past its deadline and a closed HTTP
connection take their requests out of the queue; the queue policy's REJECT answers
UNAVAILABLE "Request timeout expired" at its timeout (as Triton), DELAY keeps the request
and runs it; the statistics and the metrics count each as what it was.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.onnx_models import add_one_model, slow_model
from support.repositories import write_config
from support.served import start_server

from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos import inference_pb2_grpc
from onnxserve.serving.process import ServerProcess, free_port

pytestmark = pytest.mark.grpc  # run over both gRPC transports (make test)

#: seconds any single wait in these tests may take before the test fails
WAIT_S = 30.0
#: the batches' max_queue_delay: a request still in a forming batch then is computed
BATCH_DELAY_S = 1.5
#: the queue policies' default_timeout_microseconds
QUEUE_TIMEOUT_US = 300_000
POLICIES = {
    "held_stream": "",
    "held_stream_deadline": "",
    "held_unary": "",
    "held_http": "",
    "rejecting": f"default_queue_policy {{ timeout_action: REJECT "
                 f"default_timeout_microseconds: {QUEUE_TIMEOUT_US} }}",
    "rejecting_http": f"default_queue_policy {{ timeout_action: REJECT "
                      f"default_timeout_microseconds: {QUEUE_TIMEOUT_US} }}",
    "delaying": f"default_queue_policy {{ timeout_action: DELAY "
                f"default_timeout_microseconds: {QUEUE_TIMEOUT_US} }}",
}


def _config(name: str, policy: str) -> str:
    return (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 64\n'
            'input { name: "x" data_type: TYPE_FP32 dims: [4] }\n'
            'output { name: "y" data_type: TYPE_FP32 dims: [4] }\n'
            'output { name: "z" data_type: TYPE_FP32 dims: [4] }\n'
            "dynamic_batching { preferred_batch_size: [64] "
            f"max_queue_delay_microseconds: {int(BATCH_DELAY_S * 1e6)} {policy} }}\n")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, int]]:
    repository = tmp_path_factory.mktemp("repository")
    for name, policy in POLICIES.items():
        add_one_model(repository / name / "1" / "model.onnx")
        write_config(repository / name, _config(name, policy))
    metrics_port = free_port()
    server = start_server(repository, repository / "server.log", "--metrics-port",
                          str(metrics_port))
    yield server, metrics_port
    server.stop()


def _request(model: str, request_id: str, value: float = 1.0) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.full((1, 4), value, np.float32).tobytes())
    request.outputs.add(name="y")
    return request


def _statistics(server: ServerProcess, model: str) -> pb.ModelStatistics:
    with grpc.insecure_channel(server.url) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=WAIT_S)
    (stats,) = response.model_stats
    return stats


def _metric(metrics_port: int, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples that carry ``labels``."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                  timeout=10).read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == name
               and all(sample.labels.get(k) == v for k, v in labels.items()))


def _until(what: str, condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def _queued(metrics_port: int, model: str) -> float:
    return _metric(metrics_port, "onnxserve_queue_depth", model=model)


def _admitted(metrics_port: int, model: str) -> float:
    """Requests of ``model`` the batcher holds: queued, in a forming batch or running."""
    return _metric(metrics_port, "onnxserve_inflight_requests", model=model)


def _never_computed(server: ServerProcess, model: str, since: float, failed: int) -> None:
    """Once ``failed`` requests of ``model`` are counted failed, and past the time their
    batch would have run (``since`` + the batch delay, and some), none was computed."""
    _until(f"{failed} request(s) of {model} are counted failed",
           lambda: _statistics(server, model).inference_stats.fail.count == failed)
    time.sleep(max(since + BATCH_DELAY_S + 0.5 - time.monotonic(), 0.0))
    stats = _statistics(server, model)
    assert (stats.inference_count, stats.execution_count) == (0, 0)
    assert stats.inference_stats.success.count == 0
    assert stats.inference_stats.fail.count == failed


@pytest.mark.parametrize("ending", ["cancel", "deadline"])
def test_a_stream_that_ends_takes_its_queued_requests_with_it(
        served: tuple[ServerProcess, int], ending: str) -> None:
    """30 requests of a stream sit in a forming batch; the client cancels the stream (or its
    deadline passes) well before the batch would run: none is ever computed, and the
    metrics count them CANCELLED (or DEADLINE_EXCEEDED)."""
    server, metrics_port = served
    model = "held_stream" if ending == "cancel" else "held_stream_deadline"
    count = 30
    sent = threading.Event()
    started = time.monotonic()

    def requests() -> Iterator[pb.ModelInferRequest]:
        for i in range(count):
            yield _request(model, f"s{i}", float(i))
        sent.set()
        sent.wait()  # keep the sending side open: the stream ends by cancel or deadline
        time.sleep(WAIT_S)

    with grpc.insecure_channel(server.url) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelStreamInfer(requests(), timeout=1.0 if ending == "deadline"
                                     else WAIT_S)
        _until(f"{count} requests are queued", lambda: _admitted(metrics_port, model) == count)
        if ending == "cancel":
            call.cancel()
        with pytest.raises(grpc.RpcError) as ended:
            for answer in call:  # a request failed at its deadline is answered so
                assert "deadline" in answer.error_message
        expected = {"cancel": grpc.StatusCode.CANCELLED,
                    "deadline": grpc.StatusCode.DEADLINE_EXCEEDED}[ending]
        assert ended.value.code() == expected
    _never_computed(server, model, started, count)
    assert _queued(metrics_port, model) == 0
    status = {"cancel": "CANCELLED", "deadline": "DEADLINE_EXCEEDED"}[ending]
    assert _metric(metrics_port, "onnxserve_requests_total", model=model,
                   status=status) == count
    assert _metric(metrics_port, "onnxserve_requests_total", model=model, status="OK") == 0


def test_a_unary_call_past_its_deadline_is_not_computed(
        served: tuple[ServerProcess, int]) -> None:
    server, metrics_port = served
    started = time.monotonic()
    with grpc.insecure_channel(server.url) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as failed:
            stub.ModelInfer(_request("held_unary", "late"), timeout=0.3)
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _never_computed(server, "held_unary", started, 1)
    assert _metric(metrics_port, "onnxserve_requests_total", model="held_unary",
                   status="DEADLINE_EXCEEDED") == 1


def _infer_body(value: float = 1.0) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                   "data": [value] * 4}]}).encode()


def test_a_closed_http_connection_takes_its_request_out_of_the_queue(
        served: tuple[ServerProcess, int]) -> None:
    server, metrics_port = served
    assert server.http_url is not None
    host, port = server.http_url.rsplit(":", 1)
    body = _infer_body()
    head = (f"POST /v2/models/held_http/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=WAIT_S) as sock:
        sock.sendall(head.encode() + body)
        _until("the request is queued", lambda: _admitted(metrics_port, "held_http") == 1)
    _never_computed(server, "held_http", started, 1)
    assert _metric(metrics_port, "onnxserve_requests_total", model="held_http",
                   protocol="http", status="CANCELLED") == 1


def test_a_connection_closed_before_the_whole_body_came_is_counted_cancelled(
        served: tuple[ServerProcess, int]) -> None:
    """The handler is cancelled when its client leaves: a request whose body never fully
    came is still counted, CANCELLED."""
    server, metrics_port = served
    assert server.http_url is not None
    host, port = server.http_url.rsplit(":", 1)
    body = _infer_body()
    head = (f"POST /v2/models/held_unary/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body) + 100}\r\n\r\n")

    def cancelled() -> float:
        return _metric(metrics_port, "onnxserve_requests_total", model="held_unary",
                       protocol="http", status="CANCELLED")

    before = cancelled()
    with socket.create_connection((host, int(port)), timeout=WAIT_S) as sock:
        sock.sendall(head.encode() + body)  # 100 bytes short of its Content-Length
        time.sleep(0.2)
    _until("the request is counted CANCELLED", lambda: cancelled() == before + 1)
    stats = _statistics(server, "held_unary")
    assert stats.inference_count == 0


def test_reject_refuses_at_the_queue_timeout_and_never_computes(
        served: tuple[ServerProcess, int]) -> None:
    """Triton's REJECT: UNAVAILABLE "Request timeout expired" at the timeout (0.3 s), not an
    OK answer when the batch runs (1.5 s)."""
    server, metrics_port = served
    started = time.monotonic()
    with grpc.insecure_channel(server.url) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as failed:
            stub.ModelInfer(_request("rejecting", "r"), timeout=WAIT_S)
    elapsed = time.monotonic() - started
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "Request timeout expired" in failed.value.details()
    assert "REJECT" in failed.value.details()
    assert elapsed >= QUEUE_TIMEOUT_US / 1e6
    _never_computed(server, "rejecting", started, 1)
    assert _metric(metrics_port, "onnxserve_requests_total", model="rejecting",
                   status="UNAVAILABLE") == 1


def test_reject_over_http_answers_503(served: tuple[ServerProcess, int]) -> None:
    server, _ = served
    started = time.monotonic()
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/rejecting_http/infer",
        data=_infer_body(), headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as failed:
        urllib.request.urlopen(request, timeout=WAIT_S)
    assert failed.value.code == 503
    assert "Request timeout expired" in json.loads(failed.value.read())["error"]
    _never_computed(server, "rejecting_http", started, 1)


def test_delay_keeps_a_timed_out_request_and_runs_it(
        served: tuple[ServerProcess, int]) -> None:
    """Triton's DELAY: a request past its queue timeout is not refused; it runs (behind
    the requests that have not timed out) and is answered OK."""
    server, metrics_port = served
    with grpc.insecure_channel(server.url) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        started = time.monotonic()
        answer = stub.ModelInfer(_request("delaying", "d", 3.0), timeout=WAIT_S)
        elapsed = time.monotonic() - started
    assert np.frombuffer(answer.raw_output_contents[0], np.float32).tolist() == [4.0] * 4
    assert elapsed >= QUEUE_TIMEOUT_US / 1e6
    stats = _statistics(server, "delaying")
    assert (stats.inference_count, stats.execution_count) == (1, 1)
    assert stats.inference_stats.success.count == 1
    assert _metric(metrics_port, "onnxserve_requests_total", model="delaying",
                   status="OK") == 1


def test_the_server_logged_no_unexpected_failure(served: tuple[ServerProcess, int]) -> None:
    server, _ = served
    assert "Traceback" not in server.output()


# --- repository changes run to their end whoever waits for them ---------------------------


@pytest.fixture(scope="module")
def explicit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repository = tmp_path_factory.mktemp("explicit")
    for name in ("by_grpc", "by_http"):
        slow_model(repository / name / "1" / "model.onnx")
    server = start_server(repository, repository / "server.log",
                          "--model-control-mode", "explicit")
    yield server
    server.stop()


def _state(server: ServerProcess, model: str) -> str:
    with grpc.insecure_channel(server.url) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=WAIT_S)
    return next((m.state for m in index.models if m.name == model), "")


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_a_load_whose_caller_left_still_completes(explicit: ServerProcess,
                                                  transport: str) -> None:
    """A caller that leaves cancels its handler (that is how an inference request leaves
    its queue); a model load it asked for must not stop halfway, LOADING for good."""
    model = f"by_{transport}"
    if transport == "grpc":
        with grpc.insecure_channel(explicit.url) as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as left:
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=model),
                                         timeout=0.05)
        assert left.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    else:
        assert explicit.http_url is not None
        host, port = explicit.http_url.rsplit(":", 1)
        head = (f"POST /v2/repository/models/{model}/load HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Length: 0\r\n\r\n")
        with socket.create_connection((host, int(port)), timeout=WAIT_S) as sock:
            sock.sendall(head.encode())
            _until(f"{model} is loading", lambda: _state(explicit, model) in ("LOADING",
                                                                               "READY"))
    _until(f"{model} is READY", lambda: _state(explicit, model) == "READY")
