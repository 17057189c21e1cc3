"""The serving side and the client import and run without TensorFlow (or the export stack)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support.onnx_models import add_one_model

BLOCK = """
import sys
for name in ("tensorflow", "keras", "tf2onnx", "sklearn", "onnx"):
    sys.modules[name] = None  # any import of these now raises ImportError
"""


def test_serving_runs_without_the_export_stack(tmp_path: Path) -> None:
    add_one_model(tmp_path / "m" / "1" / "model.onnx")
    code = BLOCK + f"""
import numpy as np
from onnxserve.serving import cli, server
from onnxserve.serving.frontends import grpc_service
from onnxserve.serving.models.loader import load_model
from onnxserve.serving.settings import ServerSettings
from onnxserve.clients import classify, client, preprocess
cli.build_parser().parse_args(["serve", "--providers", "cpu"])
model = load_model(__import__("pathlib").Path({str(tmp_path)!r}), "m", ServerSettings())
print(model.versions[1].instances[0].run({{"x": np.zeros((1, 4), np.float32)}})["y"].tolist())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[[1.0, 1.0, 1.0, 1.0]]"


def test_export_without_the_export_stack_says_what_to_install(tmp_path: Path) -> None:
    code = BLOCK + f"""
from onnxserve.serving import cli
raise SystemExit(cli.main(["export", "lenet5", "--dataset", "digits", "--model-repository",
                           {str(tmp_path / "repo")!r}]))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert "is not installed; exporting needs the export extra" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "repo").exists()
