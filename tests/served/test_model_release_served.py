"""A served model reloaded 30 times keeps the server's threads and memory flat: each retired
version lets go of everything when its drain ends (in process, version by version:
tests/unit/models/test_model_release.py)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from support.onnx_models import slow_model
from support.served import start_server

from onnxserve.clients.client import Client

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(),
                                reason="counts threads in /proc (Linux)")


def _threads(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


@pytest.mark.parametrize("mode", ["poll", "explicit"])
def test_a_served_model_reloaded_30_times_stays_flat(tmp_path: Path, mode: str) -> None:
    """End to end: the model replaced by a new version folder 30 times, found by a server
    polling its repository every 0.2 s, or loaded over the repository API (every other
    time after an unload); the server process's threads and memory stay flat."""
    slow_model(tmp_path / "m" / "1" / "model.onnx", size=1024, layers=2)  # 4 MB of weights
    control = (["--repository-poll-secs", "0.2"] if mode == "poll" else ["--load-model", "m"])
    server = start_server(tmp_path, tmp_path / "server.log", "--model-control-mode", mode,
                          *control, "--intra-op-threads", "4")
    x = np.zeros((1, 1024), np.float32)
    samples: list[tuple[int, float]] = []
    try:
        with Client(server.url) as client:
            client.infer("m", {"x": x})
            threads, rss = _threads(server.pid), _rss_mb(server.pid)
            for number in range(2, 32):
                shutil.copytree(tmp_path / "m" / str(number - 1), tmp_path / "m" / str(number))
                shutil.rmtree(tmp_path / "m" / str(number - 1))
                if mode == "explicit":
                    if number % 2:
                        client.unload_model("m")
                    client.load_model("m")
                deadline = time.monotonic() + 30
                while (client.model_metadata("m").versions != (str(number),)
                       and time.monotonic() < deadline):
                    time.sleep(0.05)
                client.infer("m", {"x": x})
                samples.append((_threads(server.pid), _rss_mb(server.pid)))
            # A retired version's threads end when its drain and close have (the close
            # waits for its run thread in a pool thread of its own): allow them that.
            settle = time.monotonic() + 15
            while _threads(server.pid) > threads + 4 and time.monotonic() < settle:
                time.sleep(0.1)
            settled = _threads(server.pid)
    finally:
        server.stop()
    print(f"threads, RSS MB: {threads}, {rss:.0f} at first; after each reload: {samples}; "
          f"settled: {settled} threads")
    # Before the fix each retired version kept its session (3 more threads, 4+ MB) until
    # Python's cyclic garbage collector ran: +120 MB and up to +24 threads over 30 reloads
    # (fixed: +0 threads, +35 MB by the second reload, then flat). Allowed: one retired
    # version's session still closing as a sample is taken, and the allocator keeping a
    # few freed sessions' worth of memory.
    # A sample may catch one retired version still closing (its session's threads); a
    # leak grows with every reload, so the typical sample and the settled count show it.
    counts = sorted(t for t, _ in samples)
    assert counts[len(counts) // 2] <= threads + 4, samples
    assert settled <= threads + 4, (settled, samples)
    assert max(r for _, r in samples) <= rss + 70, samples
