"""Export: the seed's LeNet-5 on the bundled digits, MobileNetV2, parity, and clear failures."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from support.repositories import ExportedLenet5

from onnxserve.export import verify
from onnxserve.serving.models.repository import read_model
from onnxserve.serving.process import onnxserve_command


def test_lenet5_reaches_95_percent_on_heldout_digits(lenet5_export: ExportedLenet5) -> None:
    match = re.search(r"held-out accuracy (\d\.\d+)", lenet5_export.output)
    assert match, lenet5_export.output
    assert float(match.group(1)) >= 0.95
    config = read_model(lenet5_export.repository, "lenet5").config
    assert float(config.parameters["onnxserve.heldout_accuracy"].string_value) >= 0.95


def test_lenet5_export_checked_parity_and_wrote_a_full_config(
    lenet5_export: ExportedLenet5,
) -> None:
    assert "top-1 agreement 100.0%" in lenet5_export.output
    source = read_model(lenet5_export.repository, "lenet5")
    config = source.config
    assert config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
    assert config.max_batch_size == 64
    assert [(t.name, list(t.dims)) for t in config.input] == [("input", [28, 28, 1])]
    assert [(t.name, list(t.dims), t.label_filename) for t in config.output] == [
        ("probabilities", [10], "labels.txt")
    ]
    assert (source.path / "labels.txt").read_text().split() == [str(d) for d in range(10)]
    session = ort.InferenceSession(str(source.versions[1]))
    assert not isinstance(session.get_inputs()[0].shape[0], int)  # dynamic batch dimension
    out = session.run(None, {"input": np.zeros((5, 28, 28, 1), np.float32)})[0]
    assert out.shape == (5, 10)


def test_lenet5_architecture_is_the_seeds() -> None:
    from onnxserve.export.recipes import RECIPES

    recipe = RECIPES["lenet5"]
    model = recipe.build()
    # conv 5x5x1x6, conv 5x5x6x16, dense 784-120-84-10, one pooling layer used twice
    assert model.count_params() == 156 + 2416 + 94200 + 10164 + 850
    assert sum(1 for layer in model.layers if "pool" in layer.name) == 1
    assert (recipe.training.epochs, recipe.training.batch_size) == (30, 32)
    assert recipe.training.early_stopping_patience == 3


def test_parity_on_probabilities_rejects_mismatch_and_flat_outputs() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    assert verify.compare(probs, probs + 1e-7).top1_agreement == 1.0
    with pytest.raises(verify.ParityError, match="does not match"):
        verify.compare(probs, probs[:, ::-1])
    with pytest.raises(verify.ParityError, match="does not match"):  # tiny classes, big log error
        verify.compare(np.array([[0.5, 0.5 - 1e-4, 1e-4]]), np.array([[0.5, 0.5 - 2e-5, 2e-5]]))
    with pytest.raises(verify.ParityError, match="prove nothing"):
        verify.compare(np.full((2, 3), 1 / 3), np.full((2, 3), 1 / 3))


def test_parity_on_logits_is_relative_to_their_scale() -> None:
    # Random-weight ImageNet models: tiny logits, flat probabilities. The logits still
    # must match to float32 precision, relative to their own size.
    logits = np.array([[1e-11, 3e-11, -2e-11], [5e-12, -1e-11, 2e-11]])
    probs = np.full((2, 3), 1 / 3)
    report = verify.compare(probs, probs, logits, logits * (1 + 1e-6))
    assert report.compared_on == "logits" and report.max_rel_score_diff < 1e-5
    with pytest.raises(verify.ParityError, match="does not match"):
        verify.compare(probs, probs, logits, logits[:, ::-1])
    with pytest.raises(verify.ParityError, match="prove nothing"):
        verify.compare(probs, probs, np.zeros((2, 3)), np.zeros((2, 3)))


def test_top1_is_only_required_on_decisive_samples() -> None:
    logits = np.array([[1.0, 1.0 + 1e-7, 0.0], [3.0, 0.0, 0.0]])
    swapped = np.array([[1.0 + 1e-7, 1.0, 0.0], [3.0, 0.0, 0.0]])
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    report = verify.compare(probs, probs, logits, swapped)
    assert report.decisive_samples == 1 and report.top1_agreement == 1.0


def _export(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        onnxserve_command("export", *args, "--model-repository", str(tmp_path / "repo")),
        capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})},
    )


def test_mobilenet_v2_random_weights_export(tmp_path: Path) -> None:
    result = _export(tmp_path, "mobilenet_v2", "--weights", "none")
    assert result.returncode == 0, result.stderr
    assert "top-1 agreement 100.0%" in result.stdout
    source = read_model(tmp_path / "repo", "mobilenet_v2")
    params = {k: v.string_value for k, v in source.config.parameters.items()}
    assert params["onnxserve.weights"].startswith("none (random weights")
    assert params["onnxserve.preprocessing"] == "in_graph"
    report = json.loads((source.path / "1" / "verification.json").read_text())
    assert report["parity"]["compared_on"] == "logits"
    assert report["parity"]["max_rel_score_diff"] < 1e-3
    (tensor,) = source.config.input
    assert (tensor.name, list(tensor.dims)) == ("images", [224, 224, 3])
    assert len((source.path / "labels.txt").read_text().splitlines()) == 1000
    session = ort.InferenceSession(str(source.versions[1]))
    images = np.random.default_rng(1).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    probs = session.run(None, {"images": images})[0]
    assert probs.shape == (3, 1000)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)


def test_imagenet_weights_unreachable_is_a_clear_error(tmp_path: Path) -> None:
    # A closed local port as proxy: the download fails at once, with or without network.
    env = {"KERAS_HOME": str(tmp_path / "keras"), "HTTPS_PROXY": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9"}
    result = _export(tmp_path, "mobilenet_v2", "--weights", "imagenet", env=env)
    assert result.returncode == 1
    assert "cannot get the ImageNet weights for mobilenet_v2" in result.stderr
    assert "--weights PATH" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    result = _export(tmp_path, "mobilenet_v2", "--weights", str(tmp_path / "nope.h5"))
    assert result.returncode == 1 and "no such file" in result.stderr


def test_mnist_from_a_local_copy(tmp_path: Path) -> None:
    from onnxserve.export.datasets import load_digits

    split = load_digits()
    data = tmp_path / "data"
    data.mkdir()
    to_uint8 = lambda x: np.round(x[..., 0] * 255).astype(np.uint8)  # noqa: E731
    np.savez(data / "mnist.npz", x_train=to_uint8(split.x_train), y_train=split.y_train,
             x_test=to_uint8(split.x_test), y_test=split.y_test)
    result = _export(tmp_path, "lenet5", "--dataset", "mnist", "--data-dir", str(data),
                     "--epochs", "2", "--name", "lenet5_mnist")
    assert result.returncode == 0, result.stderr
    assert f"training lenet5 on {data / 'mnist.npz'}" in result.stdout
    assert (tmp_path / "repo" / "lenet5_mnist" / "1" / "model.onnx").is_file()


def test_mnist_without_data_is_a_clear_error(tmp_path: Path) -> None:
    result = _export(tmp_path, "lenet5", "--dataset", "mnist", "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert "has no mnist.npz" in result.stderr and "Traceback" not in result.stderr


def test_training_is_reproducible(tmp_path: Path) -> None:
    for _ in range(2):
        result = _export(tmp_path, "lenet5", "--dataset", "digits", "--epochs", "1", "--seed", "3")
        assert result.returncode == 0, result.stderr
    # tf2onnx orders and names the graph's helper constants differently from run to run,
    # so compare what the two models compute, not their bytes.
    images = np.random.default_rng(0).random((16, 28, 28, 1), dtype=np.float32)
    first, second = (
        ort.InferenceSession(str(tmp_path / "repo" / "lenet5" / v / "model.onnx")).run(
            None, {"input": images}
        )[0]
        for v in ("1", "2")
    )
    np.testing.assert_array_equal(first, second)


def test_publish_adds_versions(tmp_path: Path) -> None:
    from onnxserve.export.publish import ModelCard, OutputSpec, existing_versions, publish

    card = ModelCard("m", "x", "FP32", [4], [OutputSpec("y", "FP32", [2], ["a", "b"])], 8,
                     {"k": "v"})
    publish(tmp_path, card, b"one")
    publish(tmp_path, card, b"two")
    assert existing_versions(tmp_path, "m") == [1, 2]
    config = read_model(tmp_path, "m").config
    assert config.parameters["k"].string_value == "v"
    assert oct((tmp_path / "m" / "config.pbtxt").stat().st_mode & 0o777) == "0o644"
