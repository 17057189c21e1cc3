"""README.md's and the docs/ pages' code blocks run as written against this session's server
and samples: every python block, every curl command (what the commands name, and where the
links lead: tests/unit/project/test_readme.py)."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

from support import ROOT
from support.doc_pages import docs_pages, shell_lines

from onnxserve.serving.process import ServerProcess


def python_blocks() -> list[tuple[Path, str]]:
    return [(page, block) for page in docs_pages()
            for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)]


def test_every_python_block_runs(server: ServerProcess, samples: Path) -> None:
    blocks = python_blocks()
    assert blocks
    for page, block in blocks:
        # The pages' own server addresses and sample folder, as `make demo` leaves them.
        code = (block.replace("localhost:8001", server.url)
                .replace("localhost:8000", str(server.http_url))
                .replace("samples/", f"{samples}/"))
        if "tritonclient.grpc" in code:
            # in a process of its own: tritonclient's generated modules and onnxserve's
            # (imported here) register the same proto file names
            done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                  text=True, timeout=120)
            assert done.returncode == 0 and done.stdout.strip(), (page.name, done.stderr)
            continue
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, str(page.relative_to(ROOT)), "exec"), {})
        assert printed.getvalue().strip(), (page.name, block)


def test_every_curl_command_answers(server: ServerProcess) -> None:
    """The pages' curl commands, run against this session's server (HTTP/REST)."""
    import shlex
    import subprocess

    lines = [line for line in shell_lines() if line.startswith("curl ")]
    assert lines
    for line in lines:
        words = [w.replace("localhost:8000", str(server.http_url)) for w in shlex.split(line)]
        result = subprocess.run(words, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0 and result.stdout.strip(), (line, result.stderr)
        assert result.stdout == "200" or '"error"' not in result.stdout, (line, result.stdout)
