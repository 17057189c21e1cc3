"""A batched model must return one row per sample: served end to end, on a real ONNX model.

The model says its output ``s`` is [N, 4] but returns one row (Compress on axis 0), the way
real exported models with a reduction over the batch do. Its rows cannot be split back to
the requests, so every request of such a batch fails with the output named, never with
another request's data; with warm-up on, the model does not load at all.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from support.onnx_models import one_row_model
from support.repositories import write_config
from support.served import start_server

from onnxserve.clients.client import Client, InferenceServerError

CONFIG = (
    'platform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
    "dynamic_batching { max_queue_delay_microseconds: 200000 }\n"
)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("one_row")
    one_row_model(repository / "one_row" / "1" / "model.onnx")
    write_config(repository / "one_row", CONFIG)
    return repository


def _infer(url: str, rows: int) -> dict[str, np.ndarray]:
    x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) + 1
    with Client(url, timeout=30.0) as client:
        return client.infer("one_row", {"x": x})


def test_no_request_gets_rows_computed_from_another(repository: Path, tmp_path: Path) -> None:
    server = start_server(repository, tmp_path / "server.log", "--no-warmup")
    try:
        # Two requests inside the queue delay form one batch of 3 rows.
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(_infer, server.url, rows) for rows in (1, 2)]
            errors = [f.exception(timeout=60) for f in futures]
        for error in errors:
            assert isinstance(error, InferenceServerError), error
            assert error.code == grpc.StatusCode.INTERNAL
            assert "failed to split the output tensor 's'" in str(error)
            assert "3 row(s) (2 request(s)) but the model returned 1 row(s)" in str(error)
        with pytest.raises(InferenceServerError, match=r"'s'.*3 row\(s\).*returned 1 row"):
            _infer(server.url, 3)
        # A single sample is one row in, one row out: answered, and right.
        out = _infer(server.url, 1)
        np.testing.assert_array_equal(out["s"], [[1, 2, 3, 4]])
    finally:
        server.stop()


def test_warm_up_refuses_to_load_such_a_model(repository: Path, tmp_path: Path) -> None:
    server = start_server(repository, tmp_path / "server.log")
    try:
        with Client(server.url, timeout=10.0) as client:
            (entry,) = client.models()
            assert entry["state"] == "UNAVAILABLE"
            assert "warm-up 'batch 8' failed" in entry["reason"]
            assert "output tensor 's'" in entry["reason"]
            assert "8 row(s)" in entry["reason"] and "returned 1 row(s)" in entry["reason"]
            with pytest.raises(InferenceServerError) as caught:
                client.infer("one_row", {"x": np.ones((1, 4), np.float32)})
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()
