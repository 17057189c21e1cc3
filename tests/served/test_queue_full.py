"""A full queue is answered as Triton answers it (gRPC UNAVAILABLE, HTTP 503), so the retry
policies written for Triton retry it: tritonclient with a gRPC retry policy gets its answer
once the queue has room, without one it gets UNAVAILABLE at once."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.onnx_models import slow_model
from support.repositories import write_config
from support.served import start_server, triton_grpc_when

from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos import inference_pb2_grpc
from onnxserve.serving.process import ServerProcess

pytestmark = pytest.mark.grpc  # run over both gRPC transports (make test)

#: a lone request waits this long for others to join its batch, the queue (1 request) full
#: meanwhile: long enough for the refused calls, on "held"; short enough that a retry after
#: gRPC's backoff (up to 1-2 s) finds room, on "brief"
DELAYS_US = {"held": 3_000_000, "brief": 400_000}


def _samples(port: int) -> list:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return [sample for family in text_string_to_metric_families(text)
            for sample in family.samples]


def _queue_depth(port: int, model: str) -> float:
    return sum(s.value for s in _samples(port)
               if s.name == "onnxserve_queue_depth" and s.labels["model"] == model)


def _rejected(port: int, model: str) -> float:
    return sum(s.value for s in _samples(port)
               if s.name == "nv_inference_request_failure_total"  # the parser's name
               and s.labels.get("model") == model and s.labels.get("reason") == "REJECTED")


def _refused(port: int, model: str) -> float:
    return sum(s.value for s in _samples(port)
               if s.name == "onnxserve_requests_total" and s.labels.get("model") == model
               and s.labels.get("status") == "UNAVAILABLE")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    folder = tmp_path_factory.mktemp("queue_full")
    for model, delay_us in DELAYS_US.items():
        slow_model(folder / model / "1" / "model.onnx", size=64, layers=2)
        write_config(folder / model, "max_batch_size: 8\ndynamic_batching { "
                     f"max_queue_delay_microseconds: {delay_us} "
                     "default_queue_policy { max_queue_size: 1 } }\n")
    server = start_server(folder, folder / "server.log", metrics=True)
    yield server
    server.stop()


class _Filler:
    """One request that waits in ``model``'s queue (its delay) from ``start`` on."""

    def __init__(self, server: ServerProcess, model: str) -> None:
        self.server, self.model = server, model
        self.thread = threading.Thread(target=self._call)

    def _call(self) -> None:
        with grpc.insecure_channel(self.server.url) as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = pb.ModelInferRequest(model_name=self.model)
            request.inputs.add(name="x", datatype="FP32", shape=[1, 64])
            request.raw_input_contents.append(np.ones((1, 64), np.float32).tobytes())
            stub.ModelInfer(request, timeout=30)

    def start(self) -> None:
        """Returns once the request is queued."""
        self.thread.start()
        deadline = time.monotonic() + 10
        while _queue_depth(self.server.metrics_port, self.model) < 1:
            assert time.monotonic() < deadline, "the first request never queued"
            time.sleep(0.005)


def _infer(model: str, **extra: object) -> dict:
    return {"op": "infer", "model": model, "input": "x", "output": "y", "shape": [1, 64],
            **extra}


def test_a_full_queue_is_unavailable_over_grpc_and_503_over_http(served: ServerProcess) -> None:
    import tritonclient.http as triton_http
    from tritonclient.utils import InferenceServerException

    rejected_before = _rejected(served.metrics_port, "held")
    filler = _Filler(served, "held")
    try:
        (grpc_refusal,) = triton_grpc_when(served.url, filler.start, _infer("held"))
        http = triton_http.InferenceServerClient(served.http_url)
        try:
            tensor = triton_http.InferInput("x", [1, 64], "FP32")
            tensor.set_data_from_numpy(np.ones((1, 64), np.float32))
            with pytest.raises(InferenceServerException) as http_refusal:
                http.infer("held", [tensor])
        finally:
            http.close()
    finally:
        filler.thread.join(30)
    assert not grpc_refusal["ok"] and grpc_refusal["status"] == "StatusCode.UNAVAILABLE"
    assert "the queue is full (1 requests waiting" in grpc_refusal["message"]
    assert http_refusal.value.status() == "503"
    assert "the queue is full" in http_refusal.value.message()
    # Triton's failure counter, under the scheduler's rejections
    assert _rejected(served.metrics_port, "held") >= rejected_before + 2


def test_tritonclient_with_a_retry_policy_gets_its_answer(served: ServerProcess) -> None:
    """gRPC retries UNAVAILABLE with the service config Triton users pass: its first try
    finds the queue full, a retry after a backoff of up to 1-2 s finds room (the queue is
    full for at most 400 ms)."""
    config = {"methodConfig": [{
        "name": [{"service": "inference.GRPCInferenceService"}],
        "retryPolicy": {"maxAttempts": 5, "initialBackoff": "1s", "maxBackoff": "2s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
    }]}
    refused_before = _refused(served.metrics_port, "brief")
    filler = _Filler(served, "brief")
    try:
        (result,) = triton_grpc_when(served.url, filler.start, _infer("brief", channel_args=[
            ["grpc.service_config", json.dumps(config)], ["grpc.enable_retries", 1]]))
    finally:
        filler.thread.join(30)
    assert result == {"ok": True, "shape": [1, 64]}
    assert _refused(served.metrics_port, "brief") >= refused_before + 1  # refused, retried
