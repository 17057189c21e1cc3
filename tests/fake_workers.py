"""Stand-in workers for the --workers supervisor's tests: what a real worker's life
(serving/workers.py, _worker_main) would do, without loading a model."""

from __future__ import annotations

import signal
import sys
import time
from multiprocessing.connection import Connection

from onnxserve.serving.settings import ServerSettings
from onnxserve.serving.workers import READY_MESSAGE


def _stoppable() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM, signal.SIGINT))


def die(settings: ServerSettings, index: int, ready: Connection) -> None:
    """Gets ready, then dies while serving."""
    _stoppable()
    ready.send_bytes(READY_MESSAGE)
    time.sleep(0.3)
    sys.exit(3)


def fail_at_start(settings: ServerSettings, index: int, ready: Connection) -> None:
    """Exits before it is ever ready."""
    _stoppable()
    time.sleep(0.3)
    sys.exit(3)
