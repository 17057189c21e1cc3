"""Configs that Triton loads: reshape, every ModelConfig field parsed and then honoured,
ignored with a note, or refused with a message; unsupported data types named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support.onnx_models import FIXED_CONFIG, fixed_batch_model
from support.repositories import write_config

from onnxserve.serving.errors import ModelLoadError
from onnxserve.serving.models.config_support import IGNORED, REFUSED, check_config_support
from onnxserve.serving.models.loader import load_model
from onnxserve.serving.models.repository import parse_config
from onnxserve.serving.settings import ServerSettings

SETTINGS = ServerSettings(providers="cpu", warmup=True)


def test_reshape_serves_a_fixed_batch_model_without_a_batch_dimension(tmp_path: Path) -> None:
    fixed_batch_model(tmp_path / "fixed" / "1" / "model.onnx")
    write_config(tmp_path / "fixed", FIXED_CONFIG)
    model = load_model(tmp_path, "fixed", SETTINGS)
    image = np.random.default_rng(0).random((3, 32, 32), np.float32)
    inputs = model.to_model_inputs({"x": image}, 0)
    assert inputs["x"].shape == (1, 3, 32, 32)
    out = model.to_client_outputs(model.versions[1].instances[0].run(inputs))
    np.testing.assert_allclose(out["y"], image.mean(axis=(1, 2)), rtol=1e-5)


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
    from support import ROOT

    rows = {line.split("|")[1].strip(): line for line in
            (ROOT / "docs" / "model-repository.md").read_text().splitlines()
            if line.startswith("| ")}
    for table, row in ((REFUSED, rows["refused"]), (IGNORED, rows["ignored, with a note"])):
        for path in table:
            assert f"{path.split('.')[-1]}`" in row, path
