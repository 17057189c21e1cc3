"""Client-side balancing and failover: three local servers, one killed mid-load."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from support.repositories import build_test_models
from support.served import start_server

from onnxserve.clients.client import Client, InferenceServerError, channel_target


def test_targets_become_one_balanced_channel_target() -> None:
    assert channel_target("localhost:8001") == "localhost:8001"
    assert channel_target(["127.0.0.1:1", "127.0.0.1:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    with pytest.raises(ValueError, match="dns:///"):
        channel_target(["a.example:1", "b.example:1"])
    with pytest.raises(ValueError, match="all be IPv4 or all IPv6"):
        channel_target(["127.0.0.1:1", "[::1]:2"])


def _successes(url: str) -> int:
    with Client(url, timeout=10) as client:
        return sum(s["success"]["count"] for s in client.statistics("add_one"))


def test_a_killed_server_loses_no_request_and_the_others_take_its_load(tmp_path: Path) -> None:
    build_test_models(tmp_path)
    servers = [start_server(tmp_path, tmp_path / f"server{i}.log") for i in range(3)]
    errors: list[str] = []
    done = {"ok": 0}
    lock = threading.Lock()
    stop = threading.Event()

    def load() -> None:
        x = np.ones((1, 4), np.float32)
        with Client([s.url for s in servers], timeout=30) as client:
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    y = client.infer("add_one", {"x": x})["y"]
                    assert (y == 2).all()
                    with lock:
                        done["ok"] += 1
                except InferenceServerError as exc:
                    with lock:
                        errors.append(str(exc))

    threads = [threading.Thread(target=load) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(2.0)
        before = [_successes(s.url) for s in servers]
        servers[0].process.send_signal(signal.SIGKILL)
        servers[0].process.wait(10)
        survivors = [_successes(s.url) for s in servers[1:]]
        time.sleep(3.0)
        after = [_successes(s.url) for s in servers[1:]]
        stop.set()
        for t in threads:
            t.join(60)
    finally:
        stop.set()
        for server in servers:
            server.stop()
    taken = [a - s for a, s in zip(after, survivors, strict=True)]
    print(f"failover: {done['ok']} answered, {len(errors)} failed; per server before the kill "
          f"{before}, survivors' answers in the 3 s after it {taken}")
    assert errors == []
    assert done["ok"] > 200
    assert all(b > 20 for b in before), before  # round robin used all three
    assert all(t > 50 for t in taken), (survivors, after)
