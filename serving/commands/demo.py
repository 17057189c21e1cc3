"""`onnxserve demo`: export the default models, serve them, classify the samples, stop.

A second run reuses the models already in the repository and the sample images.
"""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

from onnxserve.serving.process import ServerProcess, onnxserve_command

DEFAULT_MODELS = ("lenet5", "mobilenet_v2")
#: Where Keras caches the MobileNetV2 ImageNet weights after a download.
KERAS_MOBILENET_V2_WEIGHTS = (
    Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    / "models"
    / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5"
)


def add_demo_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="export the default models, serve them and classify the sample images"
    )
    p.add_argument("--samples", type=Path, default=Path("samples"),
                   help="sample image folder (default %(default)s)")
    p.add_argument("--grpc-port", type=int, default=0,
                   help="port for the demo server (default: a free one)")
    p.add_argument("--mobilenet-weights", default="auto",
                   help="imagenet, none, a file, or auto: Keras' cached ImageNet file when "
                        "present, else none (default %(default)s)")
    p.set_defaults(func=run_demo)
    return p  # the caller adds --model-repository (a setting of the server's)


def _export_missing(repository: Path, weights: str) -> None:
    from onnxserve.export.publish import existing_versions

    for name in DEFAULT_MODELS:
        if existing_versions(repository, name):
            print(f"== {name}: already in {repository}, reusing it", flush=True)
            continue
        print(f"== exporting {name}", flush=True)
        extra = ["--weights", weights] if name == "mobilenet_v2" else ["--dataset", "digits"]
        subprocess.run(
            onnxserve_command("export", name, "--model-repository", str(repository), *extra),
            check=True
        )


def run_demo(args: argparse.Namespace) -> int:
    from onnxserve.clients import classify

    repository: Path = args.model_repository
    weights = args.mobilenet_weights
    if weights == "auto":
        weights = "imagenet" if KERAS_MOBILENET_V2_WEIGHTS.is_file() else "none"
    _export_missing(repository, weights)
    if not (args.samples / "china.jpg").is_file():
        print(f"== writing sample images to {args.samples}", flush=True)
        subprocess.run(
            onnxserve_command("samples", "--out", str(args.samples)), check=True,
            stdout=subprocess.DEVNULL,
        )

    server = ServerProcess.serve(repository, port=args.grpc_port or None, capture=False)
    url = server.url
    print(f"== starting the server on {url}", flush=True)
    try:
        server.wait_ready(180.0)
        digits = sorted(args.samples.glob("digit_*.png"))
        photos = sorted(args.samples.glob("*.jpg"))
        print("== classifying the held-out digits with lenet5", flush=True)
        status = classify.run([str(p) for p in digits], url, "lenet5", top_k=1)
        print("== classifying the photos with mobilenet_v2", flush=True)
        status = status or classify.run([str(p) for p in photos], url, "mobilenet_v2", top_k=5)
        correct, agree = _check_digits(url, digits, repository)
        print(f"== digits: {correct} of {len(digits)} correct; the served scores match "
              f"onnxruntime's run here on {agree} of {len(digits)}", flush=True)
        if agree != len(digits):  # the server answered wrongly (the model may err: it is
            status = status or 1  # trained to about 98% held-out accuracy)
    finally:
        print("== stopping the server", flush=True)
        server.stop()
    return status


def _check_digits(url: str, digits: list[Path], repository: Path) -> tuple[int, int]:
    """How many digits the served lenet5 labels correctly, and on how many its scores
    match those of the same ONNX file run here with onnxruntime (within 1e-5): the first
    says how good the model is, the second whether the server answers right."""
    import numpy as np
    import onnxruntime as ort

    from onnxserve.clients.client import Client
    from onnxserve.clients.preprocess import image_spec, load_image
    from onnxserve.export.publish import existing_versions

    with Client(url) as client:
        metadata = client.model_metadata("lenet5")
        spec = image_spec(metadata)
        batch = np.stack([load_image(p, spec) for p in digits])
        output = metadata.outputs[0].name
        served = client.infer("lenet5", {spec.input_name: batch}, [output])[output]
    model = repository / "lenet5" / str(max(existing_versions(repository, "lenet5")))
    session = ort.InferenceSession(str(model / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    local = session.run([output], {spec.input_name: batch})[0]
    labels = (repository / "lenet5" / "labels.txt").read_text().split()
    truth = [p.name.split("_")[1] for p in digits]
    correct = sum(labels[int(i)] == label
                  for i, label in zip(served.argmax(axis=1), truth, strict=True))
    agree = int(np.sum(np.all(np.abs(served - local) <= 1e-5, axis=1)))
    return correct, agree
