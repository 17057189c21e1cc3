"""Request accounting: every inference request counted once, under the status its client
is given.

Each request ends in ``onnxserve_requests_total`` (and, when it succeeded, the request
latency histogram) under its canonical status code, and each failure is a
``request_failed`` event, summarised under overload and during a drain (logs.FailureLog).
The data plane calls it for the requests it runs, and for the ones a front end refused
before they could become requests (docs/operating.md describes both).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from onnxserve.serving.observability.logs import FailureLog
from onnxserve.serving.observability.metrics import Metrics
from onnxserve.serving.observability.triton_metrics import failure_reason


def _call_later(delay: float, callback: Callable[[], None]) -> None:
    asyncio.get_running_loop().call_later(delay, callback)


class RequestAccounting:
    """Counts requests in ``metrics`` (None: no metrics) and logs their failures on
    ``logger``. Call on the event loop's thread."""

    def __init__(self, metrics: Metrics | None, logger: logging.Logger) -> None:
        self._metrics = metrics
        self._failures = FailureLog(logger, schedule=_call_later)

    def succeeded(self, model: str, version: str, seconds: float, protocol: str) -> None:
        """A request of ``model`` (its metrics label) ``version`` answered OK after
        ``seconds``, which came over ``protocol`` (grpc or http)."""
        if self._metrics is not None:
            self._metrics.observe_request(model, version, "OK", seconds, protocol)

    def failed(self, name: str, model: str, version: str, status: str, seconds: float, *,
               protocol: str, request_id: str, reason: str,
               error: BaseException | None = None) -> None:
        """A request answered with the canonical code ``status`` after ``seconds``: counted
        under ``model`` (the metrics label: the name, or the unknown-model label), with
        Triton's failure reason for ``error`` (None: none was raised), and logged under
        ``name`` (the name sent, cut to 200 characters) with ``reason``."""
        if self._metrics is not None:
            self._metrics.observe_request(model, version, status, seconds, protocol,
                                          failure_reason(error, status))
        self._failures.failed(model=name[:200], version=version, status=status,
                              request_id=request_id, reason=reason)

    def flush(self) -> None:
        """Log the failures still summarised (at exit)."""
        self._failures.flush()
