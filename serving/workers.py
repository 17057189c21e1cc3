"""`onnxserve serve --workers N`: N server processes sharing one port (SO_REUSEPORT).

Each worker is a full server with its own models and schedulers; the kernel spreads
incoming connections across them (gRPC sets SO_REUSEPORT on Linux). It helps models
bound by per-request Python overhead, and only for clients that open several
connections: one HTTP/2 connection always lands on one worker. The parent forwards
SIGTERM/SIGINT and exits with the worst exit status.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

from .demo import die_with_parent

log = logging.getLogger(__name__)


def run_workers(serve_args: list[str], workers: int, cores: int = 0,
                metrics_port: int = 0) -> int:
    """Start ``workers`` copies of ``onnxserve serve serve_args`` and wait for them.

    Each worker gets its share of ``cores`` (0: the machine's) for its sessions' threads,
    and worker k serves its metrics on ``metrics_port + k`` (0: none).
    """
    share = max(1, (cores or os.cpu_count() or 1) // workers)
    command = [sys.executable, "-m", "onnxserve.serving.cli", "serve", *serve_args,
               "--workers", "1", "--cores", str(share)]
    children = [
        subprocess.Popen([*command, "--metrics-port", str(metrics_port + k if metrics_port else 0)],
                         preexec_fn=die_with_parent)
        for k in range(workers)
    ]
    log.info("started %d workers (pids %s), %d core(s) each", workers,
             ", ".join(str(c.pid) for c in children), share)

    def forward(signum: int, _frame) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    codes = [child.wait() for child in children]
    return max(codes, key=abs)
