"""The export pipeline: a Keras model in, a verified ONNX model in the repository out.

prepare_* build (train or load) the Keras model and gather the data the checks need;
``export`` converts, verifies parity, makes the fp16/int8 variant, measures it, and
publishes the model with its verification report.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxserve.protos.naming import check_model_name, safe_model_name

from . import convert, progress, publish, variants, verify
from .cpu import this_cpu

log = logging.getLogger(__name__)

RANDOM_WEIGHTS = "none (random weights: predictions are meaningless)"
#: Why a variant's agreement with fp32 means nothing on a random-weight model.
RANDOM_WEIGHTS_AGREEMENT = ("random weights (--weights none): the scores carry no information, "
                            "so this agreement proves nothing about the variant's accuracy")
#: int8 must keep this share of fp32's top-1 answers on a recipe's held-out data.
INT8_MIN_AGREEMENT = 0.99
#: Variants made to run faster on the CPU: not published unless faster than fp32 at every
#: batch size measured (or with force). fp16 is a GPU format, no faster on the CPU: its
#: latency is reported, not checked.
SPEED_CHECKED_VARIANTS = ("int8",)
#: The larger batch size a variant's latency is measured at (besides 1), when the model's
#: max batch size allows it.
LARGE_BATCH = 32
#: How long each latency comparison runs: (batch size 1, LARGE_BATCH) as (min runs,
#: max runs, seconds); the rounds stop after the min runs once the seconds have passed.
TIMING_RUNS = {1: (30, 200, 4.0), LARGE_BATCH: (5, 30, 10.0)}


class ExportError(RuntimeError):
    """The export cannot go on; the message says why and what to do."""


@dataclass
class Prepared:
    """A Keras model ready to convert, and the data to check it with."""

    name: str
    keras_model: object
    #: parity inputs (Keras vs onnxruntime), [samples, *input shape]
    samples: np.ndarray
    #: real images or held-out data: fp16/int8 top-1 agreement against fp32
    agreement_data: np.ndarray
    #: int8 static calibration samples, [samples, *input shape] (training data, or crops of
    #: real photos); None: dynamic quantization
    calibration: np.ndarray | None
    #: class names by output name (one per element of the output's last dimension)
    labels: dict[str, list[str]]
    max_batch_size: int
    parameters: dict[str, str] = field(default_factory=dict)
    #: True when outputs are "logits" and "probabilities" (the parity check for classifiers)
    classifier: bool = True
    #: held-out data and labels, for the accuracy of reduced-precision variants
    heldout: tuple[np.ndarray, np.ndarray] | None = None
    #: more parity inputs, each of another per-sample shape (variable-size models)
    more_samples: list[np.ndarray] = field(default_factory=list)
    #: True when the weights are random (--weights none): agreement figures prove nothing
    random_weights: bool = False
    #: what the calibration samples are, for the report
    calibration_source: str = ""


def prepare_recipe(
    recipe_name: str,
    *,
    dataset: str | None,
    data_dir: Path | None,
    epochs: int | None,
    seed: int,
    keep_last_weights: bool,
    tensorboard: Path | None,
) -> Prepared:
    import dataclasses

    from . import datasets, recipes

    recipe = recipes.RECIPES[recipe_name]
    dataset = dataset or recipe.dataset
    if dataset not in recipe.datasets:
        raise ExportError(
            f"{recipe_name} trains on {', '.join(recipe.datasets)}, not {dataset}"
        )
    try:
        split = datasets.load(dataset, data_dir)
    except datasets.DatasetUnavailableError as exc:
        raise ExportError(str(exc)) from None
    print(f"training {recipe_name} on {split.source}: {len(split.x_train)} training, "
          f"{len(split.x_test)} held-out images", flush=True)
    settings = recipe.training
    if keep_last_weights:
        settings = dataclasses.replace(settings, restore_best_weights=False)
    result = recipes.train(recipe, split, epochs=epochs, settings=settings,
                           tensorboard_dir=tensorboard, seed=seed)
    print(f"held-out accuracy {result.heldout_accuracy:.4f} after {result.epochs_run} epochs",
          flush=True)
    standardized = recipe.input_scaling == "standardize"

    def wire(x: np.ndarray) -> np.ndarray:
        return np.clip(np.round(x), 0, 255).astype(np.uint8) if standardized else x

    rng = np.random.default_rng(seed)
    calibration = split.x_train[rng.permutation(len(split.x_train))[:256]]
    return Prepared(
        name=recipe_name,
        keras_model=recipes.export_model(recipe, result),
        samples=wire(split.x_test[:256]),
        agreement_data=wire(split.x_test[:2000]),
        calibration=wire(calibration),
        labels={"probabilities": list(split.class_names)},
        max_batch_size=64,
        parameters={
            "onnxserve.preprocessing": "in_graph" if standardized else "unit",
            "onnxserve.weights": "trained",
            "onnxserve.dataset": split.source,
            "onnxserve.heldout_accuracy": f"{result.heldout_accuracy:.4f}",
            "onnxserve.epochs": str(result.epochs_run),
            "onnxserve.seed_reported_accuracy": recipe.seed_accuracy,
        },
        heldout=(wire(split.x_test[:2000]), split.y_test[:2000]),
        calibration_source=f"{len(calibration)} training images of {split.source}",
    )


def _photos() -> list[np.ndarray]:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    return [np.asarray(Image.open(f).convert("RGB")) for f in load_sample_images().filenames]


def photo_crops(size: int, count: int = 16) -> np.ndarray:
    """Real photos at ``size``: scikit-learn's two, resized whole, cropped and mirrored."""
    from PIL import Image

    out = []
    for photo in _photos():
        h, w = photo.shape[:2]
        for i in range(count // 4):
            frac = 1.0 - 0.15 * i
            ch, cw = int(h * frac), int(min(w, h) * frac)
            top, left = (h - ch) // 2, (w - cw) // (2 + i)
            crop = Image.fromarray(photo[top : top + ch, left : left + cw]).resize((size, size))
            out.append(np.asarray(crop))
            out.append(np.asarray(crop)[:, ::-1])
    return np.stack(out[:count]).astype(np.uint8)


def calibration_crops(size: int, count: int = 32, seed: int = 1) -> np.ndarray:
    """int8 calibration images for the applications: [count, size, size, 3] uint8 square
    crops of scikit-learn's two photos (alternately), each 30-100% of the photo's shorter
    side at a random place, resized to ``size``, every other one mirrored. Real photos,
    not noise, and other crops than photo_crops' (the agreement data)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = _photos()
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(min(h, w) * rng.uniform(0.3, 1.0))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = np.asarray(Image.fromarray(photo[top : top + side, left : left + side])
                          .resize((size, size), Image.Resampling.BILINEAR))
        out.append(crop[:, ::-1] if i % 4 >= 2 else crop)
    return np.stack(out).astype(np.uint8)


def prepare_application(app_name: str, *, weights: str, raw_float_input: bool) -> Prepared:
    from . import applications

    app = applications.APPLICATIONS[app_name]
    source = {"imagenet": "ImageNet weights", "none": "random weights"}.get(
        weights, f"weights from {weights}")
    try:
        with progress.step(f"building {app_name} (keras.applications.{app.constructor}, "
                           f"{source})"):
            model = applications.build(app, weights, raw_float_input=raw_float_input)
    except applications.WeightsUnavailableError as exc:
        raise ExportError(str(exc)) from None
    photos = photo_crops(app.size)
    calibration = calibration_crops(app.size)
    noise = np.random.default_rng(0).integers(0, 256, (4, app.size, app.size, 3), np.uint8)
    samples = np.concatenate([photos[:4], noise])
    if raw_float_input:
        samples = preprocess_like_keras(app, samples)
        photos = preprocess_like_keras(app, photos)
        calibration = preprocess_like_keras(app, calibration)
    label = {"imagenet": "imagenet", "none": RANDOM_WEIGHTS}.get(weights, Path(weights).name)
    mode = app.preprocessing
    return Prepared(
        name=app_name,
        keras_model=model,
        samples=samples,
        agreement_data=photos,
        calibration=calibration,
        labels={"probabilities": applications.imagenet_labels()},
        max_batch_size=32,
        parameters={
            "onnxserve.preprocessing": (mode if raw_float_input and mode != "none"
                                        else "in_graph"),
            "onnxserve.keras_preprocess_input": mode,
            "onnxserve.weights": label,
        },
        random_weights=weights == "none",
        calibration_source=(f"{len(calibration)} random crops (half mirrored) of scikit-learn's "
                            "two sample photos, other than the agreement crops"),
    )


def preprocess_like_keras(app, pixels: np.ndarray) -> np.ndarray:
    """keras.applications' own preprocess_input for the application, on float32 pixels."""
    import importlib

    module = importlib.import_module(f"keras.applications.{app.module}")
    return np.asarray(module.preprocess_input(pixels.astype(np.float32).copy()), np.float32)


def prepare_user_model(
    path: Path,
    *,
    labels: Path | None = None,
    labels_output: str | None = None,
    preprocessing: str | None = None,
) -> Prepared:
    """A user's .keras / .h5 file or SavedModel folder, loaded without running its code.

    ``labels``: a file of class names, one a line (trailing blank lines ignored), for the
    output ``labels_output``, or else for the single output, or else for the only output
    whose last dimension equals the number of names. ``preprocessing``: how pixels reach an
    image input ([H, W, 1 or 3]), one of serving/models/images.py's modes; required for an image
    input unless the model's first layers show it (see user_models.detect_preprocessing),
    refused for other inputs. ExportError says what is wrong and what was expected.
    """
    from . import user_models

    try:
        model = user_models.load(path)
    except user_models.UserModelError as exc:
        raise ExportError(str(exc)) from None
    mode = _input_preprocessing(model, preprocessing)
    batches = user_models.sample_batches(model, 16, mode)
    parameters = {"onnxserve.source": path.name}
    if mode is not None:
        parameters["onnxserve.preprocessing"] = mode
    return Prepared(
        name=safe_model_name(path.stem.replace(".", "_")),
        keras_model=model,
        samples=batches[0],
        agreement_data=batches[0],
        calibration=None,
        labels=_user_labels(model, labels, labels_output),
        max_batch_size=32,
        parameters=parameters,
        classifier=False,
        more_samples=batches[1:],
    )


def _input_preprocessing(model, preprocessing: str | None) -> str | None:
    """The preprocessing mode of an image input (None for other inputs); see
    prepare_user_model. ExportError when it is needed and unknown, or cannot apply."""
    from . import user_models

    spec = model.inputs[0]
    name = spec.name.split(":")[0]
    shape = [d if d is not None else -1 for d in spec.shape[1:]]
    choices = "; ".join(f"{mode}: {what}" for mode, what in
                        user_models.PREPROCESSING_CHOICES.items())
    if not user_models.is_image_input(model):
        if preprocessing is not None:
            raise ExportError(f"--preprocessing applies to image inputs ([H, W, 1 or 3]); input "
                              f"{name!r} has per-sample shape {shape}")
        return None
    detected = user_models.detect_preprocessing(model)
    integer = np.dtype(spec.dtype).kind in "uib"
    if detected is None and integer:  # pixels as they are: every other mode makes floats
        detected = "in_graph", f"the input takes {np.dtype(spec.dtype)} values"
    if preprocessing is None:
        if detected is None:
            hidden = (" (a SavedModel is one opaque graph: a Rescaling layer inside it cannot "
                      "be seen)" if getattr(model, "name", "") == user_models.SAVEDMODEL_NAME
                      else "")
            raise ExportError(
                f"input {name!r} {shape} is an image, and the model does not show which pixel "
                "scale it was trained on (no Rescaling or Normalization layer right after the "
                f"input){hidden}, so the server and clients cannot know what to feed it: say it "
                f"with --preprocessing MODE, one of {choices}"
            )
        mode, reason = detected
        print(f"input {name!r}: preprocessing {mode} ({reason})", flush=True)
    else:
        mode = preprocessing
        if mode not in user_models.PREPROCESSING_CHOICES:
            raise ExportError(f"--preprocessing {mode!r}: expected one of {choices}")
        if detected is not None and detected[0] != mode:
            print(f"warning: --preprocessing {mode} although {detected[1]} (which means "
                  f"{detected[0]}); using {mode} as asked", file=sys.stderr, flush=True)
    if integer and mode != "in_graph":
        raise ExportError(f"input {name!r} takes {np.dtype(spec.dtype)} values: only "
                          f"--preprocessing in_graph (pixels as they are) fits, not {mode}")
    if shape[2] == 1 and mode in ("caffe", "torch"):
        raise ExportError(f"--preprocessing {mode} subtracts a per-channel RGB mean, but input "
                          f"{name!r} has 1 channel")
    return mode


def _user_labels(model, labels: Path | None, labels_output: str | None) -> dict[str, list[str]]:
    """Class names by output for --labels / --labels-output (see prepare_user_model)."""
    if labels is None:
        if labels_output is not None:
            raise ExportError("--labels-output needs --labels FILE")
        return {}
    try:
        names = labels.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"--labels {labels}: cannot read it ({exc})") from None
    while names and not names[-1].strip():
        names.pop()
    if not names:
        raise ExportError(f"--labels {labels}: the file has no class names")
    shapes = {n.split(":")[0]: [d if d is not None else -1 for d in t.shape[1:]]
              for n, t in zip(model.output_names, model.outputs, strict=True)}
    listed = ", ".join(f"{n} {dims}" for n, dims in shapes.items())
    if labels_output is not None:
        if labels_output not in shapes:
            raise ExportError(f"--labels-output {labels_output}: the model has no such output; "
                              f"its outputs (per-sample dims) are {listed}")
        target = labels_output
    elif len(shapes) == 1:
        (target,) = shapes
    else:
        fitting = [n for n, dims in shapes.items() if dims and dims[-1] == len(names)]
        if len(fitting) != 1:
            raise ExportError(
                f"--labels {labels} has {len(names)} class names and the model has "
                f"{len(shapes)} outputs (per-sample dims: {listed}); "
                + ("none" if not fitting else f"{len(fitting)} of them") + f" with "
                f"{len(names)} classes: say which output the labels are for with "
                "--labels-output NAME"
            )
        (target,) = fitting
    dims = shapes[target]
    if not dims or dims[-1] != len(names):
        classes = "no class dimension" if not dims else (
            "a variable number of classes" if dims[-1] == -1 else f"{dims[-1]} classes")
        raise ExportError(f"--labels {labels} has {len(names)} class names, but output "
                          f"{target!r} (per-sample dims {dims}) has {classes}")
    return {target: names}


@contextlib.contextmanager
def _stage(what: str) -> Iterator[None]:
    """Any failure inside becomes an ExportError naming the stage ``what``."""
    try:
        yield
    except (ExportError, verify.ParityError):
        raise
    except convert.ConversionError as exc:
        raise ExportError(str(exc)) from exc
    except Exception as exc:
        raise ExportError(f"{what} failed ({convert.summary(exc)})") from exc


def _session(onnx_model, timing: bool = False):
    """An onnxruntime CPU session of the model; ``timing``: with the server's options
    (verify.timing_options), for latencies that are the server's."""
    import onnxruntime as ort

    options = verify.timing_options() if timing else None
    if onnx_model.ByteSize() <= convert.PROTOBUF_LIMIT:
        return ort.InferenceSession(onnx_model.SerializeToString(), sess_options=options,
                                    providers=["CPUExecutionProvider"])
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as tmp:  # over 2 GB: weights in a side file
        path = f"{tmp}/model.onnx"
        onnx.save_model(onnx_model, path, save_as_external_data=True,
                        location="model.onnx.data")
        return ort.InferenceSession(path, sess_options=options,
                                    providers=["CPUExecutionProvider"])


def _dims(value_info, batched: bool) -> list[int]:
    """Dims of a graph input/output as config.pbtxt lists them: without the batch
    dimension when the model batches, else the whole shape; symbolic dimensions are -1.
    ExportError when a batching model's tensor has no dynamic first dimension."""
    tensor = value_info.type.tensor_type
    if not tensor.HasField("shape"):
        raise ExportError(f"{value_info.name!r} has no shape in the ONNX graph")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    if not batched:
        return dims
    if not dims or dims[0] != -1:
        raise ExportError(
            f"{value_info.name!r} has shape {dims} in the ONNX graph: no batch dimension "
            "to batch over; export with --max-batch-size 0"
        )
    return dims[1:]


def _datatype(value_info) -> str:
    """The protocol datatype (FP32, INT64, BYTES, ...) of a graph input/output."""
    from onnx import TensorProto, helper

    from onnxserve.protos.datatypes import by_numpy

    elem_type = value_info.type.tensor_type.elem_type
    try:
        return by_numpy(helper.tensor_dtype_to_np_dtype(elem_type)).name
    except Exception:
        kind = (TensorProto.DataType.Name(elem_type)
                if elem_type in TensorProto.DataType.values() else str(elem_type))
        raise ExportError(f"{value_info.name!r} has ONNX type {kind}, which the KServe V2 "
                          "protocol has no datatype for; cast it in the model") from None


def export(
    prepared: Prepared,
    repository: Path,
    *,
    name: str | None = None,
    variant: str = "fp32",
    fp16_io: bool = False,
    opset: int = convert.DEFAULT_OPSET,
    version: int | None = None,
    max_batch_size: int | None = None,
    verbose: bool = False,
    force: bool = False,
) -> dict:
    """Convert, verify, make the variant, publish; return the verification report.

    ``max_batch_size``: None takes the prepared model's; 0 writes a non-batching config
    (dims are the whole ONNX shapes, no encoded-image input). Latencies are onnxruntime's
    with the server's session options (verify.timing_options), medians in milliseconds:
    fp32 at batch 1; with a variant, fp32 and the variant in turns at batch 1 and at
    LARGE_BATCH (when ``max_batch_size`` allows). An int8 variant that is not faster than
    fp32 at each of them is not published (ExportError saying both latencies) unless
    ``force``: then it is, with a warning on stderr and ``speed_warning`` in the report.
    Nothing is written to the repository unless every step succeeds: ExportError names the
    failing stage (and ParityError the outputs that differ); ``verbose`` shows the
    converter's log and what onnxruntime's quantizer prints. Prints a line as each step
    starts (with a "still ..." line every progress.HEARTBEAT_SECONDS while a conversion or
    variant runs), the parity result, the variant's agreement and speed, and where the
    model was published.
    """
    if max_batch_size is None:
        max_batch_size = prepared.max_batch_size
    if max_batch_size < 0:
        raise ExportError(f"max batch size {max_batch_size}: expected 0 (no batching) or more")
    model_name = name if name is not None else (
        prepared.name + ("" if variant == "fp32" else f"_{variant}"))
    try:  # before the minutes of converting: publish would refuse them at the end
        check_model_name(model_name)
        if version is not None:
            publish.check_version(version)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    started = time.perf_counter()
    with _stage("converting to ONNX"), progress.step(
            f"converting {prepared.name} to ONNX (tf2onnx, opset {opset})"):
        onnx_model = convert.to_onnx(prepared.keras_model, opset=opset, verbose=verbose)
    with _stage("loading the converted model in onnxruntime"):
        session = _session(onnx_model)
    with _stage("the parity check (running Keras and onnxruntime)"):
        if prepared.classifier:
            parity = verify.check(prepared.keras_model, session, prepared.samples)
        else:
            parity = verify.check_generic(prepared.keras_model, session,
                                          [prepared.samples, *prepared.more_samples])
    print(parity, flush=True)
    if prepared.classifier:  # the logits were for the check; serve the probabilities
        convert.keep_outputs(onnx_model, ["probabilities"])
    # Done with Keras: free its copy of the weights before making variants.
    prepared.keras_model = None
    gc.collect()
    report: dict = {
        "model": prepared.name,
        "variant": variant,
        "opset": opset,
        "parity": parity.as_dict(),
        "parity_summary": str(parity),
        "size_mb": {"fp32": round(onnx_model.ByteSize() / 1e6, 3)},
    }
    served = onnx_model
    if variant == "fp32":
        del session  # keep one onnxruntime copy of the weights at a time
        gc.collect()
        with _stage("measuring onnxruntime latency"):
            min_runs, max_runs, budget = TIMING_RUNS[1]
            latency = verify.median_latency_ms(
                {"fp32": _session(onnx_model, timing=True)},
                {"fp32": prepared.agreement_data[:1]},
                min_runs=min_runs, max_runs=max_runs, budget_s=budget)["fp32"]
        report["batch1_latency_ms"] = {"fp32": round(latency, 3)}
    else:
        with _stage(f"making and measuring the {variant} variant"), progress.step(
                f"making the {variant} variant ({_variant_method(prepared, variant)})"):
            reference = verify.run_onnx(session, prepared.agreement_data)
            del session  # keep one onnxruntime copy of the weights at a time
            gc.collect()
            served = _variant(prepared, report, onnx_model, reference, variant, fp16_io,
                              verbose)
        with _stage(f"measuring the {variant} variant's latency"):
            _measure_speed(prepared, report, onnx_model, served, variant, fp16_io,
                           max_batch_size)
        _speed_check(report, variant, force)
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    report["seconds"] = round(time.perf_counter() - started, 1)
    card = _card(prepared, served, model_name, max_batch_size, variant, str(parity))
    with _stage("writing to the model repository"):
        path = publish.publish(repository, card, served, version, report)
    report["path"] = str(path)
    size = report["size_mb"].get(variant, report["size_mb"]["fp32"])
    print(f"published {card.name} to {path} ({size:.1f} MB)", flush=True)
    return report


def _variant_method(prepared: Prepared, variant: str) -> str:
    """How the variant is made, in a few words, for the progress line."""
    if variant == "fp16":
        return "float16 weights and compute: a GPU format, no faster than fp32 on the CPU"
    if prepared.calibration is not None:
        return f"static quantization, calibrated on {len(prepared.calibration)} samples"
    return "dynamic quantization"


def agreement_caveat(prepared: Prepared, reference_top1: np.ndarray) -> str | None:
    """Why a variant's top-1 agreement with fp32 proves nothing here, or None.

    Random weights (--weights none) give scores without information; and when fp32 gives
    every sample the same class (``reference_top1``: fp32's top-1 class per sample), a
    variant agrees by predicting that class, whatever it does to the scores.
    """
    if prepared.random_weights:
        return RANDOM_WEIGHTS_AGREEMENT
    if len(reference_top1) > 1 and len(np.unique(reference_top1)) == 1:
        return (f"fp32 gives all {len(reference_top1)} samples the same top-1 class, so "
                "this agreement proves little about the variant's accuracy")
    return None


def _variant(prepared: Prepared, report: dict, onnx_model, reference: dict[str, np.ndarray],
             variant: str, fp16_io: bool, verbose: bool = False):
    """The fp16/int8 model, compared with fp32's outputs ``reference`` on the agreement
    data (added to report).

    Classifiers and labelled outputs: top-1 agreement, with a caveat (printed, and as
    ``top1_agreement_caveat`` in the report) where it proves nothing (agreement_caveat);
    every output of a user model: its largest difference from fp32 (reported, not a
    pass/fail check: reduced precision differs by design). ExportError if int8 loses too
    much of a recipe's top-1 answers. ``verbose``: show what the quantizer prints.
    """
    from . import library_logs

    data = _variant_input(prepared.agreement_data, variant, fp16_io)
    with library_logs.library_prints_hidden(verbose):
        if variant == "fp16":
            served = variants.to_fp16(onnx_model, keep_io_types=not fp16_io)
        else:
            int8 = variants.to_int8(onnx_model, prepared.calibration,
                                    calibration_source=prepared.calibration_source)
            served = int8.model
            report["int8"] = int8.describe()
    variant_session = _session(served)
    other = verify.run_onnx(variant_session, data)
    report["agreement_samples"] = len(data)
    report["size_mb"][variant] = round(served.ByteSize() / 1e6, 3)
    classes = ["probabilities"] if prepared.classifier else list(prepared.labels)
    agreement = None
    if classes:
        scores = classes[0]
        width = reference[scores].shape[-1]
        agreement = verify.top1_agreement(reference[scores].reshape(-1, width),
                                          other[scores].reshape(-1, width))
        report["top1_agreement_vs_fp32"] = round(agreement, 4)
        caveat = agreement_caveat(prepared, reference[scores].reshape(-1, width).argmax(-1))
        if caveat is not None:
            report["top1_agreement_caveat"] = caveat
        print(f"{variant}: top-1 agreement of {scores} with fp32 {agreement:.2%} on "
              f"{len(data)} samples" + (f" ({caveat})" if caveat else ""), flush=True)
    if not prepared.classifier:
        differences = [verify.variant_difference(n, reference[n], other[n]) for n in reference]
        report["outputs_vs_fp32"] = [d.as_dict() for d in differences]
        print(f"{variant} against fp32 on {len(data)} samples (reported, not checked): "
              + "; ".join(str(d) for d in differences), flush=True)
    if prepared.heldout is not None:
        x, y = prepared.heldout
        probs = verify.run_onnx(variant_session, _variant_input(x, variant, fp16_io))[
            "probabilities"]
        report["heldout_accuracy"] = round(float(np.mean(probs.argmax(axis=1) == y)), 4)
    if (variant == "int8" and prepared.heldout is not None and agreement is not None
            and agreement < INT8_MIN_AGREEMENT):
        raise ExportError(
            f"int8 keeps only {agreement:.2%} of fp32's top-1 answers on held-out data "
            f"(at least {INT8_MIN_AGREEMENT:.0%} required)"
        )
    return served


def _variant_input(x: np.ndarray, variant: str, fp16_io: bool) -> np.ndarray:
    """``x`` as the variant takes it: float16 for an fp16 variant with float16 inputs."""
    if variant == "fp16" and fp16_io and x.dtype == np.float32:
        return x.astype(np.float16)
    return x


def _measure_speed(prepared: Prepared, report: dict, onnx_model, served, variant: str,
                   fp16_io: bool, max_batch_size: int) -> None:
    """fp32's and the variant's latencies (medians, ms, measured in turns: see export) at
    batch 1 and LARGE_BATCH into ``report``: ``batch1_latency_ms`` / ``batch32_latency_ms``
    ({"fp32": ms, variant: ms}), ``speedup_vs_fp32`` ({"batch1": fp32 / variant, ...}),
    ``timing`` (CPU, threads), and for int8 ``int8.batch1_ops`` (verify.op_profile); prints
    a line with them (for fp16: that it is a GPU format)."""
    import os
    import tempfile

    import onnx

    data = prepared.agreement_data
    batches = [1] + ([LARGE_BATCH] if max_batch_size >= LARGE_BATCH else [])
    sessions = {"fp32": _session(onnx_model, timing=True), variant: _session(served, timing=True)}
    speedup: dict[str, float] = {}
    for batch in batches:
        x = np.resize(data, (batch, *data.shape[1:])).astype(data.dtype)
        min_runs, max_runs, budget = TIMING_RUNS[batch]
        ms = verify.median_latency_ms(
            sessions, {"fp32": x, variant: _variant_input(x, variant, fp16_io)},
            min_runs=min_runs, max_runs=max_runs, budget_s=budget)
        report[f"batch{batch}_latency_ms"] = {k: round(v, 3) for k, v in ms.items()}
        speedup[f"batch{batch}"] = round(ms["fp32"] / ms[variant], 2)
    del sessions
    report["speedup_vs_fp32"] = speedup
    machine = this_cpu()
    report["timing"] = {"cpu": str(machine), "intra_op_threads": os.cpu_count() or 1,
                        "statistic": "median, fp32 and the variant in turns"}
    figures = ", ".join(
        f"batch {b} {report[f'batch{b}_latency_ms'][variant]:.2f} ms vs fp32 "
        f"{report[f'batch{b}_latency_ms']['fp32']:.2f} ms ({speedup[f'batch{b}']:.2f}x)"
        for b in batches)
    print(f"{variant} speed on {machine}: {figures}"
          + ("; fp16 is a GPU format: on the CPU it is no faster than fp32"
             if variant == "fp16" else ""), flush=True)
    if variant == "int8":
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "int8.onnx")
            large = served.ByteSize() > convert.PROTOBUF_LIMIT
            onnx.save_model(served, path, save_as_external_data=large,
                            location="int8.onnx.data" if large else None)
            profile = verify.op_profile(path, data[:1])
        report["int8"]["batch1_ops"] = [t.as_dict() for t in profile]
        print(f"int8 at batch 1 after onnxruntime's fusion: {verify.op_summary(profile)}",
              flush=True)


def _speed_check(report: dict, variant: str, force: bool) -> None:
    """ExportError when a SPEED_CHECKED_VARIANTS variant is not faster than fp32 at every
    batch size measured (``report``'s batch<N>_latency_ms), unless ``force``: then a
    warning on stderr and ``speed_warning`` in the report."""
    if variant not in SPEED_CHECKED_VARIANTS:
        return
    measured = sorted((int(key[5:-11]), value) for key, value in report.items()
                      if key.startswith("batch") and key.endswith("_latency_ms"))
    slower = [(batch, ms) for batch, ms in measured if ms[variant] >= ms["fp32"]]
    if not slower:
        return
    figures = "; ".join(f"batch {batch}: {ms[variant]:.2f} ms against fp32's {ms['fp32']:.2f} ms"
                        for batch, ms in slower)
    cpu = report.get("timing", {}).get("cpu", "this CPU")
    message = f"{variant} is not faster than fp32 on this machine ({cpu}): {figures}"
    if not force:
        raise ExportError(f"{message}. Nothing published: serve the fp32 model, or publish "
                          f"{variant} anyway with --force")
    report["speed_warning"] = message
    print(f"warning: {message}; published anyway (--force)", file=sys.stderr, flush=True)


def _card(prepared: Prepared, served, name: str, max_batch_size: int, variant: str,
          parity: str) -> publish.ModelCard:
    """The repository entry for the served model: every graph output with its datatype,
    dims and (where given) labels, checked against the output's class dimension."""
    batched = max_batch_size > 0
    graph_input = served.graph.input[0]
    output_names = [o.name for o in served.graph.output]
    unknown = sorted(set(prepared.labels) - set(output_names))
    if unknown:
        raise ExportError(f"labels for {', '.join(unknown)}, which the model does not output "
                          f"(its outputs: {', '.join(output_names)})")
    outputs = []
    for graph_output in served.graph.output:
        dims = _dims(graph_output, batched)
        labels = prepared.labels.get(graph_output.name)
        if labels is not None and (not dims or dims[-1] != len(labels)):
            raise ExportError(
                f"output {graph_output.name!r}: {len(labels)} class names, but the output has "
                + (f"{dims[-1]} classes" if dims and dims[-1] > 0 else f"dims {dims}")
            )
        outputs.append(publish.OutputSpec(graph_output.name, _datatype(graph_output), dims,
                                          labels))
    parameters = dict(prepared.parameters)
    parameters["onnxserve.variant"] = variant
    parameters["onnxserve.parity"] = parity
    return publish.ModelCard(
        name=name,
        input_name=graph_input.name,
        input_datatype=_datatype(graph_input),
        input_dims=_dims(graph_input, batched),
        outputs=outputs,
        max_batch_size=max_batch_size,
        parameters=parameters,
    )
