"""README.md's code blocks run as written (against this session's server and samples)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from conftest import ROOT, ServerProcess


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_every_python_block_runs(server: ServerProcess, samples: Path) -> None:
    blocks = python_blocks()
    assert blocks
    for block in blocks:
        # The README's own server address and sample folder, as `make demo` leaves them.
        code = block.replace("localhost:8001", server.url).replace("samples/", f"{samples}/")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "README.md", "exec"), {})
        assert printed.getvalue().strip(), block
