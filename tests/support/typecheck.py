"""Type-check serving/ with mypy: ``python tests/support/typecheck.py`` (``make lint`` runs it).

mypy has to find the code under the names it is imported by (``onnxserve.serving``, ...),
which the editable install provides through an import hook mypy cannot follow; a temporary
folder of links gives it that layout. Exits with mypy's status.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # run as a script too: no `support` to import
PACKAGES = ("serving", "protos", "clients", "export", "benchmarks")


def typecheck() -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as tmp:
        namespace = Path(tmp) / "onnxserve"
        namespace.mkdir()
        for package in PACKAGES:
            (namespace / package).symlink_to(ROOT / package, target_is_directory=True)
        return subprocess.run(
            [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
             "--cache-dir", str(Path(tmp) / "cache"), "-p", "onnxserve.serving"],
            env={**os.environ, "MYPYPATH": tmp}, cwd=ROOT, capture_output=True, text=True)


if __name__ == "__main__":
    result = typecheck()
    sys.stdout.write(result.stdout + result.stderr)
    sys.exit(result.returncode)
