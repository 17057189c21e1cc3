"""`onnxserve export --from`: your own Keras models, exported the way they were built.

Several outputs with their exact names and datatypes, labels for the output they fit,
variable image sizes, unconvertible layers refused in one line with nothing published,
max_batch_size 0, the input's pixel scale, and parity figures that are the ones checked.
Models are tiny and built here; most exports run in-process (one CLI run costs ~20 s).
"""

from __future__ import annotations

import io
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from onnxserve.export import pipeline, publish, user_models, verify
from onnxserve.protos import model_config_pb2 as mc
from onnxserve.protos.images import ENCODED_IMAGE_PARAMETER, decode
from onnxserve.serving.models.images import encoded_image_input
from onnxserve.serving.models.loader import load_model
from onnxserve.serving.models.options import model_options
from onnxserve.serving.models.repository import read_labels, read_model
from onnxserve.serving.process import onnxserve_command
from onnxserve.serving.settings import ServerSettings

PREPROCESSING_MODES = ("in_graph", "unit", "tf", "caffe", "torch")


@dataclass
class Exported:
    repository: Path
    name: str
    report: dict
    keras_file: Path


def _save(model, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.keras"
    model.save(path)
    return path


def _export(model, folder: Path, stem: str, *, prepare: dict | None = None,
            **options) -> Exported:
    """Save ``model`` as <stem>.keras, prepare and export it in-process into folder/repo
    (named ``stem`` unless options say otherwise)."""
    path = _save(model, folder, stem)
    prepared = pipeline.prepare_user_model(path, **(prepare or {}))
    report = pipeline.export(prepared, folder / "repo", **options)
    return Exported(folder / "repo", options.get("name", stem), report, path)


def _served(exported: Exported):
    """The serving side's load of the exported model (config completed against the file)."""
    return load_model(exported.repository, exported.name, ServerSettings(providers="cpu"))


def _run(model, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    instance = model.versions[max(model.versions)].instances[0]
    return instance.run(inputs)


def _parameters(config) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


def _multi_output_model():
    import keras

    layers = keras.layers
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3), name="image")
    x = layers.Rescaling(1 / 255)(inputs)
    x = layers.GlobalAveragePooling2D()(layers.Conv2D(4, 3, activation="relu")(x))
    out = layers.Dense(10, activation="softmax", name="out")(x)
    aux = layers.Dense(1, name="aux_out")(x)  # "aux_out" ends with "out"
    embedding = layers.Dense(4, name="embedding")(x)
    class_id = layers.Identity(name="class_id")(
        keras.ops.cast(keras.ops.top_k(out, 1)[1], "int64"))
    return keras.Model(inputs, [out, aux, embedding, class_id])


@pytest.fixture(scope="module")
def multi_output(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """Four outputs (one INT64), labels for the 10-class one: exported once."""
    folder = tmp_path_factory.mktemp("multi")
    labels = folder / "classes.txt"
    labels.write_text("\n".join(f"class {i}" for i in range(10)) + "\n\n\n")  # blank tail
    return _export(_multi_output_model(), folder, "multi", prepare={"labels": labels})


# --- item 6: several outputs -------------------------------------------------------------


def test_every_output_is_listed_with_its_name_datatype_and_dims(multi_output: Exported) -> None:
    config = read_model(multi_output.repository, "multi").config
    assert [(t.name, t.data_type, list(t.dims), t.label_filename) for t in config.output] == [
        ("out", mc.TYPE_FP32, [10], "labels.txt"),
        ("aux_out", mc.TYPE_FP32, [1], ""),
        ("embedding", mc.TYPE_FP32, [4], ""),
        ("class_id", mc.TYPE_INT64, [1], ""),
    ]
    (tensor,) = config.input
    assert (tensor.name, tensor.data_type, list(tensor.dims)) == ("image", mc.TYPE_FP32, [8, 8, 3])
    labels = (multi_output.repository / "multi" / "labels.txt").read_text().splitlines()
    assert labels == [f"class {i}" for i in range(10)]


def test_every_output_is_served_and_computes_what_keras_does(multi_output: Exported) -> None:
    import keras

    served = _served(multi_output)
    assert [o.name for o in served.config.output] == ["out", "aux_out", "embedding", "class_id"]
    assert read_labels(multi_output.repository / "multi", served.config) == {
        "out": [f"class {i}" for i in range(10)]}
    pixels = np.random.default_rng(5).integers(0, 256, (3, 8, 8, 3)).astype(np.float32)
    got = _run(served, {"image": pixels})
    model = keras.saving.load_model(multi_output.keras_file)
    expected = dict(zip(model.output_names, model.predict(pixels, verbose=0), strict=True))
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        if value.dtype.kind == "i":
            np.testing.assert_array_equal(got[name], value)
        else:
            np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-6)


def test_parity_checks_every_output_with_the_tolerance_it_states(multi_output: Exported) -> None:
    parity = multi_output.report["parity"]
    outputs = {o["name"]: o for o in parity["outputs"]}
    assert list(outputs) == ["out", "aux_out", "embedding", "class_id"]
    assert outputs["class_id"]["exact"] and outputs["class_id"]["dtype"] == "int64"
    assert outputs["class_id"]["values"] == parity["samples"]
    for name in ("out", "aux_out", "embedding"):
        assert not outputs[name]["exact"]
        assert outputs[name]["tolerance"] == verify.LOGITS_RTOL
        assert outputs[name]["max_rel_diff"] <= verify.LOGITS_RTOL
    summary = multi_output.report["parity_summary"]
    assert f"tol {verify.LOGITS_RTOL:.0e}" in summary and "1e-02" not in summary
    assert "top-1" not in summary and "|dp|" not in summary  # not computed, not printed
    assert "class_id (int64) exact: 0 of 16 differ" in summary
    config = read_model(multi_output.repository, "multi").config
    assert _parameters(config)["onnxserve.parity"] == summary


def test_input_and_output_datatypes_are_the_onnx_graphs(tmp_path: Path) -> None:
    import keras

    keras.utils.set_random_seed(3)
    tokens = keras.Input((4,), dtype="int32", name="tokens")
    x = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(300, 3)(tokens))
    scores = keras.layers.Dense(2, name="scores")(x)
    positive = keras.layers.Identity(name="positive")(keras.ops.greater(scores, 0.0))
    exported = _export(keras.Model(tokens, [scores, positive]), tmp_path, "tokens")
    config = read_model(tmp_path / "repo", "tokens").config
    assert (config.input[0].data_type, list(config.input[0].dims)) == (mc.TYPE_INT32, [4])
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("scores", mc.TYPE_FP32, [2]), ("positive", mc.TYPE_BOOL, [2])]
    assert "positive (bool) exact" in exported.report["parity_summary"]
    got = _run(_served(exported), {"tokens": np.array([[1, 2, 3, 299]], np.int32)})
    assert got["positive"].dtype == np.bool_ and got["positive"].shape == (1, 2)
    np.testing.assert_array_equal(got["positive"], got["scores"] > 0)


def test_labels_go_to_the_output_they_fit(multi_output: Exported, tmp_path: Path) -> None:
    def labels_file(count: int) -> Path:
        path = tmp_path / f"{count}.txt"
        path.write_text("".join(f"c{i}\n" for i in range(count)))
        return path

    def labels_of(**options) -> dict[str, list[str]]:
        return pipeline.prepare_user_model(multi_output.keras_file, **options).labels

    assert list(labels_of(labels=labels_file(10))) == ["out"]  # the only output of 10
    assert list(labels_of(labels=labels_file(4), labels_output="embedding")) == ["embedding"]
    with pytest.raises(pipeline.ExportError, match="--labels-output NAME") as ambiguous:
        labels_of(labels=labels_file(1))  # aux_out and class_id both have 1
    assert "aux_out [1]" in str(ambiguous.value) and "class_id [1]" in str(ambiguous.value)
    with pytest.raises(pipeline.ExportError, match="--labels-output NAME"):
        labels_of(labels=labels_file(7))  # no output has 7
    with pytest.raises(pipeline.ExportError, match=r"has 4 class names, but output 'out' "
                                                   r"\(per-sample dims \[10\]\) has 10 classes"):
        labels_of(labels=labels_file(4), labels_output="out")
    with pytest.raises(pipeline.ExportError, match=r"no such output.*embedding"):
        labels_of(labels=labels_file(4), labels_output="nope")
    with pytest.raises(pipeline.ExportError, match="--labels-output needs --labels"):
        labels_of(labels_output="out")


def test_a_single_output_takes_labels_only_of_its_size(tmp_path: Path) -> None:
    import keras

    model = keras.Sequential([keras.Input((6,), name="x"), keras.layers.Dense(3, name="y")])
    path = _save(model, tmp_path, "single")
    (tmp_path / "three.txt").write_text("a\nb\nc\n\n")
    (tmp_path / "two.txt").write_text("a\nb\n")
    prepared = pipeline.prepare_user_model(path, labels=tmp_path / "three.txt")
    assert prepared.labels == {"y": ["a", "b", "c"]}
    with pytest.raises(pipeline.ExportError, match=r"has 2 class names.*has 3 classes"):
        pipeline.prepare_user_model(path, labels=tmp_path / "two.txt")


def test_publish_checks_label_counts_and_names_a_file_per_labelled_output(tmp_path: Path) -> None:
    card = publish.ModelCard("m", "x", "FP32", [4], [
        publish.OutputSpec("a", "FP32", [3], ["x", "y", "z"]),
        publish.OutputSpec("b/c", "INT64", [2], ["p", "q"]),
        publish.OutputSpec("d", "BOOL", [1]),
    ], 8)
    publish.publish(tmp_path, card, b"model")
    config = read_model(tmp_path, "m").config
    assert [(o.name, o.data_type, o.label_filename) for o in config.output] == [
        ("a", mc.TYPE_FP32, "labels_a.txt"), ("b/c", mc.TYPE_INT64, "labels_b_c.txt"),
        ("d", mc.TYPE_BOOL, "")]
    assert read_labels(tmp_path / "m", config) == {"a": ["x", "y", "z"], "b/c": ["p", "q"]}

    wrong = publish.ModelCard("w", "x", "FP32", [4],
                              [publish.OutputSpec("a", "FP32", [3], ["x", "y"])], 8)
    with pytest.raises(ValueError, match="2 class names, but its dims are \\[3\\]"):
        publish.publish(tmp_path, wrong, b"model")
    assert not (tmp_path / "w").exists()  # refused before anything was written


# --- item 7: variable image size -------------------------------------------------------


def test_variable_size_image_model_is_servable_and_checked_at_two_sizes(tmp_path: Path) -> None:
    import keras

    layers = keras.layers
    model = keras.Sequential([
        keras.Input((None, None, 3), name="image"), layers.Rescaling(1 / 255),
        layers.Conv2D(4, 3), layers.GlobalAveragePooling2D(), layers.Dense(3, name="scores"),
    ])
    exported = _export(model, tmp_path, "anysize")
    config = read_model(tmp_path / "repo", "anysize").config
    assert list(config.input[0].dims) == [-1, -1, 3]
    assert ENCODED_IMAGE_PARAMETER not in config.parameters  # needs fixed H and W
    served = _served(exported)
    for shape in ((1, 64, 80, 3), (2, 224, 224, 3)):
        x = np.full(shape, 128.0, np.float32)
        assert _run(served, {"image": x})["scores"].shape == (shape[0], 3)
    assert exported.report["parity"]["shapes"] == [
        {"shape": [32, 40, 3], "samples": 16}, {"shape": [64, 48, 3], "samples": 16}]
    assert "32x40x3" in exported.report["parity_summary"]
    assert "64x48x3" in exported.report["parity_summary"]


# --- item 8: unconvertible layers, failures, max_batch_size -----------------------------


def _cli_export(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        onnxserve_command("export", *args, "--model-repository", str(tmp_path / "repo")),
        capture_output=True, text=True, timeout=600, env={**os.environ},
    )


def test_unconvertible_layer_is_one_line_and_publishes_nothing(tmp_path: Path) -> None:
    import keras

    layers = keras.layers
    model = keras.Sequential([
        keras.Input((8, 8, 3)), layers.Resizing(4, 4, antialias=True, name="resizing"),
        layers.Rescaling(1 / 255), layers.Flatten(), layers.Dense(2),
    ])
    path = _save(model, tmp_path, "antialias")
    result = _cli_export(tmp_path, "--from", str(path))
    assert result.returncode == 1, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "tf2onnx" in line]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"onnxserve export {path}: tf2onnx cannot convert op "
                               "ScaleAndTranslate (from layer 'resizing')")
    assert "antialias=False" in lines[0] and "--verbose" in lines[0]
    assert "Traceback" not in result.stderr and "Unsupported ops" not in result.stderr
    assert not (tmp_path / "repo" / "antialias").exists()


def test_unconvertible_op_leaves_the_published_model_alone(tmp_path: Path) -> None:
    import keras

    inputs = keras.Input((6,), name="features")
    scores = keras.layers.Dense(4, name="scores")(inputs)
    _export(keras.Model(inputs, scores), tmp_path, "good", name="m")
    config_before = (tmp_path / "repo" / "m" / "config.pbtxt").read_bytes()
    with_argmax = keras.Model(inputs, [scores, keras.ops.argmax(scores, axis=-1)])
    with pytest.raises(pipeline.ExportError) as refused:
        _export(with_argmax, tmp_path, "argmax", name="m")
    message = str(refused.value)
    assert "tf2onnx cannot convert op Bitcast" in message
    assert re.search(r"\(from layer 'argmax(_\d+)?'\)", message), message
    assert "serve the scores" in message and "\n" not in message
    assert publish.existing_versions(tmp_path / "repo", "m") == [1]
    assert sorted(p.name for p in (tmp_path / "repo" / "m").iterdir()) == ["1", "config.pbtxt"]
    assert (tmp_path / "repo" / "m" / "config.pbtxt").read_bytes() == config_before


def test_any_failure_during_export_names_its_stage(tmp_path: Path, monkeypatch) -> None:
    import keras

    from onnxserve.export import convert

    model = keras.Sequential([keras.Input((6,), name="x"), keras.layers.Dense(2)])
    path = _save(model, tmp_path, "m")

    def broken_converter(*args, **kwargs):
        raise RuntimeError("converter exploded")

    with monkeypatch.context() as patch:
        patch.setattr(convert, "to_onnx", broken_converter)
        with pytest.raises(pipeline.ExportError, match=r"^converting to ONNX failed "
                                                       r"\(RuntimeError: converter exploded\)"):
            pipeline.export(pipeline.prepare_user_model(path), tmp_path / "repo")

    def broken_session(onnx_model):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : no kernel")

    monkeypatch.setattr(pipeline, "_session", broken_session)
    with pytest.raises(pipeline.ExportError,
                       match=r"^loading the converted model in onnxruntime failed"):
        pipeline.export(pipeline.prepare_user_model(path), tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_max_batch_size_zero_writes_whole_shapes_and_serves(tmp_path: Path) -> None:
    import keras

    layers = keras.layers
    model = keras.Sequential([keras.Input((8, 8, 3), name="image"), layers.Rescaling(1 / 255),
                              layers.Flatten(), layers.Dense(2, name="scores")])
    exported = _export(model, tmp_path, "nobatch", max_batch_size=0)
    config = read_model(tmp_path / "repo", "nobatch").config
    assert config.max_batch_size == 0
    assert list(config.input[0].dims) == [-1, 8, 8, 3]  # the ONNX file's whole shape
    assert config.input[0].format == mc.ModelInput.FORMAT_NONE  # a format needs 3 dims
    assert list(config.output[0].dims) == [-1, 2]
    assert ENCODED_IMAGE_PARAMETER not in config.parameters  # the server needs batching
    assert not config.HasField("dynamic_batching")
    served = _served(exported)
    out = _run(served, {"image": np.zeros((3, 8, 8, 3), np.float32)})["scores"]
    assert out.shape == (3, 2)


def test_negative_max_batch_size_is_refused(tmp_path: Path) -> None:
    import keras

    model = keras.Sequential([keras.Input((6,), name="x"), keras.layers.Dense(2)])
    prepared = pipeline.prepare_user_model(_save(model, tmp_path, "m"))
    with pytest.raises(pipeline.ExportError, match="-1: expected 0 \\(no batching\\) or more"):
        pipeline.export(prepared, tmp_path / "repo", max_batch_size=-1)
    result = _cli_export(tmp_path, "--from", str(tmp_path / "m.keras"), "--max-batch-size", "-1")
    assert result.returncode == 2
    assert "--max-batch-size: -1: expected 0 (no batching) or more" in result.stderr
    assert not (tmp_path / "repo").exists()


def test_options_for_your_own_model_are_refused_for_seed_models(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("a\nb\n")
    result = _cli_export(tmp_path, "lenet5", "--labels", str(tmp_path / "labels.txt"),
                         "--preprocessing", "unit")
    assert result.returncode == 2
    assert "--labels, --preprocessing apply to --from PATH, not to lenet5" in result.stderr


# --- item 9b: the input's pixel scale ---------------------------------------------------


def test_leading_rescaling_or_normalization_means_raw_pixels(tmp_path: Path) -> None:
    import keras

    layers = keras.layers

    def head(*first):
        return keras.Sequential([keras.Input((16, 16, 3)), *first, layers.Flatten(),
                                 layers.Dense(2)])

    augment = keras.Sequential([layers.RandomFlip("horizontal"), layers.RandomRotation(0.1)])
    inputs = keras.Input((16, 16, 3))
    x = layers.Rescaling(1 / 127.5, offset=-1)(augment(inputs))
    tutorial = keras.Model(inputs, layers.Dense(2)(layers.Flatten()(x)))
    assert user_models.detect_preprocessing(head(layers.Rescaling(1 / 255)))[0] == "in_graph"
    assert user_models.detect_preprocessing(tutorial)[0] == "in_graph"
    normalized = head(layers.Normalization(mean=[120, 115, 100], variance=[60, 60, 60]))
    assert user_models.detect_preprocessing(normalized)[0] == "in_graph"
    assert user_models.detect_preprocessing(head(layers.Rescaling(255.0))) is None
    assert user_models.detect_preprocessing(head(layers.Conv2D(2, 3))) is None
    # From a file, as `export --from` reads it: recorded, and parity fed 0-255 pixels.
    prepared = pipeline.prepare_user_model(_save(tutorial, tmp_path, "tutorial"))
    assert prepared.parameters["onnxserve.preprocessing"] == "in_graph"
    assert prepared.samples.max() > 200 and np.array_equal(prepared.samples,
                                                           np.round(prepared.samples))


def test_image_model_without_a_known_scale_is_refused_until_told(tmp_path: Path) -> None:
    import keras

    layers = keras.layers
    model = keras.Sequential([keras.Input((8, 8, 1), name="digit"), layers.Conv2D(2, 3),
                              layers.Flatten(), layers.Dense(3)])
    path = _save(model, tmp_path, "digits")
    with pytest.raises(pipeline.ExportError, match="--preprocessing MODE") as refused:
        pipeline.prepare_user_model(path)
    assert all(f"{mode}: " in str(refused.value) for mode in PREPROCESSING_MODES)
    for mode, low, high in (("unit", 0.0, 1.0), ("tf", -1.0, 1.0), ("in_graph", 0.0, 255.0)):
        prepared = pipeline.prepare_user_model(path, preprocessing=mode)
        assert prepared.parameters["onnxserve.preprocessing"] == mode
        assert low <= prepared.samples.min() and prepared.samples.max() <= high
        assert prepared.samples.max() - prepared.samples.min() > (high - low) / 2
    with pytest.raises(pipeline.ExportError, match="1 channel"):
        pipeline.prepare_user_model(path, preprocessing="caffe")
    result = _cli_export(tmp_path, "--from", str(path))
    assert result.returncode == 1 and "--preprocessing MODE" in result.stderr
    assert "Traceback" not in result.stderr


def test_declared_scale_reaches_the_model_through_encoded_images(tmp_path: Path) -> None:
    import keras
    from PIL import Image

    layers = keras.layers
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((8, 8, 1), name="digit"), layers.Conv2D(2, 3),
                              layers.Flatten(), layers.Dense(3, activation="softmax")])
    exported = _export(model, tmp_path, "digits", prepare={"preprocessing": "unit"})
    served = _served(exported)
    target = encoded_image_input(served.config, model_options(served.config))
    assert target is not None and target.spec.preprocessing == "unit"
    pixels = np.random.default_rng(2).integers(0, 256, (8, 8), np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels, "L").save(png, format="PNG")
    sample = decode(png.getvalue(), target.spec)
    got = _run(served, {"digit": sample[np.newaxis]})
    (probs,) = got.values()
    trained_on = pixels.astype(np.float32)[np.newaxis, :, :, np.newaxis] / 255
    np.testing.assert_allclose(probs, model.predict(trained_on, verbose=0), rtol=1e-4,
                               atol=1e-6)


def test_preprocessing_is_refused_where_it_cannot_apply(tmp_path: Path) -> None:
    import keras

    features = keras.Sequential([keras.Input((6,), name="x"), keras.layers.Dense(2)])
    path = _save(features, tmp_path, "features")
    assert "onnxserve.preprocessing" not in pipeline.prepare_user_model(path).parameters
    with pytest.raises(pipeline.ExportError, match="applies to image inputs"):
        pipeline.prepare_user_model(path, preprocessing="unit")
    pixels = keras.Sequential([keras.Input((8, 8, 3), dtype="uint8", name="img"),
                               keras.layers.Rescaling(1 / 255), keras.layers.Flatten(),
                               keras.layers.Dense(2)])
    path = _save(pixels, tmp_path, "pixels")
    with pytest.raises(pipeline.ExportError, match="only --preprocessing in_graph"):
        pipeline.prepare_user_model(path, preprocessing="unit")
    # An integer image input can only take pixels as they are: no flag needed.
    raw = keras.Sequential([keras.Input((8, 8, 3), dtype="uint8", name="img"),
                            keras.layers.Flatten(), keras.layers.Dense(2)])
    prepared = pipeline.prepare_user_model(_save(raw, tmp_path, "raw"))
    assert prepared.parameters["onnxserve.preprocessing"] == "in_graph"
    assert prepared.samples.dtype == np.uint8 and prepared.samples.max() > 200


# --- item 9c: parity figures are the ones checked ---------------------------------------


class _FakeKeras:
    def __init__(self, outputs: dict[str, np.ndarray]) -> None:
        self.output_names = list(outputs)
        self._outputs = list(outputs.values())

    def predict(self, inputs, batch_size, verbose):
        return [o[: len(inputs)] for o in self._outputs]


class _FakeSession:
    def __init__(self, outputs: dict[str, np.ndarray]) -> None:
        self._outputs = outputs

    def get_inputs(self):
        return [type("Arg", (), {"name": "x"})]

    def get_outputs(self):
        return [type("Arg", (), {"name": n}) for n in self._outputs]

    def run(self, names, feed):
        n = len(feed["x"])
        return [self._outputs[name][:n] for name in names]


def test_generic_parity_compares_integers_exactly_and_floats_at_its_tolerance() -> None:
    scores = np.array([[1000.0, -3.0], [2.0, 500.0]], np.float32)
    ids = np.array([[999], [3]], np.int64)
    inputs = np.zeros((2, 1), np.float32)
    report = verify.check_generic(_FakeKeras({"scores": scores, "ids": ids}),
                                  _FakeSession({"scores": scores * (1 + 1e-5), "ids": ids}),
                                  inputs)
    assert str(report).startswith("parity on 2 samples: scores (float32) max |d| ")
    assert f"(tol {verify.LOGITS_RTOL:.0e} of max |Keras|)" in str(report)
    assert "ids (int64) exact: 0 of 2 differ" in str(report)
    off_by_one = np.array([[1000], [3]], np.int64)  # relative to 1000 that is 1e-3
    with pytest.raises(verify.ParityError, match=r"does not match Keras in ids:.*1 of 2 differ"):
        verify.check_generic(_FakeKeras({"scores": scores, "ids": ids}),
                             _FakeSession({"scores": scores, "ids": off_by_one}), inputs)
    nan = scores.copy()
    nan[0, 1] = np.nan
    with pytest.raises(verify.ParityError, match="in scores"):
        verify.check_generic(_FakeKeras({"scores": scores}), _FakeSession({"scores": nan}),
                             inputs)
    with pytest.raises(verify.ParityError, match="Keras gives int64, ONNX int32"):
        verify.check_generic(_FakeKeras({"ids": ids}),
                             _FakeSession({"ids": ids.astype(np.int32)}), inputs)


def test_classifier_parity_prints_only_what_it_measured() -> None:
    tie = np.array([[0.5, 0.5, 0.0]]) + np.array([[1e-9, 0.0, 0.0]])
    report = verify.compare(tie, tie[:, [1, 0, 2]])  # only a near-tie: nothing decisive
    assert report.decisive_samples == 0 and report.top1_agreement is None
    assert "top-1 not compared" in str(report) and "100.0%" not in str(report)
    assert f"max |d log p| {report.max_rel_score_diff:.2e} (tol {verify.LOGP_ATOL:.0e}" in str(
        report)
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    logits = np.log(probs)
    with_logits = verify.compare(probs, probs, logits, logits)
    assert f"(tol {verify.LOGITS_RTOL:.0e} of the sample's largest |logit|)" in str(with_logits)
    assert "top-1 agreement 100.0% of 2 decisive samples" in str(with_logits)
