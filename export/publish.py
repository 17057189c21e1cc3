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
from onnxserve.protos.images import ENCODED_IMAGE_PARAMETER
from onnxserve.protos.naming import MAX_VERSION, check_model_name, version_folder

#: the BYTES input under which exported image models also take encoded files
ENCODED_IMAGE_INPUT = "image_bytes"

LABELS_FILE = "labels.txt"
REPORT_FILE = "verification.json"
PROTOBUF_LIMIT = 2**31 - 1
#: input datatypes the server decodes encoded images into (serving/models/images.py)
IMAGE_DATATYPES = ("UINT8", "FP16", "FP32", "FP64")


@dataclass
class OutputSpec:
    """One model output as config.pbtxt lists it."""

    name: str
    #: protocol datatype (FP32, INT64, ...; see onnxserve.protos.datatypes)
    datatype: str
    #: dims as config.pbtxt lists them (no batch dimension when max_batch_size > 0)
    dims: list[int]
    #: class names, one per element of the last dimension; None: no label file
    labels: list[str] | None = None


@dataclass
class ModelCard:
    """What the repository needs to know about an exported single-input model."""

    name: str
    input_name: str
    #: protocol datatype (FP32, UINT8, ...)
    input_datatype: str
    #: dims as config.pbtxt lists them: per sample (NHWC for images) when max_batch_size >
    #: 0, else the whole shape the ONNX file declares, batch dimension included
    input_dims: list[int]
    outputs: list[OutputSpec]
    #: 0: the model does not batch (dims are the full shapes)
    max_batch_size: int
    parameters: dict[str, str] = field(default_factory=dict)


def label_files(card: ModelCard) -> dict[str, str]:
    """Output name -> label file name: labels.txt for a single labelled output, else
    labels_<output>.txt for each."""
    labelled = [o.name for o in card.outputs if o.labels]
    if len(labelled) == 1:
        return {labelled[0]: LABELS_FILE}
    return {name: f"labels_{''.join(c if c.isalnum() or c in '-_.' else '_' for c in name)}.txt"
            for name in labelled}


def takes_encoded_images(card: ModelCard) -> bool:
    """Whether the server can decode encoded images into the input: a batching model whose
    input is an image of fixed size ([H, W, 1 or 3], H and W > 0) of an image datatype."""
    dims = card.input_dims
    return (card.max_batch_size >= 1 and len(dims) == 3 and min(dims) > 0
            and dims[2] in (1, 3) and card.input_datatype in IMAGE_DATATYPES)


def build_config(card: ModelCard) -> mc.ModelConfig:
    """A complete Triton-compatible config for the card.

    ValueError if max_batch_size is negative, an output's labels do not match its class
    dimension (the last dim) in number, or output names repeat.
    """
    if card.max_batch_size < 0:
        raise ValueError(f"max_batch_size is {card.max_batch_size}; expected 0 or more")
    names = [o.name for o in card.outputs]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"outputs must be one or more distinct names, not {names}")
    config = mc.ModelConfig(
        name=card.name,
        platform="onnxruntime_onnx",
        backend="onnxruntime",
        max_batch_size=card.max_batch_size,
    )
    config.input.add(
        name=card.input_name,
        data_type=by_name(card.input_datatype).config_type,
        # Triton accepts a format only on 3-dim (per-sample) inputs
        format=mc.ModelInput.FORMAT_NHWC if len(card.input_dims) == 3 else
        mc.ModelInput.FORMAT_NONE,
        dims=card.input_dims,
    )
    files = label_files(card)
    for output in card.outputs:
        if output.labels and (not output.dims or output.dims[-1] != len(output.labels)):
            raise ValueError(
                f"output {output.name!r}: {len(output.labels)} class names, but its dims are "
                f"{output.dims} (the last dim must be the number of classes)"
            )
        config.output.add(
            name=output.name,
            data_type=by_name(output.datatype).config_type,
            dims=output.dims,
            label_filename=files.get(output.name, ""),
        )
    if card.max_batch_size > 0:
        config.dynamic_batching.SetInParent()
    for key, value in sorted(card.parameters.items()):
        config.parameters[key].string_value = value
    if takes_encoded_images(card):
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
    """Version numbers that already hold a model.onnx (folders named as the server reads
    them: onnxserve.protos.naming.version_folder; other folders are not versions).

    Raises:
        ValueError: ``name`` is not a model name (onnxserve.protos.naming).
    """
    folder = repository / check_model_name(name)
    if not folder.is_dir():
        return []
    found = ((version_folder(p.name), p) for p in folder.iterdir())
    return sorted(number for number, p in found
                  if number is not None and (p / "model.onnx").is_file())


def check_version(version: int) -> int:
    """``version`` when it can name a version folder the server serves.

    Raises:
        ValueError: ``version`` is below 1 or above 2**63 - 1 (Triton's int64 versions; a
            folder "0" is ignored, as by Triton).
    """
    if not 1 <= version <= MAX_VERSION:
        raise ValueError(f"version {version}: expected a whole number from 1 to {MAX_VERSION}")
    return version


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

    Raises:
        ValueError: the card's name is not a model name the server serves, the version is
            not one (see ``check_version``), or ``build_config`` refuses the card; nothing
            is written then.
    """
    # Name, version and config first: what they refuse must leave the repository untouched.
    check_model_name(card.name)
    config_text = text_format.MessageToString(build_config(card))
    if version is None:
        version = max(existing_versions(repository, card.name), default=0) + 1
    check_version(version)
    folder = repository / card.name
    model_path = folder / str(version) / "model.onnx"
    if isinstance(onnx_model, bytes):
        _write_atomically(model_path, onnx_model)
    else:
        _write_model(model_path, onnx_model)
    if report is not None:
        _write_atomically(model_path.parent / REPORT_FILE,
                          (json.dumps(report, indent=2) + "\n").encode())
    files = label_files(card)
    for output in card.outputs:
        if output.labels:
            _write_atomically(folder / files[output.name],
                              ("\n".join(output.labels) + "\n").encode())
    _write_atomically(folder / "config.pbtxt", config_text.encode())
    return model_path
