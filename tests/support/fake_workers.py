"""Stand-in workers for the --workers supervisor's tests: what a real worker
(serving/workers.py, worker_main) does with its readiness pipe and stop signals, without
loading a model. Run as ``python fake_workers.py die|fail-at-start READY_FD``."""

from __future__ import annotations

import os
import pickle
import signal
import sys
import time

from onnxserve.serving.process import die_with_parent_if_asked
from onnxserve.serving.workers import READY_MESSAGE


def main() -> None:
    die_with_parent_if_asked()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM, signal.SIGINT))
    pickle.loads(sys.stdin.buffer.read())  # the settings and index, as a worker gets them
    if sys.argv[1] == "die":  # gets ready, then dies while serving
        os.write(int(sys.argv[2]), READY_MESSAGE)
    time.sleep(0.3)  # "fail-at-start" never gets ready
    sys.exit(3)


if __name__ == "__main__":
    main()
