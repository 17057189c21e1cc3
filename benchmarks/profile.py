"""Where a served request's time goes: py-spy samples of the server under closed-loop load.

    python -m onnxserve.benchmarks.profile --model-repository DIR --model lenet5 [--concurrency 16]

Needs py-spy (``pip install py-spy``). Starts the server, drives it with the benchmark's
load generator in a second process, samples the server for ``--seconds``, and writes the
own-time and inclusive-time tables to <--out>/profile_<model>.md (default ./bench_results;
``--out benchmarks/results`` for the committed one). Time inside
gRPC's compiled core shows up as its Python entry point (asyncio Handle._run).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from onnxserve.serving.process import ServerProcess

from .bench import DEFAULT_OUT

_LOAD = """
import asyncio, sys, numpy as np
from onnxserve.benchmarks.load import build_request, run_load
from onnxserve.serving.models.repository import read_model
from onnxserve.benchmarks.bench import _sample
config = read_model(__import__("pathlib").Path(sys.argv[2]), sys.argv[3]).config
payload = build_request(sys.argv[3], {config.input[0].name: _sample(config)[None]})
r = asyncio.run(run_load(sys.argv[1], payload, concurrency=int(sys.argv[4]), warmup_s=1,
                         window_s=float(sys.argv[5]), max_windows=1))
print(f"{r.throughput:.0f} inferences/s, p50 {r.p50_ms:.2f} ms")
"""


def summarize(raw: str, top: int = 25) -> tuple[int, list, list]:
    """(samples, own-time shares, inclusive shares) from py-spy's raw (collapsed) output."""
    own: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    share = lambda c: [(f, 100 * n / total) for f, n in c.most_common(top)]  # noqa: E731
    return total, share(own), share(inclusive)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"),
                        help="repository the server loads (default %(default)s)")
    parser.add_argument("--model", default="lenet5",
                        help="model to send requests to (default %(default)s)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="closed-loop requests in flight meanwhile (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="how long py-spy samples the server (default %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder for profile_<model>.md (default ./%(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("profile: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    server = ServerProcess.serve(args.model_repository, "--log-level", "WARNING")
    try:
        server.wait_ready()
        load = subprocess.Popen(
            [sys.executable, "-c", _LOAD, server.url, str(args.model_repository), args.model,
             str(args.concurrency), str(args.seconds + 2)],
            stdout=subprocess.PIPE, text=True,
        )
        time.sleep(2)
        with tempfile.NamedTemporaryFile(suffix=".txt") as raw:
            subprocess.run([py_spy, "record", "--pid", str(server.pid), "--duration",
                            str(int(args.seconds)), "--format", "raw", "--output", raw.name,
                            "--threads", "--nonblocking"], check=True, capture_output=True)
            total, own, inclusive = summarize(Path(raw.name).read_text())
        measured = load.communicate(timeout=120)[0].strip()
    finally:
        server.stop()
    lines = [f"# Profile: {args.model} at concurrency {args.concurrency}", "",
             f"`python -m onnxserve.benchmarks.profile --model {args.model} --concurrency "
             f"{args.concurrency}`: py-spy, {total} samples over {args.seconds:.0f} s, "
             f"server threads. Load meanwhile: {measured}.", "",
             "## Own time", "", "| share | function |", "|---|---|"]
    lines += [f"| {p:.1f}% | `{f}` |" for f, p in own]
    lines += ["", "## Inclusive time", "", "| share | function |", "|---|---|"]
    lines += [f"| {p:.1f}% | `{f}` |" for f, p in inclusive]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"profile_{args.model}.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path} ({measured})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
