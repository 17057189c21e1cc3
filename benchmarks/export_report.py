"""Export every seed model and report parity, size, latency, speed-up and peak memory.

    python -m onnxserve.benchmarks.export_report [--models ID ...] [--variants fp16 int8]

Each export runs as its own process (``onnxserve export``) so its peak resident memory
is its own (``os.wait4``). ImageNet applications use ``--weights none`` (no download);
the 28x28 recipes train on scikit-learn's digits unless ``--data-dir`` holds the real
sets; cifar10_cnn falls back to a synthetic set when no cifar10.npz is given (the report
says which). int8 variants are exported with ``--force``, so that one slower than fp32 is
reported (and marked) rather than refused. Writes benchmarks/results/export.json and
export.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from onnxserve.export.cli import MODELS, RECIPES
from onnxserve.export.pipeline import RANDOM_WEIGHTS_AGREEMENT
from onnxserve.serving.process import onnxserve_command

RESULTS = Path(__file__).resolve().parent / "results"
#: the memory each export must stay under
BUDGET_MB = {"vgg19": 8192}
DEFAULT_BUDGET_MB = 6144


def synthetic_cifar10(path: Path, n_train: int = 2000, n_test: int = 500) -> None:
    """A learnable stand-in for CIFAR-10: each class a colour tint plus noise."""
    rng = np.random.default_rng(0)
    tints = rng.integers(40, 216, (10, 3))

    def make(n: int):
        y = rng.integers(0, 10, n)
        x = tints[y][:, None, None, :] + rng.normal(0, 40, (n, 32, 32, 3))
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.uint8)

    (x_train, y_train), (x_test, y_test) = make(n_train), make(n_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def run_export(args: list[str]) -> tuple[int, float, str]:
    """Run one export; return its exit status, peak RSS in MB and its output."""
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            onnxserve_command("export", *args),
            stdout=log, stderr=subprocess.STDOUT,
        )
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        return process.returncode, usage.ru_maxrss / 1024, log.read()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS,
                        help="model ids to export (default: all)")
    parser.add_argument("--variants", nargs="+", default=["fp32", "fp16", "int8"],
                        choices=["fp32", "fp16", "int8"],
                        help="variants to export of each (default %(default)s)")
    parser.add_argument("--data-dir", type=Path,
                        help="folder with mnist.npz / fashion_mnist.npz / cifar10.npz")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder for export.json and export.md (default: the committed "
                             "benchmarks/results)")
    parser.add_argument("--merge", action="store_true",
                        help="replace only these models' rows in an existing export.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp) / "repository"
        synthetic_dir = Path(tmp) / "data"
        synthetic_dir.mkdir()
        synthetic_cifar10(synthetic_dir / "cifar10.npz")
        total = len(args.models) * len(args.variants)
        for model in args.models:
            for variant in args.variants:
                print(f"[{len(rows) + 1}/{total}] exporting {model} {variant} ...", flush=True)
                extra: list[str] = []
                data = "imagenet architecture, random weights"
                if model in RECIPES:
                    if model == "cifar10_cnn":
                        real = args.data_dir and (args.data_dir / "cifar10.npz").is_file()
                        extra = ["--data-dir", str(args.data_dir if real else synthetic_dir)]
                        data = "cifar10" if real else "synthetic cifar10 stand-in"
                    elif args.data_dir and any(args.data_dir.glob("*.npz")):
                        extra = ["--data-dir", str(args.data_dir)]
                        data = "seed's data set"
                    else:
                        extra = ["--dataset", "digits"]
                        data = "scikit-learn digits"
                else:
                    extra = ["--weights", "none"]
                if variant != "fp32":
                    extra.append(f"--{variant}")
                if variant == "int8":  # report a slower int8 rather than refuse it
                    extra.append("--force")
                name = f"{model}_{variant}"
                started = time.perf_counter()
                status, rss_mb, output = run_export(
                    [model, *extra, "--name", name, "--model-repository", str(repository)]
                )
                row = {"model": model, "variant": variant, "data": data, "status": status,
                       "peak_rss_mb": round(rss_mb, 1),
                       "budget_mb": BUDGET_MB.get(model, DEFAULT_BUDGET_MB),
                       "wall_s": round(time.perf_counter() - started, 1)}
                report_path = repository / name / "1" / "verification.json"
                if status == 0 and report_path.is_file():
                    row["report"] = json.loads(report_path.read_text())
                else:
                    row["error"] = output.strip().splitlines()[-1] if output.strip() else "?"
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "report"}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    existing = args.out / "export.json"
    if args.merge and existing.is_file():
        fresh = {(r["model"], r["variant"]): r for r in rows}
        old = json.loads(existing.read_text())
        rows = [fresh.pop((r["model"], r["variant"]), r) for r in old] + list(fresh.values())
    existing.write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "export.md").write_text(markdown(rows))
    print(f"wrote {args.out / 'export.md'}")
    return 0 if all(r["status"] == 0 and r["peak_rss_mb"] <= r["budget_mb"] for r in rows) else 1


def _machine(rows: list[dict]) -> str:
    """The CPU the rows were measured on (from their reports), with this machine's cores."""
    from onnxserve.export.cpu import this_cpu

    named = [r["report"]["timing"]["cpu"] for r in rows
             if "timing" in r.get("report", {})]
    return named[0] if named else str(this_cpu())


def speedup(report: dict, variant: str) -> str:
    """fp32's latency over the variant's, at batch 1 and 32 (``2.40x / 2.68x``), with a
    mark where the variant is not faster; empty for fp32 rows and older reports."""
    figures = report.get("speedup_vs_fp32")
    if variant == "fp32" or not figures:
        return ""
    text = " / ".join(f"{figures[key]:.2f}x" for key in ("batch1", "batch32") if key in figures)
    return text + (" (slower)" if any(v <= 1.0 for v in figures.values()) else "")


def markdown(rows: list[dict]) -> str:
    lines = [
        "# Export report",
        "",
        f"Generated by `python -m onnxserve.benchmarks.export_report` on {_machine(rows)}, "
        "without GPU. Parity: Keras against onnxruntime (fp32) on the same inputs; "
        "probabilities within 1e-4, logits within 1e-3 of each sample's largest logit. "
        "Agreement: the variant's top-1 class against fp32 (held-out data for recipes, "
        "crops of scikit-learn's two photos for applications). Latency: onnxruntime with the "
        "server's session options (intra-op threads = cores, sequential), median ms of one "
        "request of 1 and of 32 samples, fp32 and the variant in turns; speed-up: fp32's "
        "latency over the variant's (above 1: the variant is faster; int8 is exported with "
        "--force so that a slower one shows). fp16 is a GPU format: on the CPU it is no "
        "faster. Peak RSS: the whole export process (training included for recipes).",
        "",
        "| model | variant | data | max abs dp | max rel dlogit | top-1 vs fp32 | size MB "
        "(fp32 / variant) | batch-1 ms (fp32 / variant) | batch-32 ms (fp32 / variant) | "
        "speed-up vs fp32 (batch 1 / 32) | peak RSS MB (budget) | export s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    caveats: dict[str, int] = {}  # why an agreement figure proves nothing -> note number
    for r in rows:
        if "report" not in r:
            lines.append(f"| {r['model']} | {r['variant']} | {r['data']} | failed: "
                         f"{r.get('error', '')} | | | | | | | {r['peak_rss_mb']:.0f} "
                         f"({r['budget_mb']}) | {r['wall_s']} |")
            continue
        rep = r["report"]
        parity = rep["parity"]
        variant = r["variant"]

        def pair(values: dict, fmt: str, variant: str = variant) -> str:
            text = format(values["fp32"], fmt)
            if variant != "fp32" and variant in values:
                text += " / " + format(values[variant], fmt)
            return text

        agreement = ""
        if "top1_agreement_vs_fp32" in rep:
            agreement = f"{rep['top1_agreement_vs_fp32']:.1%} of {rep['agreement_samples']}"
            caveat = rep.get("top1_agreement_caveat") or (
                RANDOM_WEIGHTS_AGREEMENT if "random weights" in r["data"] else None)  # older rows
            if caveat:
                caveats.setdefault(caveat, len(caveats) + 1)
                agreement += f" (see note {caveats[caveat]})"
        lines.append(
            f"| {r['model']} | {variant} | {r['data']} | {parity['max_abs_prob_diff']:.1e} | "
            f"{parity['max_rel_score_diff']:.1e} | {agreement} | "
            f"{pair(rep['size_mb'], '.1f')} | {pair(rep['batch1_latency_ms'], '.2f')} | "
            f"{pair(rep['batch32_latency_ms'], '.1f') if 'batch32_latency_ms' in rep else ''} | "
            f"{speedup(rep, variant)} | {r['peak_rss_mb']:.0f} ({r['budget_mb']}) | "
            f"{r['wall_s']} |"
        )
    for caveat, number in caveats.items():
        lines += ["", f"Note {number}: {caveat}."]
    lines += int8_kernels(rows)
    return "\n".join(lines) + "\n"


def int8_kernels(rows: list[dict]) -> list[str]:
    """Markdown lines: for each int8 row whose report profiled it (int8.batch1_ops), the
    batch-1 milliseconds in integer kernels, float operators (named) and conversions
    between them, after onnxruntime's fusion; no lines when there is none."""
    lines: list[str] = []
    for r in rows:
        ops = r.get("report", {}).get("int8", {}).get("batch1_ops")
        if r["variant"] != "int8" or not ops:
            continue
        cells = []
        for kind in ("integer", "float", "conversion"):
            chosen = [o for o in ops if o["kind"] == kind]
            names = ", ".join(o["op_type"] + (f" x{o['nodes']}" if o["nodes"] > 1 else "")
                              for o in chosen[:6]) + (", ..." if len(chosen) > 6 else "")
            total = sum(o["ms"] for o in chosen)
            cells.append(f"{total:.2f} ({names})" if chosen else "")
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    return ["", "## int8: where a batch-1 request spends its time", "",
            "After onnxruntime's graph optimisation (QDQ groups fused into integer kernels), "
            "per kind of operator: the sum over nodes of each node's fastest time in "
            "onnxruntime's profile, ms, with the operator types (most expensive first).", "",
            "| model | integer kernels | float operators | conversions (quantize, dequantize, "
            "cast) |", "|---|---|---|---|", *lines]


if __name__ == "__main__":
    sys.exit(main())
