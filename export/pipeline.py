"""The export pipeline: a Keras model in, a verified ONNX model in the repository out.

prepare_* build (train or load) the Keras model and gather the data the checks need;
``export`` converts, verifies parity, makes the fp16/int8 variant, measures it, and
publishes the model with its verification report.
"""

from __future__ import annotations

import gc
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import convert, publish, variants, verify

log = logging.getLogger(__name__)

RANDOM_WEIGHTS = "none (random weights: predictions are meaningless)"
#: int8 must keep this share of fp32's top-1 answers on a recipe's held-out data.
INT8_MIN_AGREEMENT = 0.99


class ExportError(RuntimeError):
    """The export cannot go on; the message says why and what to do."""


@dataclass
class Prepared:
    """A Keras model ready to convert, and the data to check it with."""

    name: str
    keras_model: object
    #: parity inputs (Keras vs onnxruntime)
    samples: np.ndarray
    #: real images or held-out data: fp16/int8 top-1 agreement against fp32
    agreement_data: np.ndarray
    #: int8 static calibration samples (training data); None: dynamic quantization
    calibration: np.ndarray | None
    labels: list[str] | None
    input_datatype: str
    max_batch_size: int
    parameters: dict[str, str] = field(default_factory=dict)
    #: True when outputs are "logits" and "probabilities" (the parity check for classifiers)
    classifier: bool = True
    #: held-out data and labels, for the accuracy of reduced-precision variants
    heldout: tuple[np.ndarray, np.ndarray] | None = None


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
        labels=split.class_names,
        input_datatype="UINT8" if standardized else "FP32",
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


def prepare_application(app_name: str, *, weights: str, raw_float_input: bool) -> Prepared:
    from . import applications

    app = applications.APPLICATIONS[app_name]
    try:
        model = applications.build(app, weights, raw_float_input=raw_float_input)
    except applications.WeightsUnavailableError as exc:
        raise ExportError(str(exc)) from None
    photos = photo_crops(app.size)
    noise = np.random.default_rng(0).integers(0, 256, (4, app.size, app.size, 3), np.uint8)
    samples = np.concatenate([photos[:4], noise])
    if raw_float_input:
        samples = preprocess_like_keras(app, samples)
        photos = preprocess_like_keras(app, photos)
    label = {"imagenet": "imagenet", "none": RANDOM_WEIGHTS}.get(weights, Path(weights).name)
    mode = app.preprocessing
    return Prepared(
        name=app_name,
        keras_model=model,
        samples=samples,
        agreement_data=photos,
        calibration=None,
        labels=applications.imagenet_labels(),
        input_datatype="FP32" if raw_float_input else "UINT8",
        max_batch_size=32,
        parameters={
            "onnxserve.preprocessing": (mode if raw_float_input and mode != "none"
                                        else "in_graph"),
            "onnxserve.keras_preprocess_input": mode,
            "onnxserve.weights": label,
        },
    )


def preprocess_like_keras(app, pixels: np.ndarray) -> np.ndarray:
    """keras.applications' own preprocess_input for the application, on float32 pixels."""
    import importlib

    module = importlib.import_module(f"keras.applications.{app.module}")
    return np.asarray(module.preprocess_input(pixels.astype(np.float32).copy()), np.float32)


def prepare_user_model(path: Path, *, labels: Path | None) -> Prepared:
    """A user's .keras / .h5 file or SavedModel folder, loaded without running its code."""
    from . import user_models

    try:
        model = user_models.load(path)
    except user_models.UserModelError as exc:
        raise ExportError(str(exc)) from None
    samples = user_models.sample_inputs(model, 16)
    names = labels.read_text().splitlines() if labels else None
    dtype = np.dtype(model.inputs[0].dtype)
    return Prepared(
        name=path.stem.replace(".", "_") or "model",
        keras_model=model,
        samples=samples,
        agreement_data=samples,
        calibration=None,
        labels=names,
        input_datatype="UINT8" if dtype == np.uint8 else "FP32",
        max_batch_size=32,
        parameters={"onnxserve.preprocessing": "in_graph", "onnxserve.source": path.name},
        classifier=False,
    )


def _session(onnx_model):
    import onnxruntime as ort

    if onnx_model.ByteSize() <= convert.PROTOBUF_LIMIT:
        return ort.InferenceSession(onnx_model.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as tmp:  # over 2 GB: weights in a side file
        path = f"{tmp}/model.onnx"
        onnx.save_model(onnx_model, path, save_as_external_data=True,
                        location="model.onnx.data")
        return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def _dims(value_info) -> list[int]:
    """Per-sample dims of a graph input/output; symbolic dimensions become -1."""
    return [d.dim_value if d.HasField("dim_value") else -1
            for d in value_info.type.tensor_type.shape.dim[1:]]


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
) -> dict:
    """Convert, verify, make the variant, publish; return the verification report."""
    started = time.perf_counter()
    onnx_model = convert.to_onnx(prepared.keras_model, opset=opset)
    session = _session(onnx_model)
    if prepared.classifier:
        parity = verify.check(prepared.keras_model, session, prepared.samples)
    else:
        parity = verify.check_generic(prepared.keras_model, session, prepared.samples)
    print(parity, flush=True)
    output = "probabilities" if prepared.classifier else session.get_outputs()[0].name
    latency = verify.batch1_latency_ms(session, prepared.agreement_data[0])
    if prepared.classifier:  # the logits were for the check; serve the probabilities
        convert.keep_outputs(onnx_model, [output])
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
        "batch1_latency_ms": {"fp32": round(latency, 3)},
    }
    served = onnx_model
    if variant != "fp32":
        data = prepared.agreement_data
        if variant == "fp16" and fp16_io and data.dtype == np.float32:
            data = data.astype(np.float16)
        reference = verify.run_onnx(session, prepared.agreement_data)[output]
        del session  # keep one onnxruntime copy of the weights at a time
        gc.collect()
        served = (variants.to_fp16(onnx_model, keep_io_types=not fp16_io) if variant == "fp16"
                  else variants.to_int8(onnx_model, prepared.calibration))
        variant_session = _session(served)
        agreement = verify.top1_agreement(reference, verify.run_onnx(variant_session,
                                                                     data)[output])
        report["top1_agreement_vs_fp32"] = round(agreement, 4)
        report["agreement_samples"] = len(data)
        report["size_mb"][variant] = round(served.ByteSize() / 1e6, 3)
        report["batch1_latency_ms"][variant] = round(
            verify.batch1_latency_ms(variant_session, data[0]), 3)
        if prepared.heldout is not None:
            x, y = prepared.heldout
            if variant == "fp16" and fp16_io and x.dtype == np.float32:
                x = x.astype(np.float16)
            probs = verify.run_onnx(variant_session, x)[output]
            report["heldout_accuracy"] = round(float(np.mean(probs.argmax(axis=1) == y)), 4)
        print(f"{variant}: top-1 agreement with fp32 {agreement:.2%} on {len(data)} samples",
              flush=True)
        if variant == "int8" and prepared.heldout is not None and agreement < INT8_MIN_AGREEMENT:
            raise ExportError(
                f"int8 keeps only {agreement:.2%} of fp32's top-1 answers on held-out data "
                f"(at least {INT8_MIN_AGREEMENT:.0%} required)"
            )
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    report["seconds"] = round(time.perf_counter() - started, 1)
    graph_input = served.graph.input[0]
    dims = _dims(graph_input)
    out_dims = _dims(served.graph.output[0])
    in_type = {1: "FP32", 10: "FP16", 2: "UINT8"}.get(graph_input.type.tensor_type.elem_type,
                                                     prepared.input_datatype)
    out_type = {1: "FP32", 10: "FP16"}.get(served.graph.output[0].type.tensor_type.elem_type,
                                           "FP32")
    parameters = dict(prepared.parameters)
    parameters["onnxserve.variant"] = variant
    parameters["onnxserve.parity"] = str(parity)
    card = publish.ModelCard(
        name=name or prepared.name + ("" if variant == "fp32" else f"_{variant}"),
        input_name=graph_input.name,
        input_datatype=in_type,
        input_dims=dims,
        output_name=served.graph.output[0].name,
        output_dims=out_dims,
        labels=prepared.labels,
        max_batch_size=max_batch_size or prepared.max_batch_size,
        parameters=parameters,
        output_datatype=out_type,
    )
    path = publish.publish(repository, card, served, version, report)
    report["path"] = str(path)
    size = report["size_mb"].get(variant, report["size_mb"]["fp32"])
    print(f"published {card.name} to {path} ({size:.1f} MB)", flush=True)
    return report
