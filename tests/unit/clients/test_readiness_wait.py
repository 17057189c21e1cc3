"""Client.wait_until_ready: it waits while the server gets ready, and fails at once, naming
the model and its reason, when a load failed."""

from __future__ import annotations

import pytest

from onnxserve.clients.client import Client


class _Replies:
    """A server's readiness and repository index, one reply per poll."""

    def __init__(self, ready: list[bool], index: list[list[dict]]) -> None:
        self.ready, self.index = ready, index
        self.polls = 0

    def is_server_ready(self) -> bool:
        self.polls += 1
        return self.ready.pop(0)

    def models(self) -> list[dict]:
        return self.index.pop(0)


def _client(monkeypatch: pytest.MonkeyPatch, replies: _Replies) -> Client:
    client = Client("127.0.0.1:1", timeout=1)
    monkeypatch.setattr(client, "is_server_ready", replies.is_server_ready)
    monkeypatch.setattr(client, "models", replies.models)
    return client


def test_every_model_ready_before_the_server_says_so_is_waited_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The server marks its models READY a moment before it reports itself ready: a poll in
    between is no failure (it raised "models failed to load: " with no model named)."""
    loaded = [{"name": "lenet5", "version": "1", "state": "READY", "reason": ""}]
    replies = _Replies([False, False, True], [loaded, loaded])
    with _client(monkeypatch, replies) as client:
        client.wait_until_ready(10, poll_s=0.001)
    assert replies.polls == 3


def test_a_failed_load_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    index = [{"name": "lenet5", "version": "1", "state": "READY", "reason": ""},
             {"name": "broken", "version": "1", "state": "UNAVAILABLE",
              "reason": "max_batch_size must be >= 0"}]
    loading = [dict(index[0]), {**index[1], "state": "LOADING", "reason": ""}]
    replies = _Replies([False, False], [loading, index])
    with _client(monkeypatch, replies) as client, pytest.raises(
            RuntimeError, match=r"^models failed to load: broken: max_batch_size must be >= 0$"):
        client.wait_until_ready(10, poll_s=0.001)
    assert replies.polls == 2
