"""Interoperability: the official tritonclient[grpc] package, unchanged, against onnxserve."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import SUPPORT

from onnxserve.serving.process import ServerProcess

pytestmark = pytest.mark.grpc  # run over both gRPC transports (make test)


def test_tritonclient_drives_onnxserve(server: ServerProcess, tmp_path: Path) -> None:
    from onnxserve.export.datasets import load_digits

    split = load_digits()
    images_path = tmp_path / "digits.npy"
    np.save(images_path, split.x_test[:8])
    result = subprocess.run(
        [sys.executable, str(SUPPORT / "triton_interop.py"), server.url,
         str(images_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    assert r["live"] and r["ready"] and r["model_ready"]
    assert not r["unknown_model_ready"]
    assert r["server"]["name"] == "onnxserve" and "classification" in r["server"]["extensions"]
    assert r["metadata"] == {
        "platform": "onnxruntime_onnx",
        "inputs": [["input", "FP32", [-1, 28, 28, 1]]],
        "outputs": [["probabilities", "FP32", [-1, 10]]],
    }
    assert r["config_max_batch_size"] == 64
    assert r["infer"]["shape"] == [8, 10]
    assert r["infer"]["row_sums"] == [1.0] * 8
    correct = sum(a == b for a, b in zip(r["infer"]["argmax"], split.y_test[:8], strict=True))
    assert correct >= 7
    for row, predicted in zip(r["classification"], r["infer"]["argmax"], strict=True):
        assert len(row) == 3
        score, index, label = row[0].split(":")
        assert int(index) == predicted and label == str(predicted) and 0 < float(score) <= 1
    assert r["echo_bytes"] == [["hello", ""], ["x", "yz"]]
    assert r["echo_fp16"] == [[1.0, 0.0], [0.0, 1.0]]
    assert r["errors"]["unknown_model"][0] == "StatusCode.NOT_FOUND"
    assert r["errors"]["wrong_datatype"][0] == "StatusCode.INVALID_ARGUMENT"
    assert "expected datatype FP32" in r["errors"]["wrong_datatype"][1]
