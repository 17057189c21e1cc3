"""Configs that Triton loads, on a running server: reshape and harmless fields served end to
end, and a config onnxserve cannot honour failing its model's load, never the server's
(each field on its own: tests/unit/models/test_triton_configs.py)."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from onnx import TensorProto, helper
from support.onnx_models import FIXED_CONFIG, add_one_model, fixed_batch_model, save_model
from support.repositories import write_config
from support.served import start_server

from onnxserve.clients.client import Client, InferenceServerError


def vector_model(path: Path) -> Path:
    """x [N] -> y = 2x [N]: one scalar per sample, which Triton configs write as dims [1]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "vec", [x], [y],
                              initializer=[two])
    return save_model(graph, path)


VECTOR_CONFIG = """
max_batch_size: 8
input { name: "x" data_type: TYPE_FP32 dims: [1] reshape { shape: [] } }
output { name: "y" data_type: TYPE_FP32 dims: [1] reshape { shape: [] } }
dynamic_batching { max_queue_delay_microseconds: 1000 preserve_ordering: true }
response_cache { enable: true }
metric_tags { key: "team" value: "vision" }
"""


def test_reshape_and_harmless_fields_served_end_to_end(tmp_path: Path) -> None:
    fixed_batch_model(tmp_path / "fixed" / "1" / "model.onnx")
    write_config(tmp_path / "fixed", FIXED_CONFIG)
    vector_model(tmp_path / "vector" / "1" / "model.onnx")
    write_config(tmp_path / "vector", VECTOR_CONFIG)
    server = start_server(tmp_path, tmp_path / "server.log")
    try:
        with Client(server.url) as client:
            assert client.is_server_ready()
            meta = client.model_metadata("fixed")
            assert meta.inputs[0].shape == (3, 32, 32) and meta.outputs[0].shape == (3,)
            image = np.random.default_rng(1).random((3, 32, 32), np.float32)
            y = client.infer("fixed", {"x": image})["y"]
            assert y.shape == (3,)
            np.testing.assert_allclose(y, image.mean(axis=(1, 2)), rtol=1e-5)
            assert client.model_metadata("vector").inputs[0].shape == (-1, 1)
            x = np.array([[1.5], [-2.0], [4.0]], np.float32)
            out = client.infer("vector", {"x": x})["y"]
            assert out.shape == (3, 1) and out.ravel().tolist() == [3.0, -4.0, 8.0]
            with pytest.raises(InferenceServerError) as err:
                client.infer("fixed", {"x": np.zeros((1, 3, 32, 32), np.float32)})
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        log = server.output()
        assert "response_cache is ignored: onnxserve keeps no response cache" in log
        assert "metric_tags is ignored" in log and "preserve_ordering is ignored" in log
    finally:
        server.stop()


def test_bf16_and_unsupported_fields_fail_the_load_not_the_server(tmp_path: Path) -> None:
    add_one_model(tmp_path / "bf16" / "1" / "model.onnx")
    write_config(tmp_path / "bf16", 'input { name: "x" data_type: TYPE_BF16 dims: [4] }\n')
    add_one_model(tmp_path / "stateful" / "1" / "model.onnx")
    write_config(tmp_path / "stateful", "max_batch_size: 4\nsequence_batching { }\n")
    add_one_model(tmp_path / "add_one" / "1" / "model.onnx")
    # A "background" label first: 5 labels for 4 classes would shift every label by one.
    add_one_model(tmp_path / "labelled" / "1" / "model.onnx")
    write_config(tmp_path / "labelled", 'max_batch_size: 4\n'
                 'output { name: "y" label_filename: "labels.txt" }\n')
    (tmp_path / "labelled" / "labels.txt").write_text("background\na\nb\nc\nd\n\n")
    server = start_server(tmp_path, tmp_path / "server.log")
    try:
        with Client(server.url) as client:
            index = {m["name"]: m for m in client.models()}
            assert index["add_one"]["state"] == "READY"
            assert index["labelled"]["state"] == "UNAVAILABLE"
            assert "label file 'labels.txt' has 5 labels but the output has 4 classes" in (
                index["labelled"]["reason"])
            assert index["bf16"]["state"] == "UNAVAILABLE"
            assert "input 'x' has data_type TYPE_BF16" in index["bf16"]["reason"]
            assert index["stateful"]["state"] == "UNAVAILABLE"
            assert "sequence_batching is set" in index["stateful"]["reason"]
        assert "Traceback" not in server.output() and "KeyError" not in server.output()
    finally:
        server.stop()
