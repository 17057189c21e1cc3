"""Every seed model: recipes train and export, applications convert with parity,
preprocessing in the graph matches Keras, variants, user models and unsafe files."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from onnxserve.benchmarks.export_report import synthetic_cifar10
from onnxserve.export import applications, cli, pipeline
from onnxserve.export.recipes import RECIPES
from onnxserve.serving.models.loader import load_model
from onnxserve.serving.models.repository import read_model
from onnxserve.serving.process import onnxserve_command
from onnxserve.serving.settings import ServerSettings

#: applications whose export takes over half a minute here: `make test-slow`
SLOW_APPLICATIONS = {"vgg19", "inception_v3", "resnet50", "densenet201", "nasnet_large",
                     "efficientnet_b1", "xception"}


def _export(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        onnxserve_command("export", *args, "--model-repository", str(tmp_path / "repo")),
        capture_output=True, text=True, timeout=900,
    )


def test_list_shows_every_seed_model() -> None:
    result = subprocess.run(onnxserve_command("export", "--list"), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    ids = [line.split()[0] for line in result.stdout.splitlines()]
    assert ids == [*cli.RECIPES, *applications.APPLICATIONS]
    assert set(ids) >= {"lenet5", "fashion_cnn1", "fashion_cnn2", "fashion_cnn3",
                        "fashion_cnn3_aug", "cifar10_cnn", "vgg19", "inception_v3", "resnet50",
                        "mobilenet", "mobilenet_v2", "densenet201", "nasnet_large",
                        "efficientnet_b1", "xception"}
    assert tuple(RECIPES) == cli.RECIPES


@pytest.mark.parametrize("app_name", ["mobilenet_v2", "vgg19", "densenet201", "efficientnet_b1"])
def test_preprocessing_in_graph_matches_keras_on_real_photos(app_name: str) -> None:
    import keras

    app = applications.APPLICATIONS[app_name]
    photos = pipeline.photo_crops(app.size, count=4)
    layers = [keras.layers.Rescaling(1.0), *applications.preprocessing_layers(app.preprocessing)]
    in_graph = np.asarray(keras.Sequential(layers)(photos))
    expected = pipeline.preprocess_like_keras(app, photos)
    np.testing.assert_allclose(in_graph, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("recipe_name", list(RECIPES))
def test_every_recipe_trains_and_exports(recipe_name: str, tmp_path: Path) -> None:
    data_dir = None
    dataset = "digits"
    if recipe_name == "cifar10_cnn":
        data_dir, dataset = tmp_path, "cifar10"
        synthetic_cifar10(tmp_path / "cifar10.npz", n_train=600, n_test=200)
    prepared = pipeline.prepare_recipe(
        recipe_name, dataset=dataset, data_dir=data_dir, epochs=3, seed=0,
        keep_last_weights=False, tensorboard=None,
    )
    assert float(prepared.parameters["onnxserve.heldout_accuracy"]) > 0.2  # learnt something
    report = pipeline.export(prepared, tmp_path / "repo")
    assert report["parity"]["compared_on"] == "logits"
    config = read_model(tmp_path / "repo", recipe_name).config
    (tensor,) = config.input
    if recipe_name == "cifar10_cnn":  # standardisation folded in: raw pixels in
        assert config.parameters["onnxserve.preprocessing"].string_value == "in_graph"
        assert list(tensor.dims) == [32, 32, 3] and tensor.data_type == 2  # TYPE_UINT8
    else:
        assert list(tensor.dims) == [28, 28, 1] and tensor.data_type == 11  # TYPE_FP32
    _serves(tmp_path / "repo", recipe_name, 10)


def _serves(repository: Path, name: str, classes: int) -> None:
    """The serving side loads the exported model and runs a batch of two through it."""
    model = load_model(repository, name, ServerSettings(providers="cpu"))
    (tensor,) = model.config.input
    dtype = np.uint8 if tensor.data_type == 2 else np.float32
    x = np.zeros((2, *tensor.dims), dtype)
    instance = model.versions[max(model.versions)].instances[0]
    (out,) = instance.run({tensor.name: x}).values()
    assert out.shape == (2, classes)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-4)


def test_training_loss_falls() -> None:
    from onnxserve.export import datasets, recipes

    split = datasets.load_digits()
    for name in ("fashion_cnn2", "fashion_cnn3_aug"):
        result = recipes.train(RECIPES[name], split, epochs=3, verbose=0)
        assert result.last_loss < result.first_loss


def test_augmentation_keeps_shape_and_changes_images() -> None:
    from onnxserve.export import datasets, recipes

    x = datasets.load_digits().x_train[:50]
    out, indices = recipes.augmented_copies(x, 20)
    assert out.shape == (20, 28, 28, 1) and len(set(indices.tolist())) == 20
    assert not np.allclose(out, x[indices])


@pytest.mark.parametrize("variant", ["int8", "fp16"])
def test_reduced_precision_variants_agree_with_fp32(variant: str, tmp_path: Path) -> None:
    prepared = pipeline.prepare_recipe("lenet5", dataset="digits", data_dir=None, epochs=10,
                                       seed=0, keep_last_weights=False, tensorboard=None)
    # force: int8 of so small a model is no faster than fp32 on x86 (its 1- and 6-channel
    # convolutions suit onnxruntime's fp32 kernels better); the speed check is test_int8's
    report = pipeline.export(prepared, tmp_path / "repo", variant=variant, force=True)
    assert report["top1_agreement_vs_fp32"] >= 0.99
    assert report["size_mb"][variant] < report["size_mb"]["fp32"]
    assert report["heldout_accuracy"] > 0.9
    assert set(report["speedup_vs_fp32"]) == {"batch1", "batch32"}
    if variant == "int8":  # static QDQ, calibrated on the 256 training samples
        int8 = report["int8"]
        assert (int8["quantization"], int8["format"]) == ("static", "QDQ")
        assert int8["calibration"]["samples"] == 256
        assert int8["calibration"]["data"] == "256 training images of " + prepared.parameters[
            "onnxserve.dataset"]
        classifier, softmax = int8["float_nodes"]
        assert "/logits_1/" in classifier and softmax.endswith("probabilities_1/Softmax")
    model_dir = tmp_path / "repo" / f"lenet5_{variant}"
    assert (model_dir / "1" / "verification.json").is_file()
    assert read_model(tmp_path / "repo", f"lenet5_{variant}").config.input[0].data_type == 11


@pytest.mark.parametrize(
    "app_name",
    [pytest.param(a, marks=pytest.mark.slow) if a in SLOW_APPLICATIONS else a
     for a in applications.APPLICATIONS],
)
def test_application_converts_with_parity(app_name: str, tmp_path: Path) -> None:
    result = _export(tmp_path, app_name, "--weights", "none")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "repo" / app_name / "1" / "verification.json").read_text())
    assert report["parity"]["compared_on"] == "logits"
    assert report["parity"]["max_abs_prob_diff"] <= 1e-4
    size = applications.APPLICATIONS[app_name].size
    assert list(read_model(tmp_path / "repo", app_name).config.input[0].dims) == [size, size, 3]
    _serves(tmp_path / "repo", app_name, 1000)


def test_raw_float_input(tmp_path: Path) -> None:
    result = _export(tmp_path, "mobilenet", "--weights", "none", "--raw-float-input")
    assert result.returncode == 0, result.stderr[-2000:]
    config = read_model(tmp_path / "repo", "mobilenet").config
    assert config.input[0].data_type == 11  # TYPE_FP32
    assert config.parameters["onnxserve.preprocessing"].string_value == "tf"


def test_user_model_exports(tmp_path: Path) -> None:
    import keras

    model = keras.Sequential([keras.Input((8,), name="features"), keras.layers.Dense(3),
                              keras.layers.Softmax()])
    model.save(tmp_path / "mine.keras")
    result = _export(tmp_path, "--from", str(tmp_path / "mine.keras"), "--name", "mine")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "parity on 16 samples" in result.stdout
    config = read_model(tmp_path / "repo", "mine").config
    assert list(config.input[0].dims) == [8] and list(config.output[0].dims) == [3]


def test_a_keras_file_with_code_is_refused_without_running_it(tmp_path: Path) -> None:
    import keras

    marker = tmp_path / "code-ran"

    def payload(x):
        marker.write_text("the file's code ran")
        return x

    model = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(payload)])
    model.save(tmp_path / "evil.keras")
    marker.unlink(missing_ok=True)
    result = _export(tmp_path, "--from", str(tmp_path / "evil.keras"))
    assert result.returncode == 1
    assert "safe mode" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


def test_unknown_model_and_missing_target_are_usage_errors(tmp_path: Path) -> None:
    assert _export(tmp_path, "nope").returncode == 2
    assert _export(tmp_path).returncode == 2


def test_savedmodel_folder_exports(tmp_path: Path) -> None:
    import keras

    inputs = keras.Input((6,), name="x")
    model = keras.Model(inputs, keras.layers.Dense(2, name="scores")(inputs))
    model.export(str(tmp_path / "saved"), format="tf_saved_model")
    result = _export(tmp_path, "--from", str(tmp_path / "saved"), "--name", "saved")
    assert result.returncode == 0, result.stderr[-2000:]
    config = read_model(tmp_path / "repo", "saved").config
    assert list(config.input[0].dims) == [6]
    # the serving signature's output name, not the layer's (docs/export.md says so)
    assert [o.name for o in config.output] == ["output_0"]


def test_a_savedmodel_image_model_hides_its_rescaling(tmp_path: Path) -> None:
    import keras

    inputs = keras.Input((8, 8, 3), name="image")
    scaled = keras.layers.Rescaling(1 / 255)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(scaled)))
    model.export(str(tmp_path / "saved"), format="tf_saved_model")
    result = _export(tmp_path, "--from", str(tmp_path / "saved"), "--name", "img")
    assert result.returncode != 0
    assert "a Rescaling layer inside it cannot be seen" in result.stderr, result.stderr[-2000:]
    assert "--preprocessing" in result.stderr


def test_models_over_two_gigabytes_use_external_data(tmp_path: Path, monkeypatch) -> None:
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper
    from support.onnx_models import add_one_model

    from onnxserve.export import publish
    from onnxserve.export.publish import ModelCard, OutputSpec

    model = onnx.load(str(add_one_model(tmp_path / "src.onnx")))
    raw = [numpy_helper.from_array(numpy_helper.to_array(t), t.name)  # raw_data, as exports
           for t in model.graph.initializer]
    del model.graph.initializer[:]
    model.graph.initializer.extend(raw)
    monkeypatch.setattr(publish, "PROTOBUF_LIMIT", 10)  # pretend the model is huge
    card = ModelCard("big", "x", "FP32", [4], [OutputSpec("y", "FP32", [4])], 8)
    path = publish.publish(tmp_path / "repo", card, model)
    assert (path.parent / "model.onnx.data").is_file()
    out = ort.InferenceSession(str(path)).run(["y"], {"x": np.zeros((1, 4), np.float32)})[0]
    assert out.tolist() == [[1.0, 1.0, 1.0, 1.0]]
