"""`onnxserve export` and `onnxserve samples`: argument parsing and the export pipeline.

Importing this module is cheap: TensorFlow is imported only when an export runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from .applications import APPLICATIONS
from .datasets import DATASETS

log = logging.getLogger(__name__)

RECIPES = ("lenet5",)
MODELS = (*RECIPES, *APPLICATIONS)
RANDOM_WEIGHTS = "none (random weights: predictions are meaningless)"


def add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    from onnxserve.serving.cli import add_repository_argument

    p = subparsers.add_parser(
        "export", help="train or load a Keras model, convert it to ONNX, verify, publish"
    )
    p.add_argument("model", choices=MODELS, help="what to export")
    add_repository_argument(p)
    p.add_argument("--name", help="model name in the repository (default: the model's own)")
    p.add_argument("--version", type=int, help="version number (default: newest + 1)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default %(default)s)")
    p.add_argument("--max-batch-size", type=int, help="max_batch_size written to config.pbtxt")
    recipe = p.add_argument_group("training recipes (lenet5)")
    recipe.add_argument("--dataset", choices=tuple(DATASETS), default="digits",
                        help="digits: scikit-learn's bundled digits, offline; mnist: "
                             "keras.datasets (default %(default)s)")
    recipe.add_argument("--data-dir", type=Path,
                        help="folder with a local copy of the data set in Keras' format "
                             "(mnist.npz)")
    recipe.add_argument("--epochs", type=int,
                        help="train at most this many epochs (default: the seed's 30)")
    recipe.add_argument("--tensorboard", type=Path, help="write TensorBoard logs here")
    recipe.add_argument("--seed", type=int, default=0,
                        help="random seed for weights and shuffling (default %(default)s)")
    recipe.add_argument("--keep-last-weights", action="store_true",
                        help="when early stopping ends training, keep the last epoch's weights "
                             "as the seed does (default: the best validation epoch's)")
    app = p.add_argument_group("ImageNet applications (mobilenet_v2)")
    app.add_argument("--weights", default="imagenet",
                     help="imagenet (Keras' download), none (random), or a weights file "
                          "(default %(default)s)")
    p.set_defaults(func=run_export)


def add_samples_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "samples", help="write sample images: held-out digits and two bundled photos"
    )
    p.add_argument("--out", type=Path, default=Path("samples"), help="(default %(default)s)")
    p.set_defaults(func=run_samples)


def run_samples(args: argparse.Namespace) -> int:
    from .samples import write_samples

    for path in write_samples(args.out):
        print(path)
    return 0


def _export_lenet5(args: argparse.Namespace):
    from . import datasets, recipes

    split = datasets.load(args.dataset, args.data_dir)
    print(f"training lenet5 on {split.source}: {len(split.x_train)} training, "
          f"{len(split.x_test)} held-out images", flush=True)
    recipes.make_deterministic(args.seed)
    model = recipes.build_lenet5(len(split.class_names))
    settings = recipes.LENET5_TRAINING
    if args.keep_last_weights:
        settings = dataclasses.replace(settings, restore_best_weights=False)
    result = recipes.train(
        model, split, settings, epochs=args.epochs,
        tensorboard_dir=args.tensorboard,
    )
    print(f"held-out accuracy {result.heldout_accuracy:.4f} after {result.epochs_run} epochs",
          flush=True)
    parameters = {
        "onnxserve.preprocessing": "unit",
        "onnxserve.weights": "trained",
        "onnxserve.dataset": split.source,
        "onnxserve.heldout_accuracy": f"{result.heldout_accuracy:.4f}",
        "onnxserve.epochs": str(result.epochs_run),
    }
    return model, split.x_test[:512], split.class_names, "FP32", parameters, 64


def _export_application(args: argparse.Namespace):
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from . import applications

    app = APPLICATIONS[args.model]
    model = applications.build(app, args.weights)
    photos = [
        np.asarray(Image.open(f).convert("RGB").resize((app.size, app.size)))
        for f in load_sample_images().filenames
    ]
    noise = np.random.default_rng(0).integers(0, 256, (6, app.size, app.size, 3), dtype=np.uint8)
    samples = np.concatenate([np.stack(photos), noise]).astype(np.uint8)
    weights = {"imagenet": "imagenet", "none": RANDOM_WEIGHTS}.get(
        args.weights, Path(args.weights).name
    )
    parameters = {
        "onnxserve.preprocessing": "in_graph",
        "onnxserve.keras_preprocess_input": app.preprocessing,
        "onnxserve.weights": weights,
    }
    return model, samples, applications.imagenet_labels(), "UINT8", parameters, 32


def run_export(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    from . import convert, publish, verify
    from .applications import WeightsUnavailableError
    from .datasets import DatasetUnavailableError

    name = args.name or args.model
    try:
        if args.model in RECIPES:
            model, samples, labels, datatype, parameters, max_batch = _export_lenet5(args)
        else:
            model, samples, labels, datatype, parameters, max_batch = _export_application(args)
    except (DatasetUnavailableError, WeightsUnavailableError) as exc:
        print(f"onnxserve export {args.model}: {exc}", file=sys.stderr)
        return 1
    onnx_model = convert.to_onnx(model, opset=args.opset)
    onnx_bytes = onnx_model.SerializeToString()
    try:
        report = verify.check(model, onnx_bytes, samples)
    except verify.ParityError as exc:
        print(f"onnxserve export {args.model}: {exc}", file=sys.stderr)
        return 1
    print(report, flush=True)
    parameters["onnxserve.parity"] = str(report)
    input_name = onnx_model.graph.input[0].name
    card = publish.ModelCard(
        name=name,
        input_name=input_name,
        input_datatype=datatype,
        input_dims=list(samples.shape[1:]),
        output_name=onnx_model.graph.output[0].name,
        output_dims=[len(labels)],
        labels=labels,
        max_batch_size=args.max_batch_size or max_batch,
        parameters=parameters,
    )
    path = publish.publish(args.model_repository, card, onnx_bytes, args.version)
    print(f"published {name} to {path} ({len(onnx_bytes) / 1e6:.1f} MB)")
    return 0
