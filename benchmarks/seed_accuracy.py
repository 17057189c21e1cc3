"""Train every recipe at the seed's full length on the seed's data; compare accuracies.

    python -m onnxserve.benchmarks.seed_accuracy [--data-dir DIR] [--recipes ID ...]

Needs the real data sets: keras.datasets downloads them where the network allows, or
``--data-dir`` holds mnist.npz, fashion_mnist.npz and cifar10.npz (x_train, y_train,
x_test, y_test). Writes benchmarks/results/seed_accuracy.md. Hours of CPU time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from onnxserve.export.recipes import RECIPES
from onnxserve.serving.models.repository import read_model
from onnxserve.serving.process import onnxserve_command

RESULTS = Path(__file__).resolve().parent / "results"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES),
                        help="recipes to train (default: all)")
    parser.add_argument("--data-dir", type=Path,
                        help="folder with mnist.npz, fashion_mnist.npz, cifar10.npz (default: "
                             "keras.datasets' download)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder for seed_accuracy.md (default: the committed "
                             "benchmarks/results)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    lines = ["# Recipes at the seed's full length", "",
             "| recipe | data | held-out accuracy | epochs | the seed reported |",
             "|---|---|---|---|---|"]
    failed = False
    with tempfile.TemporaryDirectory() as repository:
        for number, name in enumerate(args.recipes, 1):
            print(f"[{number}/{len(args.recipes)}] training {name} at the seed's length ...",
                  flush=True)
            command = onnxserve_command("export", name, "--model-repository", repository)
            if args.data_dir:
                command += ["--data-dir", str(args.data_dir)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                failed = True
                reason = (result.stderr.strip().splitlines() or ["?"])[-1]
                lines.append(f"| {name} | | failed: {reason} | | {RECIPES[name].seed_accuracy} |")
                continue
            params = read_model(Path(repository), name).config.parameters
            lines.append(
                f"| {name} | {params['onnxserve.dataset'].string_value} | "
                f"{params['onnxserve.heldout_accuracy'].string_value} | "
                f"{params['onnxserve.epochs'].string_value} | {RECIPES[name].seed_accuracy} |"
            )
            print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seed_accuracy.md").write_text("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
