"""`onnxserve demo`, the main job: export, serve, classify, stop; reuse on a second run."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from support import ROOT

from onnxserve.serving.process import onnxserve_command


def test_demo_end_to_end_and_reuse(tmp_path: Path) -> None:
    args = onnxserve_command("demo", "--model-repository", str(tmp_path / "repo"),
                             "--samples", str(tmp_path / "samples"))
    first = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "== exporting lenet5" in first.stdout and "== exporting mobilenet_v2" in first.stdout
    _check_digits_line(first.stdout)
    assert "china.jpg  (mobilenet_v2, version 1)" in first.stdout
    assert "random weights" in first.stdout
    # README's excerpt of this output is what the run prints, any number aside
    readme = (ROOT / "README.md").read_text()
    excerpt = re.search(r"Part of the output.*?\n```\n(.*?)```", readme, re.S)
    assert excerpt is not None
    for line in excerpt.group(1).splitlines():
        if line.strip() and line != "...":
            pattern = re.sub(r"\d+(?:\\\.\d+)?", r"\\d+(?:\\.\\d+)?", re.escape(line))
            assert re.search(f"{pattern}$", first.stdout, re.M), (pattern, line)
    second = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "already in" in second.stdout and "== exporting" not in second.stdout
    _check_digits_line(second.stdout)


def _check_digits_line(output: str) -> None:
    """Every served answer matches onnxruntime's; the model itself gets most digits right
    (about 98% held-out accuracy: a digit or two may be wrong on some machines)."""
    found = re.search(r"^== digits: (\d+) of 10 correct; the served scores match "
                      r"onnxruntime's run here on (\d+) of 10$", output, re.M)
    assert found is not None, output[-3000:]
    assert int(found.group(2)) == 10 and int(found.group(1)) >= 8, found.group(0)
