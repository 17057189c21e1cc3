"""Classify image files with a model served by onnxserve.

    python clients/classify.py IMG [IMG...] [--url localhost:8001] [--model NAME] [--top-k 5]

Prints, per image, ``label  score`` lines, best first. When the model takes encoded images
(its metadata has ``encoded_image_input``), the files are sent as they are and the server
decodes them; otherwise (or with ``--client-preprocessing``) they are decoded, resized and
scaled here, as the model's metadata says. The server's classification extension names the
classes.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

try:
    import grpc
    import numpy as np

    from onnxserve.clients.client import DEFAULT_URL, Client, InferenceServerError, ModelMetadata
    from onnxserve.clients.preprocess import ImageInputError, ImageSpec, image_spec, load_image
except ModuleNotFoundError as exc:  # run as a script without the package installed
    sys.exit(f"classify.py: {exc.name} is not installed; run `make demo` or `pip install -e .`")

DEFAULT_MODEL = "mobilenet_v2"
#: how the server names an image it cannot decode
_IMAGE_INDEX = re.compile(r"image (\d+): (.*)")


@dataclass
class Prediction:
    label: str
    score: float


def image_inputs(paths: Sequence[str], spec: ImageSpec, encoded: bool) -> dict[str, np.ndarray]:
    """The request inputs for ``paths``: the files as they are, or preprocessed samples."""
    if encoded and spec.encoded_input:
        files = np.empty((len(paths), 1), dtype=object)
        for i, path in enumerate(paths):
            files[i, 0] = Path(path).read_bytes()
        return {spec.encoded_input: files}
    return {spec.input_name: np.stack([load_image(p, spec) for p in paths])}


def classify(
    client: Client,
    metadata: ModelMetadata,
    images: Sequence[np.ndarray] | dict[str, np.ndarray],
    top_k: int,
) -> list[list[Prediction]]:
    """Top-k predictions for a batch of images, in one request.

    ``images`` is a list of preprocessed samples, or request inputs from ``image_inputs``.
    """
    output = metadata.outputs[0].name
    if not isinstance(images, dict):
        images = {image_spec(metadata).input_name: np.stack(images)}
    result = client.infer(metadata.name, images, [output], classification=top_k)
    predictions = []
    for row in result[output]:
        parsed = []
        for item in row:
            score, index, *label = item.decode("utf-8").split(":", 2)
            parsed.append(Prediction(label[0] if label else index, float(score)))
        predictions.append(parsed)
    return predictions


def run(paths: Sequence[str], url: str, model: str, top_k: int, out=sys.stdout,
        client_preprocessing: bool = False) -> int:
    """Classify ``paths`` and print the results; return a process exit status."""
    with Client(url, timeout=30.0) as client:
        try:
            if not client.is_model_ready(model):
                names = sorted({m["name"] for m in client.models() if m["state"] == "READY"})
                print(f"classify.py: model {model!r} is not ready on {url}; ready models: "
                      f"{', '.join(names) or 'none'} (choose one with --model)", file=sys.stderr)
                return 2
            metadata = client.model_metadata(model)
            spec = image_spec(metadata)
            inputs = image_inputs(paths, spec, encoded=not client_preprocessing)
            results = classify(client, metadata, inputs, top_k)
        except ImageInputError as exc:
            print(f"classify.py: {exc}", file=sys.stderr)
            return 2
        except InferenceServerError as exc:
            bad = _IMAGE_INDEX.search(exc.message)
            if exc.code == grpc.StatusCode.INVALID_ARGUMENT and bad:
                print(f"classify.py: cannot read image {paths[int(bad[1])]}: {bad[2]}",
                      file=sys.stderr)
                return 2
            if exc.code == grpc.StatusCode.UNAVAILABLE:
                print(f"classify.py: no onnxserve server answers at {url} ({exc.message}); "
                      "start one with `make serve`", file=sys.stderr)
            else:
                print(f"classify.py: the server refused the request: {exc}", file=sys.stderr)
            return 1
    weights = metadata.parameters.get("onnxserve.weights", "")
    for path, predictions in zip(paths, results, strict=True):
        print(f"{path}  ({model}, version {metadata.versions[-1]})", file=out)
        if str(weights).startswith("none"):
            print(f"  note: {model} has random weights; these predictions are meaningless",
                  file=out)
        width = max(len(p.label) for p in predictions)
        for p in predictions:
            print(f"  {p.label:<{width}}  {p.score:.4f}", file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Classify images with an onnxserve model.")
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    parser.add_argument("--url", default=os.environ.get("ONNXSERVE_URL", DEFAULT_URL),
                        help="server address (env ONNXSERVE_URL; default %(default)s)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name (default %(default)s)")
    parser.add_argument("--top-k", type=int, default=5,
                        help="classes to show (default %(default)s)")
    parser.add_argument("--client-preprocessing", action="store_true",
                        help="decode and resize the images here even when the server can")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        print(f"classify.py: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    return run(args.images, args.url, args.model, args.top_k,
               client_preprocessing=args.client_preprocessing)


if __name__ == "__main__":
    sys.exit(main())
