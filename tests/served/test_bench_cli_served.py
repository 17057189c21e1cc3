"""`onnxserve bench` as users meet it, run on a test model: results in the working
directory, progress while it runs (its options, and the other benchmark tools:
tests/unit/benchmarks/test_bench_cli.py)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

from support import ROOT
from support.repositories import build_test_models

from onnxserve.serving.process import onnxserve_command

COMMITTED = ROOT / "benchmarks" / "results"


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def test_bench_writes_to_the_working_directory_and_shows_progress(tmp_path: Path) -> None:
    build_test_models(tmp_path / "repo")
    committed = _digests(COMMITTED)
    stale = tmp_path / "bench_results" / "bench.png"  # an earlier run's plot
    stale.parent.mkdir()
    stale.write_bytes(b"old plot")
    no_matplotlib = tmp_path / "no_matplotlib" / "matplotlib"
    no_matplotlib.mkdir(parents=True)
    (no_matplotlib / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    result = subprocess.run(
        onnxserve_command("bench", "--model-repository", "repo", "--models", "scores",
                          "--concurrency", "1", "2", "--batching", "on", "--workers", "1",
                          "--warmup", "0.1", "--window", "0.2", "--max-windows", "3"),
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(no_matplotlib.parent), *filter(None, [os.environ.get("PYTHONPATH")])])},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert (tmp_path / "bench_results" / "bench.json").is_file()
    assert (tmp_path / "bench_results" / "bench.md").is_file()
    assert _digests(COMMITTED) == committed  # the package's committed results untouched
    # what it will do and how long, first
    assert out.splitlines()[0].startswith(
        "onnxserve bench: 1 model(s) x 4 configurations, 0.7 s each: about 3.4 s"), out
    announced = [line for line in out.splitlines() if line.startswith("[")]
    assert [re.sub(r" \(about .* left\)$", "", line) for line in announced] == [
        "[1/4] scores null server, concurrency 1",
        "[2/4] scores null server, concurrency 2",
        "[3/4] scores onnxserve, batching on, 1 worker, concurrency 1",
        "[4/4] scores onnxserve, batching on, 1 worker, concurrency 2",
    ], out
    assert all(" left)" in line for line in announced[1:]), out
    # the plot: skipped, saying how to get it (before the run and after), stale one gone
    assert out.splitlines()[1] == ("note: matplotlib is not installed, so there will be no "
                                   "bench.png (pip install matplotlib for it)"), out
    assert "no plot: matplotlib is not installed (pip install matplotlib" in out
    assert f"removed {Path('bench_results') / 'bench.png'}" in out
    assert not stale.exists()
