"""`onnxserve demo`: export the default models, serve them, classify the samples, stop.

A second run reuses the models already in the repository and the sample images.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

DEFAULT_MODELS = ("lenet5", "mobilenet_v2")
#: Where Keras caches the MobileNetV2 ImageNet weights after a download.
KERAS_MOBILENET_V2_WEIGHTS = (
    Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    / "models"
    / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5"
)


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    from .cli import add_repository_argument

    p = subparsers.add_parser(
        "demo", help="export the default models, serve them and classify the sample images"
    )
    add_repository_argument(p)
    p.add_argument("--samples", type=Path, default=Path("samples"),
                   help="sample image folder (default %(default)s)")
    p.add_argument("--grpc-port", type=int, default=0,
                   help="port for the demo server (default: a free one)")
    p.add_argument("--mobilenet-weights", default="auto",
                   help="imagenet, none, a file, or auto: Keras' cached ImageNet file when "
                        "present, else none (default %(default)s)")
    p.set_defaults(func=run_demo)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for servers started locally)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """``preexec_fn`` for child servers: the kernel sends SIGTERM when the parent dies (Linux)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


#: The signals that stop `onnxserve serve` (and the supervisor of --workers N).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def hold_stop_signals() -> None:
    """``preexec_fn`` for `onnxserve serve` children: die_with_parent(), and SIGTERM/SIGINT
    blocked until the child has its handlers.

    A blocked signal stays pending across exec; the server unblocks the two once its
    handler is installed (workers.exit_on_stop_signals), so a stop sent at any moment, even
    before the interpreter has started, ends it with status 0 instead of killing it. Only
    for commands that unblock them: anything else would never see SIGTERM.
    """
    die_with_parent()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def _onnxserve(*args: str) -> list[str]:
    return [sys.executable, "-m", "onnxserve.serving.cli", *args]


def _export_missing(repository: Path, weights: str) -> None:
    from onnxserve.export.publish import existing_versions

    for name in DEFAULT_MODELS:
        if existing_versions(repository, name):
            print(f"== {name}: already in {repository}, reusing it", flush=True)
            continue
        print(f"== exporting {name}", flush=True)
        extra = ["--weights", weights] if name == "mobilenet_v2" else ["--dataset", "digits"]
        subprocess.run(
            _onnxserve("export", name, "--model-repository", str(repository), *extra), check=True
        )


def _wait_ready(url: str, server: subprocess.Popen, timeout: float = 180.0) -> None:
    from onnxserve.clients.client import Client

    with Client(url, timeout=2.0) as client:
        client.wait_until_ready(timeout, alive=lambda: server.poll() is None, poll_s=0.5)


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
            _onnxserve("samples", "--out", str(args.samples)), check=True,
            stdout=subprocess.DEVNULL,
        )

    port = args.grpc_port or free_port()
    url = f"127.0.0.1:{port}"
    print(f"== starting the server on {url}", flush=True)
    server = subprocess.Popen(
        _onnxserve("serve", "--model-repository", str(repository), "--grpc-host", "127.0.0.1",
                   "--grpc-port", str(port), "--metrics-port", "0"),
        preexec_fn=hold_stop_signals,
    )
    try:
        _wait_ready(url, server)
        digits = sorted(args.samples.glob("digit_*.png"))
        photos = sorted(args.samples.glob("*.jpg"))
        print("== classifying the held-out digits with lenet5", flush=True)
        status = classify.run([str(p) for p in digits], url, "lenet5", top_k=1)
        print("== classifying the photos with mobilenet_v2", flush=True)
        status = status or classify.run([str(p) for p in photos], url, "mobilenet_v2", top_k=5)
        correct = _count_correct_digits(url, digits)
        print(f"== digits: {correct} of {len(digits)} correct", flush=True)
        if correct != len(digits):
            status = status or 1
    finally:
        print("== stopping the server", flush=True)
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return status


def _count_correct_digits(url: str, digits: list[Path]) -> int:
    from onnxserve.clients.classify import classify
    from onnxserve.clients.client import Client
    from onnxserve.clients.preprocess import image_spec, load_image

    with Client(url) as client:
        metadata = client.model_metadata("lenet5")
        spec = image_spec(metadata)
        predictions = classify(client, metadata, [load_image(p, spec) for p in digits], 1)
    truth = [p.name.split("_")[1] for p in digits]
    return sum(pred[0].label == label for pred, label in zip(predictions, truth, strict=True))
