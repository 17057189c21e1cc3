"""Configs that Triton loads: reshape, every ModelConfig field parsed and then honoured,
ignored with a note, or refused with a message; unsupported data types named."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import start_server, write_config
from onnx import TensorProto, helper
from onnx_models import _save, add_one_model

from onnxserve.clients.client import Client, InferenceServerError
from onnxserve.serving.errors import ModelLoadError
from onnxserve.serving.models.config_support import IGNORED, REFUSED, check_config_support
from onnxserve.serving.models.loader import load_model
from onnxserve.serving.models.repository import parse_config
from onnxserve.serving.settings import ServerSettings

SETTINGS = ServerSettings(providers="cpu", warmup=True)


def fixed_batch_model(path: Path) -> Path:
    """A model exported with a fixed batch of 1: x [1,3,32,32] -> per-channel means [1,3]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    node = helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)
    return _save(helper.make_graph([node], "fixed", [x], [y]), path)


def vector_model(path: Path) -> Path:
    """x [N] -> y = 2x [N]: one scalar per sample, which Triton configs write as dims [1]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "vec", [x], [y],
                              initializer=[two])
    return _save(graph, path)


FIXED_CONFIG = """
max_batch_size: 0
input { name: "x" data_type: TYPE_FP32 dims: [3, 32, 32] reshape { shape: [1, 3, 32, 32] } }
output { name: "y" data_type: TYPE_FP32 dims: [3] reshape { shape: [1, 3] } }
model_transaction_policy { decoupled: false }
"""
VECTOR_CONFIG = """
max_batch_size: 8
input { name: "x" data_type: TYPE_FP32 dims: [1] reshape { shape: [] } }
output { name: "y" data_type: TYPE_FP32 dims: [1] reshape { shape: [] } }
dynamic_batching { max_queue_delay_microseconds: 1000 preserve_ordering: true }
response_cache { enable: true }
metric_tags { key: "team" value: "vision" }
"""


def test_reshape_serves_a_fixed_batch_model_without_a_batch_dimension(tmp_path: Path) -> None:
    fixed_batch_model(tmp_path / "fixed" / "1" / "model.onnx")
    write_config(tmp_path / "fixed", FIXED_CONFIG)
    model = load_model(tmp_path, "fixed", SETTINGS)
    image = np.random.default_rng(0).random((3, 32, 32), np.float32)
    inputs = model.to_model_inputs({"x": image}, 0)
    assert inputs["x"].shape == (1, 3, 32, 32)
    out = model.to_client_outputs(model.versions[1].instances[0].run(inputs))
    np.testing.assert_allclose(out["y"], image.mean(axis=(1, 2)), rtol=1e-5)


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


@pytest.mark.parametrize(("text", "message"), [
    ('sequence_batching { max_sequence_idle_microseconds: 5 }',
     r"sequence_batching is set, but stateful \(sequence\) models are not supported"),
    ('ensemble_scheduling { step { model_name: "a" } }', "ensembles are not supported"),
    ("model_transaction_policy { decoupled: true }", "decoupled models"),
    ('model_operations { op_library_filename: "libcustom.so" }',
     "custom operator libraries are not loaded"),
    ('model_repository_agents { agents { name: "checksum" } }', "repository agents"),
    ('cc_model_filenames { key: "7.5" value: "t4.onnx" }', "per-compute-capability"),
    ('batch_input { kind: BATCH_ELEMENT_COUNT target_name: "n" }', "batch_input is set"),
    ('input { name: "x" allow_ragged_batch: true }', "input.allow_ragged_batch is set"),
    ('output { name: "y" is_shape_tensor: true }', "output.is_shape_tensor is set"),
    ("instance_group { count: 1 passive: true }", "instance_group.passive is set"),
    ('input { name: "x" data_type: TYPE_BF16 dims: [4] }',
     "input 'x' has data_type TYPE_BF16, which onnxserve does not support"),
    ('output { name: "y" data_type: TYPE_BF16 dims: [4] }', "output 'y' has data_type TYPE_BF16"),
])
def test_fields_onnxserve_cannot_honour_are_refused_by_name(text: str, message: str) -> None:
    config = parse_config(f'name: "m"\n{text}\n', "m/config.pbtxt")
    with pytest.raises(ModelLoadError, match=message):
        check_config_support(config)


def test_harmless_fields_are_noted_and_defaults_pass() -> None:
    config = parse_config(
        'name: "m"\nruntime: "libtriton_onnxruntime.so"\nmodel_transaction_policy '
        "{ decoupled: false }\ninstance_group { name: \"a\" count: 2 host_policy: \"numa0\" }\n"
        'model_metrics { metric_control { metric_identifier { family: "x" } } }\n'
        "optimization { input_pinned_memory { enable: true } priority: PRIORITY_MAX }\n",
        "m/config.pbtxt")
    notes = check_config_support(config)
    assert sorted(n.split(" is ignored")[0] for n in notes) == sorted([
        "runtime", "instance_group.name", "instance_group.host_policy", "model_metrics",
        "optimization.priority", "optimization.input_pinned_memory"])
    assert not set(REFUSED) & set(IGNORED)


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


@pytest.mark.parametrize(("tensor", "message"), [
    ('input { name: "x" data_type: TYPE_FP32 reshape { shape: [1, 3, 32, 32] } }',
     "reshape needs dims"),
    ('input { name: "x" data_type: TYPE_FP32 dims: [3, 32, 32] reshape { shape: [3, 32, 32] } }',
     r"reshape shape \[3, 32, 32\] does not match the ONNX file's \[1, 3, 32, 32\]"),
    ('input { name: "x" data_type: TYPE_FP32 dims: [3, 32, 31] reshape { shape: [1, 3, 32, 32] } }',
     "dims .* hold 2976 elements but reshape shape .* holds 3072"),
])
def test_reshape_mistakes_are_named(tmp_path: Path, tensor: str, message: str) -> None:
    fixed_batch_model(tmp_path / "fixed" / "1" / "model.onnx")
    write_config(tmp_path / "fixed", f"max_batch_size: 0\n{tensor}\n")
    with pytest.raises(ModelLoadError, match=message):
        load_model(tmp_path, "fixed", SETTINGS)


def test_the_docs_list_every_ignored_and_refused_field() -> None:
    from conftest import ROOT

    rows = {line.split("|")[1].strip(): line for line in
            (ROOT / "docs" / "model-repository.md").read_text().splitlines()
            if line.startswith("| ")}
    for table, row in ((REFUSED, rows["refused"]), (IGNORED, rows["ignored, with a note"])):
        for path in table:
            assert f"{path.split('.')[-1]}`" in row, path
