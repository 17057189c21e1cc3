"""Models for the GPU check, exported here and carried to a GPU machine without their weights.

A GPU machine without network cannot run the exporter (no TensorFlow, no downloads), and the
exported files are too large to carry (ResNet50 alone is about 100 MB of random floats). The
seed models are exported with random weights anyway (``--weights none``: ImageNet weights
need a download), so ``pack`` keeps each graph whole but replaces every large float
initializer by its shape, mean and standard deviation; ``unpack`` on the GPU machine draws
new values with the same statistics from a fixed seed. The graphs, and so the compute, are
exactly the exported ones; both providers of a parity check read the same unpacked file.

    python -m onnxserve.benchmarks.gpu_models prepare --repository build/gpu/repository
    python -m onnxserve.benchmarks.gpu_models pack --repository build/gpu/repository \
        --out .gpu/models
    python -m onnxserve.benchmarks.gpu_models unpack --packed .gpu/models --out /tmp/repository
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np

from onnxserve.serving.process import onnxserve_command

#: (repository name, export arguments): the exported seed models the check runs
SEED_EXPORTS: dict[str, list[str]] = {
    "lenet5": ["lenet5", "--dataset", "digits", "--epochs", "2"],
    "fashion_cnn1": ["fashion_cnn1", "--dataset", "digits", "--epochs", "1"],
    "mobilenet_v2": ["mobilenet_v2", "--weights", "none", "--max-batch-size", "64"],
    "mobilenet_v2_fp16": ["mobilenet_v2", "--weights", "none", "--max-batch-size", "64",
                          "--fp16"],
    "resnet50": ["resnet50", "--weights", "none", "--max-batch-size", "64"],
    "resnet50_fp16": ["resnet50", "--weights", "none", "--max-batch-size", "64", "--fp16"],
    "mobilenet": ["mobilenet", "--weights", "none", "--max-batch-size", "64"],
    "efficientnet_b1": ["efficientnet_b1", "--weights", "none", "--max-batch-size", "64"],
    "inception_v3": ["inception_v3", "--weights", "none", "--max-batch-size", "64"],
    "xception": ["xception", "--weights", "none", "--max-batch-size", "64"],
    "densenet201": ["densenet201", "--weights", "none", "--max-batch-size", "64"],
}
#: float initializers with at least this many elements travel as statistics only
MIN_ELEMENTS = 4096
GRAPH_FILE = "model.graph.onnx"
WEIGHTS_FILE = "model.weights.json"
MODEL_FILE = "model.onnx"
SEED = 20261128


def prepare(repository: Path, names: list[str]) -> None:
    """Export the named seed models into ``repository`` (skips those already there)."""
    for name in names:
        if (repository / name).is_dir():
            print(f"{name}: already exported")
            continue
        command = onnxserve_command("export", *SEED_EXPORTS[name], "--name", name,
                                    "--model-repository", str(repository))
        print("$", " ".join(command[3:]), flush=True)
        subprocess.run(command, check=True)


def pack_model(source: Path, target: Path) -> dict[str, int]:
    """Write ``source`` (an .onnx file) as a graph without its large weights plus their
    statistics; returns the byte counts before and after."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    described = []
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.dtype.kind != "f" or array.size < MIN_ELEMENTS:
            continue
        values = array.astype(np.float64)
        described.append({"name": tensor.name, "dtype": array.dtype.name,
                          "shape": list(array.shape), "mean": float(values.mean()),
                          "std": float(values.std())})
        for name in ("raw_data", "float_data", "int32_data", "double_data"):
            tensor.ClearField(name)
    target.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target / GRAPH_FILE))
    (target / WEIGHTS_FILE).write_text(json.dumps({"seed": SEED, "tensors": described},
                                                  indent=1))
    return {"before": source.stat().st_size,
            "after": (target / GRAPH_FILE).stat().st_size + (target / WEIGHTS_FILE).stat().st_size}


def unpack_model(packed: Path, target: Path) -> None:
    """Rebuild ``target``/model.onnx from a packed graph, drawing the weights again."""
    import onnx

    model = onnx.load(str(packed / GRAPH_FILE))
    spec = json.loads((packed / WEIGHTS_FILE).read_text())
    rng = np.random.default_rng(spec["seed"])
    wanted = {t["name"]: t for t in spec["tensors"]}
    for tensor in model.graph.initializer:
        info = wanted.pop(tensor.name, None)
        if info is None:
            continue
        values = rng.normal(info["mean"], info["std"], info["shape"])
        tensor.raw_data = values.astype(info["dtype"]).tobytes()
    if wanted:
        raise ValueError(f"{packed}: tensors {sorted(wanted)} are not in the graph")
    target.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target / MODEL_FILE))


def _copy_model_folder(source: Path, target: Path, model_action) -> None:
    for path in source.rglob("*"):
        if path.is_dir():
            continue
        relative = path.relative_to(source)
        if path.name == MODEL_FILE:
            model_action(path, target / relative.parent)
        elif path.name not in (GRAPH_FILE, WEIGHTS_FILE):
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / relative)


def pack(repository: Path, out: Path) -> None:
    """Pack every model folder of ``repository`` into ``out``."""
    if out.exists():
        shutil.rmtree(out)
    for folder in sorted(p for p in repository.iterdir() if p.is_dir()):
        sizes: dict[str, int] = {}

        def action(path: Path, target: Path, sizes=sizes) -> None:
            sizes.update(pack_model(path, target))

        _copy_model_folder(folder, out / folder.name, action)
        print(f"{folder.name}: {sizes['before'] / 1e6:.1f} MB -> {sizes['after'] / 1e6:.2f} MB")


def unpack(packed: Path, out: Path) -> None:
    """Rebuild a model repository from a packed one."""
    for folder in sorted(p for p in packed.iterdir() if p.is_dir()):
        for graph in folder.rglob(GRAPH_FILE):
            unpack_model(graph.parent, out / graph.parent.relative_to(packed))
        _copy_model_folder(folder, out / folder.name, lambda path, target: None)
        print(f"{folder.name}: unpacked", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="export the seed models (needs the export extra)")
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--models", nargs="+", choices=sorted(SEED_EXPORTS),
                   default=list(SEED_EXPORTS))
    p = commands.add_parser("pack", help="write graphs plus weight statistics")
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p = commands.add_parser("unpack", help="rebuild the models from a packed repository")
    p.add_argument("--packed", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.repository, args.models)
    elif args.command == "pack":
        pack(args.repository, args.out)
    else:
        unpack(args.packed, args.out)


if __name__ == "__main__":
    main()
