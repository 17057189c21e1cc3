"""`onnxserve demo`, the main job: export, serve, classify, stop; reuse on a second run."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import ROOT, onnxserve_command


def test_demo_end_to_end_and_reuse(tmp_path: Path) -> None:
    args = onnxserve_command("demo", "--model-repository", str(tmp_path / "repo"),
                             "--samples", str(tmp_path / "samples"))
    first = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "== exporting lenet5" in first.stdout and "== exporting mobilenet_v2" in first.stdout
    assert "== digits: 10 of 10 correct" in first.stdout
    assert "china.jpg  (mobilenet_v2, version 1)" in first.stdout
    assert "random weights" in first.stdout
    second = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "already in" in second.stdout and "== exporting" not in second.stdout
    assert "== digits: 10 of 10 correct" in second.stdout
