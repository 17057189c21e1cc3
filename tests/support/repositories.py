"""Test model repositories: a model folder's config.pbtxt, and the small test models
(echo, add_one, scores) that most served tests load."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from support.onnx_models import add_one_model, echo_model, scores_model

SCORES_LABELS = ["cat", "dog", "bird", "fish", "horse"]


def write_config(folder: Path, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(text)


def build_test_models(repository: Path) -> None:
    """echo (full config), add_one (no config: auto-completed), scores (labels)."""
    echo_model(repository / "echo" / "1" / "model.onnx")
    inputs = "".join(
        f'input {{ name: "in_{t}" data_type: TYPE_{"STRING" if t == "BYTES" else t} dims: [2] }}\n'
        for t in ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                  "INT64", "FP16", "FP32", "FP64", "BYTES")
    )
    write_config(repository / "echo", f'name: "echo"\nbackend: "onnxruntime"\n'
                 f"max_batch_size: 8\n{inputs}")
    add_one_model(repository / "add_one" / "1" / "model.onnx")
    add_one_model(repository / "add_one" / "2" / "model.onnx")
    scores_model(repository / "scores" / "1" / "model.onnx", classes=len(SCORES_LABELS))
    write_config(repository / "scores", (
        'platform: "onnxruntime_onnx"\nmax_batch_size: 4\n'
        'input { name: "scores_in" data_type: TYPE_FP32 dims: [5] }\n'
        'output { name: "scores" data_type: TYPE_FP32 dims: [5] label_filename: "labels.txt" }\n'
        'parameters { key: "onnxserve.note" value { string_value: "test model" } }\n'
    ))
    (repository / "scores" / "labels.txt").write_text("\n".join(SCORES_LABELS) + "\n")


@dataclass
class ExportedLenet5:
    """What the ``lenet5_export`` fixture gives: the repository and the export's output."""
    repository: Path
    output: str
