"""ModelStreamInfer: one answer per request carrying its id, errors on the stream, requests
in flight at once and answered as they finish, the per-stream window, the end of a stream,
cancellation; then a real server: batching with unary requests, metrics, and the official
tritonclient's streaming APIs (sync and asyncio)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import SUPPORT

from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos import inference_pb2_grpc
from onnxserve.serving.contract import InferRequest, InferResult
from onnxserve.serving.errors import NotFoundError
from onnxserve.serving.frontends.grpc_service import (
    FINAL_RESPONSE_FLAG,
    FINAL_RESPONSE_PARAMETER,
    STREAM_TASK_NAME,
    InferenceService,
)
from onnxserve.serving.observability.tracing import TraceConfig, Tracing
from onnxserve.serving.process import ServerProcess

pytestmark = pytest.mark.grpc  # run over both gRPC transports (make test)

#: seconds any single wait in these tests may take before the test fails
WAIT_S = 30.0


class GatedPlane:
    """A data plane whose ``infer`` waits until the test opens the request's gate (``*``:
    every gate); it records what ran, at most how many at once, and what was cancelled."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {"*": asyncio.Event()}
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.time_remaining: list[float | None] = []
        self.running = 0
        self.most = 0
        self.changed = asyncio.Event()
        self.tracing = Tracing(TraceConfig())  # off

    def gate(self, request_id: str) -> asyncio.Event:
        return self.gates.setdefault(request_id, asyncio.Event())

    async def infer(self, request: InferRequest,
                    answer: Callable[[InferResult], Any] | None = None) -> Any:
        """DataPlane.infer's contract: the result, or what ``answer`` makes of it."""
        result = await self._result(request)
        return result if answer is None else answer(result)

    async def _result(self, request: InferRequest) -> InferResult:
        if request.model_name == "no_such_model":
            raise NotFoundError(f"unknown model {request.model_name!r}")
        if request.model_name == "broken":
            raise RuntimeError("a bug")
        request.id = request.id or "generated-id"
        self.started.append(request.id)
        self.time_remaining.append(request.time_remaining)
        self.running += 1
        self.most = max(self.most, self.running)
        self.changed.set()
        try:
            if request.model_name == "gated":
                opened = asyncio.ensure_future(self.gate(request.id).wait())
                every = asyncio.ensure_future(self.gates["*"].wait())
                try:
                    await asyncio.wait((opened, every), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    opened.cancel()
                    every.cancel()
        except asyncio.CancelledError:
            self.cancelled.append(request.id)
            self.changed.set()
            raise
        finally:
            self.running -= 1
        x = request.inputs[0].decode() if request.inputs else np.zeros(1, np.float32)
        return InferResult(request.model_name, "1", request.id, [("y", x + 1)])

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait (bounded) until ``condition()`` holds; it is checked at each change."""
        async with asyncio.timeout(WAIT_S):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


def _request(request_id: str, model: str = "gated", value: float = 1.0,
             **parameters: bool) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=[1])
    request.raw_input_contents.append(np.array([value], np.float32).tobytes())
    for key, flag in parameters.items():
        request.parameters[key].bool_param = flag
    return request


@contextlib.asynccontextmanager
async def _serving(plane: GatedPlane, window: int = 8
                   ) -> AsyncIterator[inference_pb2_grpc.GRPCInferenceServiceStub]:
    server = grpc.aio.server()
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceService(plane, stream_window=window), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield inference_pb2_grpc.GRPCInferenceServiceStub(channel)
    finally:
        await server.stop(None)


def _run(test: Callable[[GatedPlane], Awaitable[None]]) -> None:
    async def main() -> None:
        await asyncio.wait_for(test(GatedPlane()), 2 * WAIT_S)

    asyncio.run(main())


async def _read(call) -> pb.ModelStreamInferResponse:
    async with asyncio.timeout(WAIT_S):
        response = await call.read()
    assert response is not grpc.aio.EOF, "the stream ended early"
    return response


async def _ends_ok(call) -> None:
    async with asyncio.timeout(WAIT_S):
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK


def _leftover_tasks() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name() == STREAM_TASK_NAME]


async def _no_leftover_tasks() -> None:
    async with asyncio.timeout(WAIT_S):
        while _leftover_tasks():
            await asyncio.sleep(0.01)


def test_answers_carry_their_ids_and_may_overtake_each_other() -> None:
    async def test(plane: GatedPlane) -> None:
        async with _serving(plane) as stub:
            call = stub.ModelStreamInfer(timeout=WAIT_S)
            await call.write(_request("slow", value=1.0))
            await plane.until(lambda: plane.started == ["slow"])
            await call.write(_request("fast", model="instant", value=5.0))
            first = await _read(call)
            assert first.error_message == ""
            assert first.infer_response.id == "fast"
            assert np.frombuffer(first.infer_response.raw_output_contents[0],
                                 np.float32).tolist() == [6.0]
            plane.gate("slow").set()
            second = await _read(call)
            assert second.infer_response.id == "slow"
            assert second.infer_response.model_name == "gated"
            assert np.frombuffer(second.infer_response.raw_output_contents[0],
                                 np.float32).tolist() == [2.0]
            # No id sent: the answer carries the generated one.
            await call.write(_request("", model="instant"))
            assert (await _read(call)).infer_response.id == "generated-id"
            await call.done_writing()
            await _ends_ok(call)
        # The stream's deadline is each request's. gRPC rounds a timeout up as it sends it
        # (seen: 30 s arriving as 30.0995 s), so allow that much over.
        assert all(t is not None and 0 < t <= WAIT_S + 1 for t in plane.time_remaining)

    _run(test)


def test_a_failed_request_is_answered_on_the_stream_which_goes_on() -> None:
    async def test(plane: GatedPlane) -> None:
        async with _serving(plane) as stub:
            call = stub.ModelStreamInfer(timeout=WAIT_S)
            await call.write(_request("missing", model="no_such_model"))
            missing = await _read(call)
            assert missing.error_message == "unknown model 'no_such_model'"
            assert missing.infer_response.id == "missing"
            assert not missing.infer_response.outputs
            await call.write(_request("bug", model="broken"))
            bug = await _read(call)
            assert bug.error_message == "internal error: RuntimeError: a bug"
            assert bug.infer_response.id == "bug"
            await call.write(_request("after", model="instant"))
            after = await _read(call)
            assert after.error_message == "" and after.infer_response.id == "after"
            await call.done_writing()
            await _ends_ok(call)

    _run(test)


def test_the_window_bounds_the_requests_a_stream_has_pending() -> None:
    window, sent = 4, 12

    async def test(plane: GatedPlane) -> None:
        async with _serving(plane, window=window) as stub:
            call = stub.ModelStreamInfer(timeout=WAIT_S)
            for i in range(sent):
                await call.write(_request(f"r{i}"))
            await call.done_writing()
            await plane.until(lambda: plane.running >= window)
            for _ in range(100):  # let any request read beyond the window start
                await asyncio.sleep(0)
            assert len(plane.started) == window
            plane.gates["*"].set()
            ids = [(await _read(call)).infer_response.id for _ in range(sent)]
            await _ends_ok(call)
        assert sorted(ids) == sorted(f"r{i}" for i in range(sent))
        assert plane.most == window

    _run(test)


def test_closing_the_sending_side_still_answers_every_pending_request() -> None:
    async def test(plane: GatedPlane) -> None:
        async with _serving(plane) as stub:
            call = stub.ModelStreamInfer(timeout=WAIT_S)
            for name in ("a", "b", "c"):
                await call.write(_request(name))
            await call.done_writing()
            await plane.until(lambda: plane.running == 3)
            for name in ("c", "a", "b"):
                plane.gate(name).set()
                assert (await _read(call)).infer_response.id == name
            await _ends_ok(call)

    _run(test)


def test_a_cancelled_stream_cancels_its_pending_requests_and_leaves_no_task() -> None:
    async def test(plane: GatedPlane) -> None:
        async with _serving(plane) as stub:
            call = stub.ModelStreamInfer(timeout=WAIT_S)
            for name in ("a", "b"):
                await call.write(_request(name))
            await plane.until(lambda: plane.running == 2)
            call.cancel()
            await plane.until(lambda: sorted(plane.cancelled) == ["a", "b"])
            await _no_leftover_tasks()
            # The server serves on: a new stream works.
            call = stub.ModelStreamInfer(timeout=WAIT_S)
            await call.write(_request("next", model="instant"))
            assert (await _read(call)).infer_response.id == "next"
            await call.done_writing()
            await _ends_ok(call)
        assert plane.running == 0

    _run(test)


def test_a_stream_past_its_deadline_cancels_its_pending_requests() -> None:
    async def test(plane: GatedPlane) -> None:
        async with _serving(plane) as stub:
            call = stub.ModelStreamInfer(timeout=0.5)
            await call.write(_request("late"))
            async with asyncio.timeout(WAIT_S):
                assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await plane.until(lambda: plane.cancelled == ["late"])
            await _no_leftover_tasks()

    _run(test)


def test_the_final_response_flag_is_set_when_asked_for() -> None:
    async def test(plane: GatedPlane) -> None:
        async with _serving(plane) as stub:
            call = stub.ModelStreamInfer(timeout=WAIT_S)
            await call.write(_request("asked", model="instant",
                                      **{FINAL_RESPONSE_PARAMETER: True}))
            asked = await _read(call)
            assert asked.infer_response.parameters[FINAL_RESPONSE_FLAG].bool_param
            await call.write(_request("failed", model="no_such_model",
                                      **{FINAL_RESPONSE_PARAMETER: True}))
            failed = await _read(call)
            assert failed.error_message and failed.infer_response.id == "failed"
            assert failed.infer_response.parameters[FINAL_RESPONSE_FLAG].bool_param
            await call.write(_request("not_asked", model="instant"))
            assert FINAL_RESPONSE_FLAG not in (await _read(call)).infer_response.parameters
            await call.done_writing()
            await _ends_ok(call)

    _run(test)


# --- a real server -------------------------------------------------------------------------


#: the tests count requests in the metrics of conftest's test_models_server
SERVER_METRICS = True


@pytest.fixture
def served(test_models_server: ServerProcess) -> tuple[ServerProcess, int]:
    return test_models_server, test_models_server.metrics_port


def _add_one(request_id: str, value: float, rows: int = 1) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="add_one", id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=[rows, 4])
    request.raw_input_contents.append(np.full((rows, 4), value, np.float32).tobytes())
    request.outputs.add(name="y")
    return request


def _requests_counted(metrics_port: int, model: str, status: str) -> float:
    """onnxserve_requests_total of ``model`` with ``status``, whatever other labels."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                  timeout=10).read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == "onnxserve_requests_total"
               and sample.labels.get("model") == model and sample.labels.get("status") == status)


def test_streamed_requests_are_computed_batched_and_counted(
        served: tuple[ServerProcess, int]) -> None:
    server, metrics_port = served
    ok_before = _requests_counted(metrics_port, "add_one", "OK")
    missing_before = _requests_counted(metrics_port, "_unknown", "NOT_FOUND")
    count = 40

    def requests() -> Iterator[pb.ModelInferRequest]:
        for i in range(count):
            yield _add_one(f"s{i}", float(i))
        yield pb.ModelInferRequest(model_name="no_such_model", id="missing")

    with grpc.insecure_channel(server.url) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        answers = list(stub.ModelStreamInfer(requests(), timeout=WAIT_S))
        # Unary requests share the model's batches with streamed ones.
        unary = stub.ModelInfer(_add_one("unary", 7.0, rows=2), timeout=WAIT_S)
    assert np.frombuffer(unary.raw_output_contents[0], np.float32).tolist() == [8.0] * 8
    by_id = {a.infer_response.id: a for a in answers}
    assert len(answers) == count + 1 and len(by_id) == count + 1
    assert "no_such_model" in by_id["missing"].error_message
    for i in range(count):
        answer = by_id[f"s{i}"]
        assert answer.error_message == ""
        assert answer.infer_response.model_version == "2"
        y = np.frombuffer(answer.infer_response.raw_output_contents[0], np.float32)
        assert y.tolist() == [i + 1.0] * 4
    assert _requests_counted(metrics_port, "add_one", "OK") == ok_before + count + 1
    assert _requests_counted(metrics_port, "_unknown", "NOT_FOUND") == missing_before + 1


def test_tritonclient_streams_with_onnxserve(served: tuple[ServerProcess, int]) -> None:
    server, _ = served
    result = subprocess.run(
        [sys.executable, str(SUPPORT / "triton_stream_interop.py"), server.url],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    for api in ("sync", "asyncio"):
        answers = r[api]
        assert answers["values"] == {f"{api}-{i}": [i + 1.0] * 4 for i in range(20)}, api
        assert len(answers["errors"]) == 1 and "no_such_model" in answers["errors"][0], api
    assert r["sync_final_flag"] is True
