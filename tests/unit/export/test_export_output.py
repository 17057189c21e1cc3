"""What `onnxserve export` prints: its steps, progress and results, not the libraries' logs
(those with --verbose); agreement figures that prove nothing say so; options that do not
apply to the model are refused."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from onnxserve.export import pipeline, progress
from onnxserve.serving.process import onnxserve_command

#: Signs of the libraries' logs: TensorFlow's C++ log (I/W/E0000 ...), absl, Python
#: logging's level names, tf2onnx, onnxruntime.quantization.
LIBRARY_NOISE = ("E0000", "I0000", "W0000", "absl::", "WARNING", "INFO ", "tf2onnx.",
                 "Quantization parameters", "pre-processing before quantization", "oneDNN")


def _cli(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run(
        onnxserve_command("export", *args, "--model-repository", str(tmp_path / "repo")),
        capture_output=True, text=True, timeout=600, env={**environment, **(env or {})},
    )


def _tiny_model_file(folder: Path) -> Path:
    """A small image classifier saved as .keras (Rescaling first: pixels 0-255)."""
    import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential([
        keras.Input((8, 8, 3), name="image"), layers.Rescaling(1 / 255),
        layers.Conv2D(4, 3, activation="relu"), layers.Flatten(),
        layers.Dense(10, name="logits"), layers.Softmax(name="scores"),
    ])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.keras"
    model.save(path)
    (folder / "labels.txt").write_text("".join(f"class{i}\n" for i in range(10)))
    return path


def test_lenet5_export_prints_its_steps_and_no_library_logs(tmp_path: Path) -> None:
    result = _cli(tmp_path, "lenet5", "--dataset", "digits", "--epochs", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    lines = output.splitlines()
    for noise in LIBRARY_NOISE:
        assert noise not in output, f"{noise!r} in:\n{output}"
    assert len(lines) < 25, output
    assert lines[0].startswith("training lenet5 on scikit-learn digits")
    # one line per epoch, ours (Keras' own progress prints "Epoch 1/2" and "36/36 - ...")
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"], output
    assert all("loss " in line and "val_accuracy " in line for line in epochs), output
    assert "Epoch 1/2" not in output and "/step" not in output
    assert "converting lenet5 to ONNX (tf2onnx, opset 17) ..." in lines
    assert any(line.startswith("parity on 256 samples:") for line in lines), output
    assert any(line.startswith("published lenet5 to ") for line in lines), output
    assert result.stderr == "", result.stderr


def test_int8_export_hides_the_quantizers_messages(tmp_path: Path) -> None:
    path = _tiny_model_file(tmp_path / "model")
    # --force: whether dynamic int8 beats fp32 on so small a model depends on the machine
    result = _cli(tmp_path, "--from", str(path), "--labels", str(path.parent / "labels.txt"),
                  "--int8", "--force")
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    for noise in LIBRARY_NOISE:
        assert noise not in output, f"{noise!r} in:\n{output}"
    assert len(output.splitlines()) < 25, output
    assert "making the int8 variant (dynamic quantization) ..." in output
    assert "int8: top-1 agreement of scores with fp32" in output
    assert "int8 speed on " in output and "int8 at batch 1 after onnxruntime's fusion: " in output
    assert any(line.startswith("parity on 16 samples:") for line in output.splitlines())
    assert "published tiny_int8 to " in output


def test_verbose_shows_the_libraries_logs(tmp_path: Path) -> None:
    path = _tiny_model_file(tmp_path / "model")
    result = _cli(tmp_path, "--from", str(path), "--int8", "--force", "--verbose")
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "INFO tf2onnx." in output  # the converter's log
    assert "Quantization parameters" in output  # onnxruntime.quantization's log
    # the quantizer warns when a model was not pre-processed (quant_pre_process): it was
    assert "pre-processing before quantization" not in output
    assert "published tiny_int8 to " in output


def test_a_failing_tensorflow_import_shows_what_it_printed(tmp_path: Path) -> None:
    # Without --verbose, what TensorFlow prints while it loads is dropped, unless the
    # import fails. Stand-in packages print to file descriptor 2 as TensorFlow's C++ does.
    fake = tmp_path / "fake"
    for name, body in (("keras", "import tensorflow\n"),
                       ("tensorflow", "import os\nos.write(2, b'native start-up line\\n')\n"
                                      "if os.environ.get('FAIL'):\n"
                                      "    raise ImportError('no TensorFlow here')\n")):
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text(body)
    code = "from onnxserve.export import library_logs; library_logs.import_tensorflow(False)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(fake), *filter(None, [os.environ.get("PYTHONPATH")])])}
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=env, timeout=60)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    failed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**env, "FAIL": "1"}, timeout=60)
    assert failed.returncode == 1
    assert "native start-up line" in failed.stderr and "no TensorFlow here" in failed.stderr
    shown = subprocess.run([sys.executable, "-c", code.replace("(False)", "(True)")],
                           capture_output=True, text=True, env=env, timeout=60)
    assert "native start-up line" in shown.stderr


# --- progress lines -----------------------------------------------------------------------


def test_a_long_step_says_it_is_still_running_and_a_short_one_does_not() -> None:
    out = io.StringIO()
    with progress.step("converting big to ONNX", every=0.05, out=out):
        time.sleep(0.18)
    lines = out.getvalue().splitlines()
    assert lines[0] == "converting big to ONNX ..."
    assert len(lines) >= 3 and all(line.startswith("  still converting big to ONNX (")
                                   for line in lines[1:]), lines
    out = io.StringIO()
    with progress.step("converting small to ONNX", every=5, out=out):
        pass
    assert out.getvalue().splitlines() == ["converting small to ONNX ..."]


def test_still_lines_get_through_while_a_librarys_prints_are_hidden(capsys) -> None:
    from onnxserve.export import library_logs

    with progress.step("making the int8 variant", every=0.05):
        with library_logs.library_prints_hidden(verbose=False):
            print("Collecting tensor data and making histogram ...")  # as a calibrator does
            time.sleep(0.15)
    out = capsys.readouterr().out
    assert "  still making the int8 variant (" in out and "histogram" not in out, out
    with library_logs.library_prints_hidden(verbose=True):
        print("Collecting tensor data and making histogram ...")
    assert "histogram" in capsys.readouterr().out


def test_training_prints_one_line_per_epoch_and_a_step_counter_in_long_epochs() -> None:
    import keras

    out = io.StringIO()
    lines = progress.epoch_callback(3, every=0.05, out=out)

    class Slow(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None) -> None:
            time.sleep(0.03)

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    x = np.zeros((40, 4), np.float32)
    with lines.heartbeat():
        model.fit(x, np.zeros((40, 2), np.float32), batch_size=4, epochs=2, verbose=0,
                  callbacks=[lines, Slow()])
    printed = out.getvalue().splitlines()
    epochs = [line for line in printed if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/3", "epoch 2/3"], printed
    assert epochs[0].split(": ")[1].startswith("loss ")
    steps = [line for line in printed if line.startswith("  epoch ")]
    assert steps and all("step " in line and "/10 (" in line for line in steps), printed


def test_epoch_line_puts_losses_first_and_validation_last() -> None:
    line = progress.epoch_line(3, 30, {"accuracy": 0.5, "loss": 1.25, "val_accuracy": 0.75,
                                       "val_loss": 0.5}, 1.23)
    assert line == ("epoch 3/30: loss 1.2500, accuracy 0.5000, val_loss 0.5000, "
                    "val_accuracy 0.7500 (1.2 s)")


# --- agreement that proves nothing ----------------------------------------------------------


def test_int8_of_an_application_is_static_and_fused_and_flags_random_weights(
        tmp_path: Path) -> None:
    # --force: whether int8 beats fp32 depends on the machine; the speed check is test_int8's
    result = _cli(tmp_path, "mobilenet_v2", "--weights", "none", "--int8", "--force")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "making the int8 variant (static quantization, calibrated on 32 samples)" in (
        result.stdout)
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("int8: top-1 agreement")]
    assert "random weights" in line and "proves nothing" in line, line
    folder = tmp_path / "repo" / "mobilenet_v2_int8"
    report = json.loads((folder / "1" / "verification.json").read_text())
    assert "proves nothing" in report["top1_agreement_caveat"]
    int8 = report["int8"]
    assert (int8["quantization"], int8["format"], int8["calibration"]["samples"]) == (
        "static", "QDQ", 32)
    assert "photos" in int8["calibration"]["data"]
    # after onnxruntime's fusion all 52 convolutions and the 10 residual Adds run on integers
    ops = {(op["op_type"], op["kind"]): op["nodes"] for op in int8["batch1_ops"]}
    assert ops[("QLinearConv", "integer")] == 52 and ops[("QLinearAdd", "integer")] >= 10
    assert not [op for op, kind in ops if kind == "float" and op in ("Conv", "Add")], ops
    assert set(report["speedup_vs_fp32"]) == {"batch1", "batch32"}


def _prepared_classifier(*, random_weights: bool, one_class: bool):
    """A tiny classifier (logits, probabilities) as prepare_* would give it."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,), name="features")
    dense = keras.layers.Dense(4, name="logits")
    logits = dense(inputs)
    model = keras.Model(inputs, [logits, keras.layers.Softmax(name="probabilities")(logits)])
    if one_class:  # class 2 wins on every input
        kernel = dense.get_weights()[0]
        dense.set_weights([kernel * 0.01, np.array([0.0, 0.0, 5.0, 0.0], np.float32)])
    data = np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32)
    return pipeline.Prepared(
        name="tiny", keras_model=model, samples=data[:32], agreement_data=data, calibration=None,
        labels={"probabilities": list("abcd")}, max_batch_size=8, random_weights=random_weights,
    )


@pytest.mark.parametrize("variant", ["fp16", "int8"])
def test_random_weight_agreement_is_flagged_for_both_variants(variant: str,
                                                              tmp_path: Path) -> None:
    prepared = _prepared_classifier(random_weights=True, one_class=False)
    report = pipeline.export(prepared, tmp_path / "repo", variant=variant, force=True)
    assert report["top1_agreement_caveat"] == pipeline.RANDOM_WEIGHTS_AGREEMENT
    stored = json.loads((Path(report["path"]).parent / "verification.json").read_text())
    assert stored["top1_agreement_caveat"] == pipeline.RANDOM_WEIGHTS_AGREEMENT


def test_agreement_when_fp32_gives_one_class_is_flagged(tmp_path: Path, capsys) -> None:
    prepared = _prepared_classifier(random_weights=False, one_class=True)
    report = pipeline.export(prepared, tmp_path / "repo", variant="fp16")
    assert "same top-1 class" in report["top1_agreement_caveat"]
    assert "proves little" in capsys.readouterr().out
    varied = _prepared_classifier(random_weights=False, one_class=False)
    report = pipeline.export(varied, tmp_path / "repo2", variant="fp16")
    assert "top1_agreement_caveat" not in report


def test_export_report_marks_agreement_that_proves_nothing() -> None:
    from onnxserve.benchmarks.export_report import markdown

    report = {"parity": {"max_abs_prob_diff": 0.0, "max_rel_score_diff": 1e-6},
              "top1_agreement_vs_fp32": 1.0, "agreement_samples": 16,
              "size_mb": {"fp32": 14.0, "int8": 3.7}, "batch1_latency_ms": {"fp32": 5, "int8": 9}}
    rows = [
        {"model": "mobilenet_v2", "variant": "int8", "data": "imagenet architecture, random "
         "weights", "report": report, "peak_rss_mb": 900, "budget_mb": 6144, "wall_s": 10},
        {"model": "lenet5", "variant": "int8", "data": "scikit-learn digits",
         "report": {**report, "top1_agreement_vs_fp32": 0.99}, "peak_rss_mb": 700,
         "budget_mb": 6144, "wall_s": 8},
    ]
    table = markdown(rows)
    assert "| 100.0% of 16 (see note 1) |" in table
    assert "| 99.0% of 16 |" in table
    assert f"Note 1: {pipeline.RANDOM_WEIGHTS_AGREEMENT}." in table


# --- options that do not apply -------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--from", "{model}", "--weights", "none"],
     "--weights applies to the ImageNet applications, not to --from PATH"),
    (["lenet5", "--weights", "imagenet"],  # the default value, given: still refused
     "--weights applies to the ImageNet applications, not to lenet5 (a training recipe)"),
    (["mobilenet_v2", "--dataset", "digits"],
     "--dataset applies to the training recipes, not to mobilenet_v2 (an ImageNet application)"),
    (["lenet5", "--raw-float-input"],
     "--raw-float-input applies to the ImageNet applications, not to lenet5"),
    (["--from", "{model}", "--raw-float-input"],
     "--raw-float-input applies to the ImageNet applications, not to --from PATH"),
    (["mobilenet_v2", "--epochs", "1", "--seed", "0", "--keep-last-weights", "--tensorboard",
      "tb", "--data-dir", "data"],
     "--data-dir, --epochs, --seed, --keep-last-weights, --tensorboard apply to the training "
     "recipes, not to mobilenet_v2"),
    (["--from", "{model}", "--epochs", "1"],
     "--epochs applies to the training recipes, not to --from PATH"),
    (["--from", "{model}", "--seed", "1"],
     "--seed applies to the training recipes, not to --from PATH"),
    (["mobilenet_v2", "--labels-output", "probabilities"],
     "--labels-output applies to --from PATH, not to mobilenet_v2"),
    (["lenet5", "--fp16-io"], "--fp16-io applies with --fp16 only"),
    (["lenet5", "--int8", "--fp16-io"], "--fp16-io applies with --fp16 only"),
    (["lenet5", "--force"], "--force applies with --int8 only"),
    (["lenet5", "--fp16", "--force"], "--force applies with --int8 only"),
    (["--list", "lenet5"], "--list lists the model ids and exports nothing"),
])
def test_options_that_do_not_apply_are_refused(args: list[str], message: str,
                                               tmp_path: Path) -> None:
    model = tmp_path / "mine.keras"
    model.write_bytes(b"not read: the options are checked first")
    result = _cli(tmp_path, *[a.replace("{model}", str(model)) for a in args])
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr, result.stderr
    assert result.stderr.startswith("onnxserve export: ")
    assert not (tmp_path / "repo").exists()


def test_options_for_both_kinds_are_each_named(tmp_path: Path) -> None:
    result = _cli(tmp_path, "--from", "x.keras", "--weights", "none", "--epochs", "3")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "onnxserve export: --epochs applies to the training recipes, not to --from PATH "
        "(your own model)",
        "onnxserve export: --weights applies to the ImageNet applications, not to --from PATH "
        "(your own model)",
    ]


def test_every_export_and_benchmark_option_has_a_help_text() -> None:
    import argparse

    from onnxserve.benchmarks import export_report, first_request, profile, seed_accuracy
    from onnxserve.serving.cli import build_parser

    subparsers = next(a for a in build_parser()._actions
                      if isinstance(a, argparse._SubParsersAction))
    parsers = {f"onnxserve {name}": subparsers.choices[name]
               for name in ("export", "samples", "bench")}
    parsers.update({module.__name__: module.build_parser()
                    for module in (export_report, first_request, profile, seed_accuracy)})
    missing = [f"{name} {'/'.join(action.option_strings) or action.dest}"
               for name, parser in parsers.items() for action in parser._actions
               if not (action.help or "").strip() or action.help.startswith("(default")]
    assert not missing, missing
