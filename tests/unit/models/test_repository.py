"""config.pbtxt parsing, auto-completion from the ONNX file, versions, labels, model loading."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.onnx_models import add_one_model
from support.repositories import write_config

from onnxserve.protos import model_config_pb2 as mc
from onnxserve.serving.errors import ModelLoadError
from onnxserve.serving.models.loader import load_model
from onnxserve.serving.models.repository import (
    AUTO_MAX_BATCH_SIZE,
    complete_config,
    parse_config,
    read_labels,
    read_model,
    select_versions,
)
from onnxserve.serving.settings import ServerSettings
from onnxserve.serving.types import Signature, TensorSpec

SIGNATURE = Signature(
    inputs=(TensorSpec("x", "FP32", (-1, 4)),),
    outputs=(TensorSpec("y", "FP32", (-1, 4)), TensorSpec("z", "FP32", (-1, 4))),
)


def test_unknown_field_is_named() -> None:
    with pytest.raises(ModelLoadError, match="max_batch_sizes"):
        parse_config("max_batch_sizes: 4", "m/config.pbtxt")


def test_triton_config_parses() -> None:
    config = parse_config(
        """
        name: "m" platform: "onnxruntime_onnx" max_batch_size: 8
        input [{ name: "x" data_type: TYPE_FP32 format: FORMAT_NHWC dims: [ 4 ] }]
        output [{ name: "y" data_type: TYPE_FP32 dims: [ 4 ] label_filename: "labels.txt" }]
        instance_group [{ count: 2 kind: KIND_CPU }]
        dynamic_batching { preferred_batch_size: [4, 8] max_queue_delay_microseconds: 100 }
        version_policy { latest { num_versions: 2 } }
        parameters { key: "k" value { string_value: "v" } }
        """,
        "m/config.pbtxt",
    )
    assert config.max_batch_size == 8
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]


def _source(tmp_path: Path, config_text: str | None):
    add_one_model(tmp_path / "m" / "1" / "model.onnx")
    if config_text is not None:
        write_config(tmp_path / "m", config_text)
    return read_model(tmp_path, "m")


def test_missing_config_is_completed_from_onnx(tmp_path: Path) -> None:
    config = complete_config(_source(tmp_path, None), SIGNATURE)
    assert config.max_batch_size == AUTO_MAX_BATCH_SIZE
    assert [(t.name, list(t.dims)) for t in config.input] == [("x", [4])]
    assert [t.name for t in config.output] == ["y", "z"]
    assert config.platform == "onnxruntime_onnx"


def test_partial_config_keeps_what_it_says(tmp_path: Path) -> None:
    config = complete_config(_source(tmp_path, "max_batch_size: 0"), Signature(
        inputs=(TensorSpec("x", "FP32", (2, 4)),), outputs=(TensorSpec("y", "FP32", (2, 4)),)
    ))
    assert config.max_batch_size == 0
    assert list(config.input[0].dims) == [2, 4]


@pytest.mark.parametrize(
    ("config_text", "message"),
    [
        ('max_batch_size: 4 input { name: "nope" }', "input 'nope' is not in the ONNX file"),
        ('max_batch_size: 4 input { name: "x" data_type: TYPE_INT32 }',
         "data_type is TYPE_INT32 but the ONNX file says FP32"),
        ('max_batch_size: 4 input { name: "x" dims: [5] }', r"dims \[5\] do not match"),
        ('max_batch_size: 4 output { name: "y" dims: [1, 4] }', "output 'y': dims"),
        ('platform: "tensorflow_savedmodel"', "platform 'tensorflow_savedmodel' is not supported"),
        ('name: "other"', "name is 'other' but the model folder is 'm'"),
    ],
)
def test_contradictions_are_errors_naming_the_field(
    tmp_path: Path, config_text: str, message: str
) -> None:
    with pytest.raises(ModelLoadError, match=message):
        complete_config(_source(tmp_path, config_text), SIGNATURE)


def test_batching_needs_a_dynamic_first_dimension(tmp_path: Path) -> None:
    fixed = Signature(inputs=(TensorSpec("x", "FP32", (2, 4)),), outputs=())
    with pytest.raises(ModelLoadError, match="dynamic first dimension"):
        complete_config(_source(tmp_path, "max_batch_size: 4"), fixed)


def test_version_policies() -> None:
    config = mc.ModelConfig()
    assert select_versions(config, [3, 1, 2]) == [3]
    config.version_policy.latest.num_versions = 2
    assert select_versions(config, [3, 1, 2]) == [2, 3]
    config.version_policy.all.SetInParent()
    assert select_versions(config, [3, 1, 2]) == [1, 2, 3]
    config.version_policy.specific.versions.extend([1, 7])
    assert select_versions(config, [3, 1, 2]) == [1]


def test_label_file_must_stay_inside_the_model_folder(tmp_path: Path) -> None:
    config = mc.ModelConfig()
    config.output.add(name="y", label_filename="../../etc/passwd", dims=[2])
    with pytest.raises(ModelLoadError, match="outside the model folder"):
        read_labels(tmp_path, config)
    config.output[0].label_filename = "labels.txt"
    (tmp_path / "labels.txt").write_text("a\nb\n")
    assert read_labels(tmp_path, config) == {"y": ["a", "b"]}


def test_label_count_must_match_the_classes(tmp_path: Path) -> None:
    config = mc.ModelConfig()
    config.output.add(name="probs", label_filename="labels.txt", dims=[10])
    labels = tmp_path / "labels.txt"
    # A "background" line first: every label would come back shifted by one.
    labels.write_text("background\n" + "".join(f"c{i}\n" for i in range(10)))
    with pytest.raises(ModelLoadError, match=r"output 'probs': label file 'labels.txt' has 11 "
                                             r"labels but the output has 10 classes"):
        read_labels(tmp_path, config)
    labels.write_text("".join(f"c{i}\n" for i in range(9)))
    with pytest.raises(ModelLoadError, match="has 9 labels but the output has 10 classes"):
        read_labels(tmp_path, config)
    # Trailing blank lines (and a byte order mark, CRLF line ends) do not count.
    labels.write_bytes(b"\xef\xbb\xbf" + b"".join(b"c%d\r\n" % i for i in range(10)) + b"\n \n")
    assert read_labels(tmp_path, config) == {"probs": [f"c{i}" for i in range(10)]}
    # Classes are the elements per sample: dims [2, 5] are 10 classes.
    config.output[0].dims[:] = [2, 5]
    assert len(read_labels(tmp_path, config)["probs"]) == 10
    # A variable class dimension is checked on each answer instead (test_classification).
    config.output[0].dims[:] = [-1]
    assert len(read_labels(tmp_path, config)["probs"]) == 10


def test_load_model_reports_corrupt_file(tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(tmp_path, "m", ServerSettings(providers="cpu"))


def test_load_model_without_versions(tmp_path: Path) -> None:
    write_config(tmp_path / "m", "max_batch_size: 1")
    with pytest.raises(ModelLoadError, match="no version to load"):
        load_model(tmp_path, "m", ServerSettings(providers="cpu"))


def test_load_model_picks_latest_version(tmp_path: Path) -> None:
    add_one_model(tmp_path / "m" / "1" / "model.onnx")
    add_one_model(tmp_path / "m" / "3" / "model.onnx")
    model = load_model(tmp_path, "m", ServerSettings(providers="cpu"))
    assert list(model.versions) == [3]
    assert model.provider == "CPUExecutionProvider"
    assert model.parameters()["execution_provider"] == "CPUExecutionProvider"
