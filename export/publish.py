"""Write an exported model into a model repository: version folder, config.pbtxt, labels."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format

from onnxserve.protos import model_config_pb2 as mc
from onnxserve.protos.datatypes import by_name
from onnxserve.serving.images import ENCODED_IMAGE_PARAMETER

#: the BYTES input under which exported image models also take encoded files
ENCODED_IMAGE_INPUT = "image_bytes"

LABELS_FILE = "labels.txt"
REPORT_FILE = "verification.json"
PROTOBUF_LIMIT = 2**31 - 1


@dataclass
class ModelCard:
    """What the repository needs to know about an exported single-input classifier."""

    name: str
    input_name: str
    input_datatype: str
    #: per-sample dims (no batch dimension), NHWC
    input_dims: list[int]
    output_name: str
    output_dims: list[int]
    labels: list[str] | None
    max_batch_size: int
    parameters: dict[str, str] = field(default_factory=dict)
    output_datatype: str = "FP32"


def build_config(card: ModelCard) -> mc.ModelConfig:
    """A complete Triton-compatible config for the card."""
    config = mc.ModelConfig(
        name=card.name,
        platform="onnxruntime_onnx",
        backend="onnxruntime",
        max_batch_size=card.max_batch_size,
    )
    config.input.add(
        name=card.input_name,
        data_type=by_name(card.input_datatype).config_type,
        format=mc.ModelInput.FORMAT_NHWC,
        dims=card.input_dims,
    )
    config.output.add(
        name=card.output_name,
        data_type=by_name(card.output_datatype).config_type,
        dims=card.output_dims,
        label_filename=LABELS_FILE if card.labels else "",
    )
    config.dynamic_batching.SetInParent()
    for key, value in sorted(card.parameters.items()):
        config.parameters[key].string_value = value
    dims = list(card.input_dims)
    if len(dims) == 3 and dims[2] in (1, 3) and card.input_datatype in ("UINT8", "FP32"):
        # Image models also take encoded files, which the server decodes.
        config.parameters[ENCODED_IMAGE_PARAMETER].string_value = ENCODED_IMAGE_INPUT
    return config


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def existing_versions(repository: Path, name: str) -> list[int]:
    """Version numbers that already hold a model.onnx."""
    folder = repository / name
    if not folder.is_dir():
        return []
    return sorted(
        int(p.name) for p in folder.iterdir()
        if p.name.isdigit() and (p / "model.onnx").is_file()
    )


def _write_model(path: Path, onnx_model) -> None:
    import onnx

    if onnx_model.ByteSize() < PROTOBUF_LIMIT:
        _write_atomically(path, onnx_model.SerializeToString())
        return
    # Over protobuf's 2 GB: weights go to model.onnx.data beside it (Triton reads that too).
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(onnx_model, str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=f"{path.name}.data",
                    size_threshold=0)


def publish(
    repository: Path,
    card: ModelCard,
    onnx_model,
    version: int | None = None,
    report: dict | None = None,
) -> Path:
    """Write the model as ``version`` (default: one above the newest); return its file.

    ``onnx_model`` is an onnx.ModelProto (or its serialised bytes); ``report`` is written
    beside it as verification.json.
    """
    if version is None:
        version = max(existing_versions(repository, card.name), default=0) + 1
    folder = repository / card.name
    model_path = folder / str(version) / "model.onnx"
    if isinstance(onnx_model, bytes):
        _write_atomically(model_path, onnx_model)
    else:
        _write_model(model_path, onnx_model)
    if report is not None:
        _write_atomically(model_path.parent / REPORT_FILE,
                          (json.dumps(report, indent=2) + "\n").encode())
    if card.labels:
        _write_atomically(folder / LABELS_FILE, ("\n".join(card.labels) + "\n").encode())
    config_text = text_format.MessageToString(build_config(card))
    _write_atomically(folder / "config.pbtxt", config_text.encode())
    return model_path
