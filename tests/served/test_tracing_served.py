"""OpenTelemetry tracing against a real OTLP/HTTP receiver: spans of a request, its queue
wait and its batch, joined to the caller's trace from gRPC metadata or HTTP headers; and
Triton's trace settings (rate, count, level, per model) read and changed at run time over
gRPC and HTTP with tritonclient."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from support.otlp_receiver import OtlpReceiver, ReceivedSpan
from support.repositories import build_test_models
from support.served import start_server, triton_grpc

from onnxserve.serving.process import ServerProcess

pytestmark = pytest.mark.grpc  # run over both gRPC transports (make test)

TRACE_ID = "0af7651916cd43dd8448eb211c12666c"
PARENT_ID = "b7ad6b7169242424"


def _traceparent(trace_id: str = TRACE_ID) -> str:
    return f"00-{trace_id}-{PARENT_ID}-01"


@pytest.fixture(scope="module")
def receiver() -> OtlpReceiver:
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


def _server(folder: Path, receiver: OtlpReceiver, *settings: str) -> ServerProcess:
    build_test_models(folder)
    flags = [f"--trace-config={s}" for s in (
        *settings, f"opentelemetry,url={receiver.url}", "opentelemetry,bsp_schedule_delay=50",
        "opentelemetry,resource=deployment.environment=test")]
    return start_server(folder, folder / "server.log", *flags)


def _by_trace(spans: list[ReceivedSpan], trace_id: str) -> dict[str, ReceivedSpan]:
    found = {span.name: span for span in spans if span.trace_id == trace_id}
    return found


def _infer(model: str = "add_one", **extra: object) -> dict:
    if model == "scores":
        return {"op": "infer", "model": model, "input": "scores_in", "output": "scores",
                "shape": [1, 5], **extra}
    return {"op": "infer", "model": model, "input": "x", "output": "y", "shape": [2, 4],
            **extra}


def test_a_request_with_a_trace_context_joins_its_callers_trace(
        tmp_path: Path, receiver: OtlpReceiver) -> None:
    import tritonclient.http as triton_http

    receiver.clear()
    server = _server(tmp_path, receiver, "level=TIMESTAMPS")  # rate 1000: only propagated
    try:
        results = triton_grpc(
            server.url, *[_infer(version="2")] * 3,
            _infer(version="2", request_id="r-grpc", headers={"traceparent": _traceparent()}))
        assert all(result["ok"] for result in results), results
        http = triton_http.InferenceServerClient(server.http_url)
        http_trace = "1" * 32
        try:
            http.infer("add_one", _http_inputs(triton_http, 3), model_version="2",
                       request_id="r-http", headers={"traceparent": _traceparent(http_trace)})
            wrong = triton_http.InferInput("x", [1, 5], "FP32")  # add_one takes [N, 4]
            wrong.set_data_from_numpy(np.zeros((1, 5), np.float32))
            with pytest.raises(Exception, match="expected"):  # a failed request is traced too
                http.infer("add_one", [wrong], headers={"traceparent": _traceparent("2" * 32)})
        finally:
            http.close()
        spans = receiver.wait_for(10)
    finally:
        server.stop()
    assert {span.trace_id for span in spans} == {TRACE_ID, http_trace, "2" * 32}, spans
    for trace_id, protocol, samples, request_id in ((TRACE_ID, "grpc", 2, "r-grpc"),
                                                    (http_trace, "http", 3, "r-http")):
        found = _by_trace(spans, trace_id)
        assert set(found) == {"InferRequest", "add_one", "queue", "compute"}, found
        root, model = found["InferRequest"], found["add_one"]
        queue, compute = found["queue"], found["compute"]
        assert root.parent_span_id == PARENT_ID  # the caller's span
        assert model.parent_span_id == root.span_id
        assert queue.parent_span_id == compute.parent_span_id == model.span_id
        assert root.attributes["onnxserve.protocol"] == protocol
        assert model.attributes == {"triton.model_name": "add_one", "triton.model_version": 2,
                                    "triton.request_id": request_id}
        assert model.events == ("REQUEST_START", "QUEUE_START", "REQUEST_END")
        assert compute.attributes["onnxserve.batch_size"] == samples
        assert compute.attributes["onnxserve.batch_requests"] == 1
        assert compute.attributes["triton.model_version"] == 2
        assert compute.events == ("COMPUTE_START", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START",
                                  "COMPUTE_END")
        assert root.start_ns <= queue.start_ns <= queue.end_ns <= compute.end_ns <= root.end_ns
        assert 0 < compute.end_ns - compute.start_ns < 10**9
        assert root.resource["service.name"] == "onnxserve"
        assert root.resource["deployment.environment"] == "test"
        assert root.status_code == 0
    failed = _by_trace(spans, "2" * 32)
    assert set(failed) == {"InferRequest", "add_one"}  # refused before it was queued
    assert failed["InferRequest"].status_code == 2  # error
    assert failed["InferRequest"].status_message.startswith("INVALID_ARGUMENT: ")


def test_trace_settings_change_what_is_traced_at_run_time(
        tmp_path: Path, receiver: OtlpReceiver) -> None:
    import tritonclient.http as triton_http
    from tritonclient.utils import InferenceServerException

    receiver.clear()
    server = _server(tmp_path, receiver)  # level OFF: nothing traced
    http = triton_http.InferenceServerClient(server.http_url)
    context = {"traceparent": _traceparent()}
    try:
        settings, off = triton_grpc(server.url, {"op": "get_trace_settings"},
                                    _infer(headers=context))
        assert settings["settings"]["trace_level"] == ["OFF"]
        assert settings["settings"]["trace_rate"] == ["1000"]
        assert settings["settings"]["trace_count"] == ["-1"]
        assert settings["settings"]["trace_mode"] == ["opentelemetry"]
        assert settings["settings"]["url"] == [receiver.url]
        assert off["ok"]
        time.sleep(0.5)
        assert not receiver.spans  # off: not even the caller's context is traced

        # on for all, one request in 2, at most 2 traces
        results = triton_grpc(server.url, {"op": "update_trace_settings", "settings": {
            "trace_level": ["TIMESTAMPS"], "trace_rate": "2", "trace_count": "2"}},
            *[_infer()] * 8, {"op": "get_trace_settings"})
        assert results[0]["settings"]["trace_count"] == ["2"]
        assert len({s.trace_id for s in receiver.wait_for(8)}) == 2
        time.sleep(0.3)
        assert len({s.trace_id for s in receiver.spans}) == 2  # the count ran out
        assert results[-1]["settings"]["trace_count"] == ["0"]

        # one model off over HTTP; the others still traced; cleared back to the global
        receiver.clear()
        assert http.update_trace_settings("add_one", {"trace_level": ["OFF"]})[
            "trace_level"] == ["OFF"]
        assert http.get_trace_settings()["trace_level"] == ["TIMESTAMPS"]
        triton_grpc(server.url, _infer(headers=context),
                    _infer("scores", headers={"traceparent": _traceparent("3" * 32)}))
        spans = receiver.wait_for(4)
        time.sleep(0.3)
        assert {s.trace_id for s in receiver.spans} == {"3" * 32}, spans
        cleared = http.update_trace_settings("add_one", {"trace_level": None})
        assert cleared["trace_level"] == ["TIMESTAMPS"]
        triton_grpc(server.url, _infer(headers=context))
        assert TRACE_ID in {s.trace_id for s in receiver.wait_for(8)}

        # values Triton refuses, refused with its words and codes
        refusals = triton_grpc(
            server.url,
            *[{"op": "update_trace_settings", "settings": bad} for bad in (
                {"trace_rate": "fast"}, {"trace_count": "-2"},
                {"trace_level": ["OFF", "TIMESTAMPS"]}, {"trace_file": "/tmp/t.json"})],
            {"op": "get_trace_settings", "model": "nope"})
        expected = [("StatusCode.INVALID_ARGUMENT", "Unable to parse 'trace_rate', got: fast"),
                    ("StatusCode.INVALID_ARGUMENT", "Expecting value >= -1, got: -2"),
                    ("StatusCode.INVALID_ARGUMENT",
                     "expect only one trace level 'OFF' is specified"),
                    ("StatusCode.UNIMPLEMENTED", "Triton's trace files are not built"),
                    ("StatusCode.INVALID_ARGUMENT", "Request for unknown model : nope")]
        for refusal, (status, words) in zip(refusals, expected, strict=True):
            assert not refusal["ok"] and refusal["status"] == status, refusal
            assert words in refusal["message"], refusal
        with pytest.raises(InferenceServerException) as http_refused:
            http.update_trace_settings(settings={"trace_rate": ["1", "2"]})
        assert http_refused.value.status() == "400"
        assert "expect only 1 value for 'trace_rate'" in http_refused.value.message()
        with pytest.raises(InferenceServerException) as http_file:
            http.update_trace_settings(settings={"log_frequency": "5"})
        assert http_file.value.status() == "501"
    finally:
        http.close()
        server.stop()


def _http_inputs(module, samples: int):
    data = np.zeros((samples, 4), np.float32)
    tensor = module.InferInput("x", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    return [tensor]


def test_an_unreachable_receiver_fails_no_request_and_holds_no_exit(tmp_path: Path) -> None:
    from onnxserve.serving.process import free_port

    build_test_models(tmp_path)
    nowhere = f"http://127.0.0.1:{free_port()}/v1/traces"  # nothing listens there
    server = start_server(tmp_path, tmp_path / "server.log", "--trace-config=level=TIMESTAMPS",
                          "--trace-config=rate=1",
                          f"--trace-config=opentelemetry,url={nowhere}",
                          "--trace-config=opentelemetry,bsp_schedule_delay=10")
    try:
        results = triton_grpc(server.url, *[_infer()] * 5)
        assert all(result["ok"] for result in results), results
        time.sleep(0.5)  # the exporter has tried by now
    finally:
        started = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - started < 15  # the drain's linger, and at most 3 s more
    assert "Traceback" not in server.output()


def test_a_streams_requests_join_the_trace_of_its_call(tmp_path: Path,
                                                        receiver: OtlpReceiver) -> None:
    """ModelStreamInfer: the call's metadata carries the context of every request on it."""
    import grpc

    from onnxserve.protos import inference_pb2 as pb
    from onnxserve.protos import inference_pb2_grpc

    receiver.clear()
    server = _server(tmp_path, receiver, "level=TIMESTAMPS")  # rate 1000: only propagated

    def requests():
        for index in range(3):
            request = pb.ModelInferRequest(model_name="add_one", id=f"s{index}")
            request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
            request.raw_input_contents.append(np.zeros((1, 4), np.float32).tobytes())
            yield request

    try:
        with grpc.insecure_channel(server.url) as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            answers = list(stub.ModelStreamInfer(
                requests(), metadata=(("traceparent", _traceparent("4" * 32)),), timeout=30))
        assert [a.error_message for a in answers] == ["", "", ""]
        spans = receiver.wait_for(12)
    finally:
        server.stop()
    roots = [s for s in spans if s.name == "InferRequest"]
    assert len(roots) == 3 and {s.trace_id for s in spans} == {"4" * 32}
    assert {s.parent_span_id for s in roots} == {PARENT_ID}
    assert sorted(s.attributes["triton.request_id"] for s in spans if s.name == "add_one") == [
        "s0", "s1", "s2"]
