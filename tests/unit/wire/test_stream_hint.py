"""ModelStreamInfer tells the data plane when a stream's requests are in flight together
(contract.OTHERS_IN_PROGRESS), so that a model on the event loop batches them."""

from __future__ import annotations

import asyncio

import numpy as np

from onnxserve.protos import inference_pb2 as pb
from onnxserve.serving.contract import OTHERS_IN_PROGRESS, InferResult
from onnxserve.serving.frontends.grpc_service import InferenceService
from onnxserve.serving.observability.tracing import TraceConfig, Tracing


class _Plane:
    """Answers every request at once; records what each saw of OTHERS_IN_PROGRESS."""

    def __init__(self) -> None:
        self.seen: list[bool] = []
        self.tracing = Tracing(TraceConfig())  # off

    async def infer(self, request, answer):
        self.seen.append(OTHERS_IN_PROGRESS.get())
        return answer(InferResult(request.model_name, "1", request.id,
                                  [("y", np.zeros((1, 1), np.float32))]))


class _Context:
    def __init__(self) -> None:
        self.written: list[pb.ModelStreamInferResponse] = []

    def time_remaining(self) -> None:
        return None

    async def write(self, message: pb.ModelStreamInferResponse) -> None:
        self.written.append(message)


def _stream(count: int) -> tuple[list[bool], list[str]]:
    async def requests():
        for index in range(count):
            yield pb.ModelInferRequest(model_name="m", id=str(index))

    plane, context = _Plane(), _Context()
    service = InferenceService(plane, stream_window=8)  # type: ignore[arg-type]
    asyncio.run(service.ModelStreamInfer(requests(), context))
    return plane.seen, sorted(m.infer_response.id for m in context.written)


def test_requests_in_flight_together_know_of_each_other() -> None:
    seen, answered = _stream(3)
    assert seen == [True, True, True]
    assert answered == ["0", "1", "2"]


def test_a_lone_request_does_not() -> None:
    assert _stream(1) == ([False], ["0"])
