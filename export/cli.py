"""`onnxserve export` and `onnxserve samples`: argument parsing.

Importing this module is cheap: TensorFlow is imported only when an export runs.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from onnxserve.protos.naming import MAX_VERSION, check_model_name, parse_version

from .applications import APPLICATIONS
from .datasets import DATASETS
from .recipes import RECIPES as _RECIPES  # imports Keras only when a recipe is built
from .user_models import PREPROCESSING_CHOICES

RECIPES = tuple(_RECIPES)
#: what the export extra installs (pyproject.toml), by import name
EXPORT_PACKAGES = ("tensorflow", "keras", "tf2onnx", "onnx", "onnxconverter_common", "sklearn")
MODELS = (*RECIPES, *APPLICATIONS)
DEFAULT_SEED = 0
DEFAULT_WEIGHTS = "imagenet"

#: What each kind of model is called in messages.
_KINDS = {
    "recipe": "the training recipes",
    "application": "the ImageNet applications",
    "from": "--from PATH",
}
#: Options that apply to some kinds of model only: (flag, attribute, kinds it applies to).
_ONLY_FOR = (
    ("--dataset", "dataset", ("recipe",)),
    ("--data-dir", "data_dir", ("recipe",)),
    ("--epochs", "epochs", ("recipe",)),
    ("--seed", "seed", ("recipe",)),
    ("--keep-last-weights", "keep_last_weights", ("recipe",)),
    ("--tensorboard", "tensorboard", ("recipe",)),
    ("--weights", "weights", ("application",)),
    ("--raw-float-input", "raw_float_input", ("application",)),
    ("--labels", "labels", ("from",)),
    ("--labels-output", "labels_output", ("from",)),
    ("--preprocessing", "preprocessing", ("from",)),
)


def add_export_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="train or load a Keras model, convert it to ONNX, verify, publish",
        description="Export a seed model (see --list) or your own (--from PATH) to a model "
                    "repository, with a parity check against Keras.",
    )
    p.add_argument("model", nargs="?", help="model id (see --list)")
    p.add_argument("--list", action="store_true", help="list the model ids and exit")
    p.add_argument("--from", dest="from_path", type=Path,
                   help="export your own model: a .keras or .h5 file, or a SavedModel folder "
                        "(loaded in Keras safe mode: no code from the file runs)")
    p.add_argument("--labels", type=Path,
                   help="class names, one per line (with --from): for the single output, or "
                        "the only one whose last dimension is the number of lines")
    p.add_argument("--labels-output", metavar="NAME",
                   help="the output --labels names the classes of (a model with several)")
    p.add_argument("--preprocessing", choices=tuple(PREPROCESSING_CHOICES),
                   help="with --from, for an image input: what the model takes. "
                        + "; ".join(f"{k}: {v}" for k, v in PREPROCESSING_CHOICES.items())
                        + ". Needed unless the model starts with a Rescaling or Normalization "
                          "layer (then in_graph)")
    p.add_argument("--name", type=_model_name,
                   help="model name in the repository: letters, digits, '_', '.' or '-', "
                        "not starting with '.' or '-' (default: the id, with _fp16 or _int8 "
                        "for those variants)")
    p.add_argument("--version", type=_version,
                   help="version number, 1 or more (default: newest + 1)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default %(default)s)")
    p.add_argument("--max-batch-size", type=_batch_size,
                   help="max_batch_size written to config.pbtxt; 0: the model does not batch "
                        "(dims are whole shapes, no encoded-image input)")
    p.add_argument("--verbose", action="store_true",
                   help="show the libraries' logs (TensorFlow, tf2onnx, onnxruntime and its "
                        "quantizer, Python warnings) and the traceback of a failure")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true",
                           help="weights and compute in float16 (inputs/outputs stay float32): "
                                "a GPU format, half the size but no faster than fp32 on the CPU")
    precision.add_argument("--int8", action="store_true",
                           help="int8 quantization for the CPU: static (QDQ, uint8 activations, "
                                "int8 per-channel weights), calibrated on training samples for "
                                "the recipes and on crops of real photos for the applications; "
                                "dynamic for --from models. Published only if faster than fp32 "
                                "at batch 1 and 32 on this machine (see --force)")
    p.add_argument("--fp16-io", action="store_true",
                   help="with --fp16 only: float16 inputs/outputs")
    p.add_argument("--force", action="store_true",
                   help="with --int8 only: publish the variant even where it is not faster "
                        "than fp32 on this machine (a warning says both latencies)")
    recipe = p.add_argument_group("training recipes")
    recipe.add_argument("--dataset", choices=DATASETS,
                        help="default: the seed's (mnist, fashion_mnist or cifar10); digits: "
                             "scikit-learn's bundled digits, offline, for the 28x28 recipes")
    recipe.add_argument("--data-dir", type=Path,
                        help="folder with <dataset>.npz (x_train, y_train, x_test, y_test, the "
                             "layout of Keras' mnist.npz) instead of downloading")
    recipe.add_argument("--epochs", type=int, help="train at most this many epochs "
                                                   "(default: the seed's)")
    recipe.add_argument("--seed", type=int,
                        help=f"random seed for weights and shuffling (default {DEFAULT_SEED})")
    recipe.add_argument("--keep-last-weights", action="store_true",
                        help="when early stopping ends training, keep the last epoch's weights "
                             "as the seed does (default: the best validation epoch's)")
    recipe.add_argument("--tensorboard", type=Path, help="write TensorBoard logs here")
    app = p.add_argument_group("ImageNet applications")
    app.add_argument("--weights",
                     help="imagenet (Keras' download), none (random), or a weights file "
                          f"(default {DEFAULT_WEIGHTS})")
    app.add_argument("--raw-float-input", action="store_true",
                     help="take FP32 input already preprocessed, instead of UINT8 pixels with "
                          "the preprocessing in the graph")
    p.set_defaults(func=run_export)
    return p  # the caller adds --model-repository (a setting of the server's)


def _model_name(text: str) -> str:
    """--name: a name the server serves (onnxserve.protos.naming), refused before anything
    is exported or written."""
    try:
        return check_model_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _version(text: str) -> int:
    """--version: a version folder the server serves (ASCII digits, 1 or more)."""
    version = parse_version(text)
    if version is None:
        raise argparse.ArgumentTypeError(
            f"{text[:40]!r} is not a version number: expected a whole number from 1 to "
            f"{MAX_VERSION} in ASCII digits")
    return version


def _batch_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: expected 0 (no batching) or more")
    return value


def add_samples_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "samples", help="write sample images: held-out digits and two bundled photos"
    )
    p.add_argument("--out", type=Path, default=Path("samples"),
                   help="folder to write the images to (default %(default)s)")
    p.set_defaults(func=run_samples)


def run_samples(args: argparse.Namespace) -> int:
    from .samples import write_samples

    for path in write_samples(args.out):
        print(path)
    return 0


def list_models() -> str:
    """One line per model id: what it is and what it takes."""
    lines = []
    for name in RECIPES:
        lines.append(f"{name:<18} recipe       trains on the seed's data (--dataset)")
    for app in APPLICATIONS.values():
        lines.append(f"{app.name:<18} application  keras.applications.{app.constructor}, "
                     f"{app.size}x{app.size}x3, preprocess_input '{app.preprocessing}'")
    return "\n".join(lines)


def _kind(args: argparse.Namespace) -> str:
    if args.from_path is not None:
        return "from"
    return "recipe" if args.model in RECIPES else "application"


def inapplicable_options(args: argparse.Namespace) -> list[str]:
    """One message per group of given options that the chosen model does not take, e.g.
    ``--epochs, --seed apply to the training recipes, not to mobilenet_v2 (an ImageNet
    application)``; empty when every option given applies. ``args``: parsed export
    arguments naming one model id or --from PATH."""
    kind = _kind(args)
    what = {"recipe": f"{args.model} (a training recipe)",
            "application": f"{args.model} (an ImageNet application)",
            "from": "--from PATH (your own model)"}[kind]
    by_target: dict[tuple[str, ...], list[str]] = {}
    for flag, attribute, kinds in _ONLY_FOR:
        value = getattr(args, attribute)
        if kind not in kinds and value is not None and value is not False:
            by_target.setdefault(kinds, []).append(flag)
    messages = [
        f"{', '.join(flags)} appl{'y' if len(flags) > 1 else 'ies'} to "
        f"{' and '.join(_KINDS[k] for k in kinds)}, not to {what}"
        for kinds, flags in by_target.items()
    ]
    if args.fp16_io and not args.fp16:
        messages.append("--fp16-io applies with --fp16 only (float16 inputs/outputs of the "
                        "fp16 variant)")
    if args.force and not args.int8:
        messages.append("--force applies with --int8 only (publish an int8 variant that is not "
                        "faster than fp32)")
    return messages


def run_export(args: argparse.Namespace) -> int:
    if args.list:
        if args.model is not None or args.from_path is not None:
            print("onnxserve export: --list lists the model ids and exports nothing; give it "
                  "without a model id or --from", file=sys.stderr)
            return 2
        print(list_models())
        return 0
    if (args.model is None) == (args.from_path is None):
        print("onnxserve export: name one model id (see --list) or --from PATH", file=sys.stderr)
        return 2
    if args.model is not None and args.model not in MODELS:
        print(f"onnxserve export: unknown model {args.model!r}; the ids are "
              f"{', '.join(MODELS)}", file=sys.stderr)
        return 2
    refused = inapplicable_options(args)
    if refused:
        for message in refused:
            print(f"onnxserve export: {message}", file=sys.stderr)
        return 2
    from . import library_logs

    library_logs.configure(args.verbose)  # before TensorFlow loads
    from . import pipeline, verify

    what = args.model or str(args.from_path)
    try:
        library_logs.import_tensorflow(args.verbose)
        if args.from_path is not None:
            prepared = pipeline.prepare_user_model(
                args.from_path, labels=args.labels, labels_output=args.labels_output,
                preprocessing=args.preprocessing,
            )
        elif args.model in RECIPES:
            prepared = pipeline.prepare_recipe(
                args.model, dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs,
                seed=DEFAULT_SEED if args.seed is None else args.seed,
                keep_last_weights=args.keep_last_weights, tensorboard=args.tensorboard,
            )
        else:
            prepared = pipeline.prepare_application(
                args.model, weights=args.weights or DEFAULT_WEIGHTS,
                raw_float_input=args.raw_float_input,
            )
        variant = "fp16" if args.fp16 else "int8" if args.int8 else "fp32"
        pipeline.export(
            prepared, args.model_repository, name=args.name, variant=variant,
            fp16_io=args.fp16_io, opset=args.opset, version=args.version,
            max_batch_size=args.max_batch_size, verbose=args.verbose, force=args.force,
        )
    except (pipeline.ExportError, verify.ParityError) as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"onnxserve export {what}: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in EXPORT_PACKAGES:
            raise
        print(f"onnxserve export: {exc.name} is not installed; exporting needs the export "
              "extra: pip install -e '.[export]' (or `make demo`)", file=sys.stderr)
        return 2
    return 0
