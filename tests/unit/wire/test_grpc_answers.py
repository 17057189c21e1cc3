"""The gRPC front end's failure answers: a failure whose status can no longer be sent (gRPC
ended the call at its deadline first, or its client left) ends the handler as cancelled,
without the traceback grpcio logs for a failed send."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from onnxserve.serving.errors import DeadlineExceededError
from onnxserve.serving.frontends.grpc_service import _answers


class _EndedCall:
    """A grpc.aio context whose call gRPC already ended: sending a status fails, as
    grpcio's ExecuteBatchError does."""

    def __init__(self, ended: bool) -> None:
        self.ended = ended
        self.aborted: list[tuple[grpc.StatusCode, str]] = []

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted.append((code, details))
        if self.ended:
            raise RuntimeError('Failed "execute_batch"')
        raise grpc.aio.AbortError()


class _Service:
    @_answers(logged=False)
    async def ModelInfer(self, request, context):
        raise DeadlineExceededError("model m:1: request dropped after 300 ms in the queue")


def test_a_status_that_can_still_be_sent_is_sent() -> None:
    context = _EndedCall(ended=False)
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(_Service().ModelInfer(None, context))
    assert context.aborted[0][0] == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_call_gRPC_already_ended_ends_as_cancelled(caplog: pytest.LogCaptureFixture) -> None:
    context = _EndedCall(ended=True)
    with caplog.at_level(logging.DEBUG), pytest.raises(asyncio.CancelledError):
        asyncio.run(_Service().ModelInfer(None, context))
    assert context.aborted  # it tried
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
