"""request_failed events under floods: a few lines and a summary per window, not one line per
request (serving/observability/logs.FailureLog)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from onnxserve.serving.observability.logs import FailureLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _events(caplog: pytest.LogCaptureFixture, name: str,
            level: int | None = None) -> list[dict[str, object]]:
    return [dict(r.fields) for r in caplog.records  # type: ignore[attr-defined]
            if getattr(r, "event", None) == name and (level is None or r.levelno == level)]


def _fail(failures: FailureLog, status: str, n: int, model: str = "m",
          reason: str = "the queue is full") -> None:
    for i in range(n):
        failures.failed(status=status, model=model, version="1", request_id=str(i),
                        reason=reason)


def test_a_flood_is_a_few_lines_and_one_summary_per_window(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    clock = Clock()
    failures = FailureLog(logging.getLogger("t"), window=10.0, per_window=5, clock=clock)
    _fail(failures, "RESOURCE_EXHAUSTED", 6000)
    _fail(failures, "UNAVAILABLE", 3, reason="the server is shutting down")
    assert len(_events(caplog, "request_failed", logging.INFO)) == 5 + 3
    assert len(_events(caplog, "request_failed", logging.DEBUG)) == 5995
    assert _events(caplog, "requests_failed_summary") == []
    clock.now += 4.0
    failures.flush()
    (summary,) = _events(caplog, "requests_failed_summary")  # UNAVAILABLE: all logged
    assert summary == {"status": "RESOURCE_EXHAUSTED", "model": "m", "failed": 6000,
                       "logged": 5, "seconds": 4.0, "example": "the queue is full"}


def test_each_window_logs_anew_and_a_late_failure_ends_the_last_window(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    failures = FailureLog(logging.getLogger("t"), window=10.0, per_window=2, clock=clock)
    _fail(failures, "RESOURCE_EXHAUSTED", 10, model="a")
    _fail(failures, "RESOURCE_EXHAUSTED", 4, model="b")
    clock.now += 10.0
    _fail(failures, "RESOURCE_EXHAUSTED", 1, model="a")  # ends the first window
    summaries = _events(caplog, "requests_failed_summary")
    assert [(s["model"], s["failed"], s["logged"]) for s in summaries] == [("a", 10, 2),
                                                                          ("b", 4, 0)]
    assert len(_events(caplog, "request_failed")) == 3  # 2, then 1 in the new window
    failures.flush()
    assert len(_events(caplog, "requests_failed_summary")) == 2  # nothing left unlogged


def test_internal_failures_are_always_logged_at_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    failures = FailureLog(logging.getLogger("t"), per_window=1, clock=Clock())
    _fail(failures, "INTERNAL", 20, reason="a bug")
    assert len(_events(caplog, "request_failed", logging.ERROR)) == 20
    failures.flush()
    assert _events(caplog, "requests_failed_summary") == []


def test_a_scheduled_end_ends_only_its_own_window(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    scheduled: list[Callable[[], None]] = []
    failures = FailureLog(logging.getLogger("t"), window=10.0, per_window=1, clock=clock,
                          schedule=lambda delay, callback: scheduled.append(callback))
    _fail(failures, "UNAVAILABLE", 3)
    clock.now += 11.0
    _fail(failures, "UNAVAILABLE", 3)  # the first window ended here, a second one opened
    assert len(scheduled) == 2
    scheduled[0]()  # the first window's timer, late: the second window is not cut short
    assert len(_events(caplog, "requests_failed_summary")) == 1
    scheduled[1]()
    assert [s["failed"] for s in _events(caplog, "requests_failed_summary")] == [3, 3]
