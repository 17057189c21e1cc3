"""Classify image files with a model served by onnxserve.

    python clients/classify.py IMG|DIR [IMG|DIR...] [--url localhost:8001] [--model NAME]
        [--top-k 5] [--token-file F] [--ssl --root-certificates CA.pem] ...

Prints, per image, ``label  score`` lines, best first; a folder stands for every image in it.
When the model takes encoded images (its metadata has ``encoded_image_input``), the files
are sent as they are and the server decodes them; otherwise (or with
``--client-preprocessing``) they are decoded, resized and scaled here, as the model's
metadata says. The server's classification extension names the classes. Files are sent in
requests of at most the model's ``max_batch_size``, several at a time. A file that cannot be
read or decoded is reported on its own line and the others are still answered; the exit
status is 0 when every file was classified, 2 when some file was not, 1 when the server
could not be used.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

try:
    import grpc
    import numpy as np

    from onnxserve.clients.client import Client, InferenceServerError, ModelMetadata
    from onnxserve.clients.connection import (
        ConnectionOptions,
        ConnectionSettingsError,
        add_connection_arguments,
        explain_unavailable,
        options_from_arguments,
    )
    from onnxserve.clients.preprocess import ImageInputError, ImageSpec, image_spec, load_image
except ModuleNotFoundError as exc:  # run as a script without the package installed
    sys.exit(f"classify.py: {exc.name} is not installed; run `make demo` or `pip install -e .`")

DEFAULT_MODEL = "mobilenet_v2"
#: requests in flight at once when the files need several
CONCURRENT_REQUESTS = 4
#: how the server names an image it cannot decode
_IMAGE_INDEX = re.compile(r"image (\d+): (.*)")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass
class Prediction:
    label: str
    score: float


class ServerError(RuntimeError):
    """The server could not be used; the message says what happened and what to try.

    ``status`` is the exit status: 2 when the command line asked for something the server
    does not have (a model), 1 otherwise.
    """

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def image_files(arguments: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The image files the arguments name (a folder: its image files, sorted), and the
    arguments that name none, each with the reason."""
    from PIL import Image

    extensions = set(Image.registered_extensions())
    files, bad = [], []
    for argument in arguments:
        path = Path(argument)
        if _URL.match(argument):
            bad.append((argument, "is a URL; classify.py reads local files (download it "
                                  "first)"))
        elif path.is_dir():
            found = sorted(str(p) for p in path.iterdir()
                           if p.is_file() and p.suffix.lower() in extensions)
            if not found:
                bad.append((argument, "is a folder with no image files"))
            files.extend(found)
        elif path.is_file():
            files.append(argument)
        elif path.exists():
            bad.append((argument, "is not a regular file"))
        else:
            bad.append((argument, "no such file"))
    return files, bad


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
    rows = result[output]
    predictions = []
    for row in rows if rows.ndim == 2 else [rows]:
        parsed = []
        for item in row:
            score, index, *label = item.decode("utf-8").split(":", 2)
            parsed.append(Prediction(label[0] if label else index, float(score)))
        predictions.append(parsed)
    return predictions


class _Classifier:
    """Classifies files in requests the model takes, isolating files it cannot read."""

    def __init__(self, client: Client, metadata: ModelMetadata, spec: ImageSpec,
                 top_k: int, encoded: bool, batched: bool) -> None:
        self.client, self.metadata, self.spec = client, metadata, spec
        self.top_k, self.encoded, self.batched = top_k, encoded, batched

    def chunk(self, paths: list[str]) -> dict[str, list[Prediction] | str]:
        """Each path's predictions, or why it could not be classified."""
        outcome: dict[str, list[Prediction] | str] = {}
        if not (self.encoded and self.spec.encoded_input):
            samples = {}
            for path in paths:
                try:
                    samples[path] = load_image(path, self.spec)
                except ImageInputError as exc:
                    outcome[path] = str(exc).removeprefix(f"{path}: ")
            paths = list(samples)
            if not paths:
                return outcome
            inputs = {self.spec.input_name: self._batch(list(samples.values()))}
            return {**outcome, **self._send(paths, inputs)}
        contents = {}
        for path in paths:
            try:
                contents[path] = Path(path).read_bytes()
            except OSError as exc:
                outcome[path] = exc.strerror or str(exc)
        pending = list(contents)
        while pending:
            files = np.empty((len(pending), 1), dtype=object)
            for i, path in enumerate(pending):
                files[i, 0] = contents[path]
            try:
                outcome.update(self._send(pending, {
                    self.spec.encoded_input: files if self.batched else files[0]}))
                break
            except InferenceServerError as exc:
                bad = _IMAGE_INDEX.search(exc.message)
                if exc.code != grpc.StatusCode.INVALID_ARGUMENT or not bad:
                    raise
                culprit = pending.pop(int(bad[1]))
                outcome[culprit] = bad[2]  # the rest go again without it
        return outcome

    def _batch(self, samples: list[np.ndarray]) -> np.ndarray:
        return np.stack(samples) if self.batched else samples[0]

    def _send(self, paths: list[str],
              inputs: dict[str, np.ndarray]) -> dict[str, list[Prediction] | str]:
        predictions = classify(self.client, self.metadata, inputs, self.top_k)
        return dict(zip(paths, predictions, strict=True))


def run(paths: Sequence[str], options: ConnectionOptions | str, model: str, top_k: int,
        out=sys.stdout, client_preprocessing: bool = False) -> int:
    """Classify ``paths`` (files or folders) and print the results; return an exit status."""
    if isinstance(options, str):
        options = ConnectionOptions(url=options)
    files, unusable = image_files(paths)
    for path, reason in unusable:
        print(f"classify.py: {path}: {reason}", file=sys.stderr)
    if not files:
        return 2
    try:
        with Client(options.url, timeout=30.0, **options.client_arguments()) as client:
            results, metadata = _classify_files(client, files, model, top_k,
                                                client_preprocessing)
    except ServerError as exc:
        print(f"classify.py: {exc}", file=sys.stderr)
        return exc.status
    except InferenceServerError as exc:
        print(f"classify.py: {_server_problem(exc, options)}", file=sys.stderr)
        return 1
    weights = str(metadata.parameters.get("onnxserve.weights", ""))
    failed = bool(unusable)
    for path in files:
        result = results[path]
        if isinstance(result, str):
            print(f"classify.py: cannot read image {path}: {result}", file=sys.stderr)
            failed = True
            continue
        print(f"{path}  ({model}, version {metadata.versions[-1]})", file=out)
        if weights.startswith("none"):
            print(f"  note: {model} has random weights; these predictions are meaningless",
                  file=out)
        width = max(len(p.label) for p in result)
        for p in result:
            print(f"  {p.label:<{width}}  {p.score:.4f}", file=out)
    return 2 if failed else 0


def _classify_files(client: Client, files: list[str], model: str, top_k: int,
                    client_preprocessing: bool
                    ) -> tuple[dict[str, list[Prediction] | str], ModelMetadata]:
    if not client.is_model_ready(model):
        names = sorted({m["name"] for m in client.models() if m["state"] == "READY"})
        raise ServerError(f"model {model!r} is not ready on {client.url}; ready models: "
                          f"{', '.join(names) or 'none'} (choose one with --model)", status=2)
    metadata = client.model_metadata(model)
    try:
        spec = image_spec(metadata)
    except ImageInputError as exc:
        raise ServerError(str(exc), status=2) from None
    max_batch = client.model_config(model).max_batch_size
    worker = _Classifier(client, metadata, spec, top_k, not client_preprocessing,
                         batched=max_batch > 0)
    size = max(max_batch, 1)
    chunks = [files[i:i + size] for i in range(0, len(files), size)]
    results: dict[str, list[Prediction] | str] = {}
    with ThreadPoolExecutor(min(CONCURRENT_REQUESTS, len(chunks))) as pool:
        for outcome in pool.map(worker.chunk, chunks):
            results.update(outcome)
    return results, metadata


def _server_problem(exc: InferenceServerError, options: ConnectionOptions) -> str:
    if exc.code == grpc.StatusCode.UNAVAILABLE:
        return explain_unavailable(exc.message, options.url, options.tls)
    if exc.code == grpc.StatusCode.UNAUTHENTICATED:
        hint = ("pass its token with --token-file (or --token, env ONNXSERVE_TOKEN_FILE)"
                if options.token is None else "check the token")
        return f"the server at {options.url} refused the call ({exc.message}): {hint}"
    return f"the server refused the request: {exc}"


def build_parser() -> argparse.ArgumentParser:
    """The command line of classify.py."""
    parser = argparse.ArgumentParser(description="Classify images with an onnxserve model.")
    parser.add_argument("images", nargs="+",
                        help="image files (JPEG, PNG, ...) or folders of them")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name (default %(default)s)")
    parser.add_argument("--top-k", type=int, default=5,
                        help="classes to show (default %(default)s)")
    parser.add_argument("--client-preprocessing", action="store_true",
                        help="decode and resize the images here even when the server can")
    add_connection_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    try:
        options = options_from_arguments(args)
    except ConnectionSettingsError as exc:
        print(f"classify.py: {exc}", file=sys.stderr)
        return 2
    return run(args.images, options, args.model, args.top_k,
               client_preprocessing=args.client_preprocessing)


if __name__ == "__main__":
    sys.exit(main())
