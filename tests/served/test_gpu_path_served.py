"""The GPU path's I/O binding and batch buckets on a served model, on onnxruntime's CPU
provider (the unit tests of that path are in tests/unit/runtime/test_gpu_path.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from support.onnx_models import scores_model
from support.repositories import write_config
from support.served import start_server

from onnxserve.clients.client import Client


def _param(key: str, value: str) -> str:
    return f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}\n'


def test_a_model_served_with_io_binding_and_buckets_answers_like_any_other(
        tmp_path: Path) -> None:
    scores_model(tmp_path / "scores" / "1" / "model.onnx", classes=5)
    write_config(tmp_path / "scores", (
        'max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 2000 }\n'
        'output { name: "scores" label_filename: "labels.txt" }\n'
        + _param("onnxserve.io_binding", "true") + _param("onnxserve.batch_buckets", "4,8")))
    (tmp_path / "scores" / "labels.txt").write_text("a\nb\nc\nd\ne\n")
    server = start_server(tmp_path, tmp_path / "server.log")
    try:
        with Client(server.url, timeout=30.0) as client:
            params = client.model_metadata("scores").parameters
            assert params["batch_buckets"] == "4,8"
            assert "1 x CPU CPUExecutionProvider (I/O binding)" in params["instances"]
            rng = np.random.default_rng(2)
            batches = [rng.permutation(5).astype(np.float32)[None].repeat(n, 0)
                       for n in (1, 3, 2)]
            for scores in batches:
                out = client.infer("scores", {"scores_in": scores}, ["scores"],
                                   classification=2)
                order = np.argsort(-scores[0])[:2]
                row = [f"{scores[0][i]:f}:{i}:{'abcde'[i]}".encode() for i in order]
                assert out["scores"].tolist() == [row] * len(scores)
                whole = client.infer("scores", {"scores_in": scores}, ["scores"])
                np.testing.assert_array_equal(whole["scores"], scores)
            stats = client.statistics("scores")[0]
            # every batch ran at a bucket size; the padding never reached the answers
            assert stats["inference_count"] == 12
            assert set(stats["batches"]) <= {4, 8}
    finally:
        server.stop()
