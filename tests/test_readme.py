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
        # The README's own server addresses and sample folder, as `make demo` leaves them.
        code = (block.replace("localhost:8001", server.url)
                .replace("localhost:8000", str(server.http_url))
                .replace("samples/", f"{samples}/"))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "README.md", "exec"), {})
        assert printed.getvalue().strip(), block


def shell_lines() -> list[str]:
    """Every command in README's sh blocks, without its comment."""
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line.split("  #", 1)[0].strip() for block in blocks for line in block.splitlines()
            if line.strip()]


def test_every_shell_command_names_what_exists() -> None:
    """Commands too long or networked to run here are checked for what would break them:
    an unknown make target, flag or file."""
    import shlex

    from onnxserve.clients.classify import build_parser as classify_parser
    from onnxserve.serving.cli import build_parser

    makefile = (ROOT / "Makefile").read_text()
    checked = 0
    for line in shell_lines():
        words = shlex.split(line)
        if words[0] == "make":
            assert re.search(rf"^{re.escape(words[1])}:", makefile, re.M), line
        elif words[0].endswith("onnxserve"):
            # `make` installs into .venv, which is not on PATH: a bare name is not found
            assert words[0] == ".venv/bin/onnxserve", line
            build_parser().parse_args(words[1:])
        elif words[0].endswith("python") and words[1] == "clients/classify.py":
            assert words[0] == ".venv/bin/python", line
            classify_parser().parse_args(words[2:])
        elif words[0] == "curl":  # run by test_every_curl_command_answers
            assert any(w.startswith("localhost:8000/") for w in words), line
        elif words[0] in ("docker", "kubectl"):
            for flag in ("-f", "-k"):
                if flag in words:
                    assert (ROOT / words[words.index(flag) + 1]).exists(), line
        else:
            raise AssertionError(f"README command of no known kind: {line}")
        checked += 1
    assert checked >= 20


def test_every_curl_command_answers(server: ServerProcess) -> None:
    """README's curl commands, run against this session's server (HTTP/REST)."""
    import shlex
    import subprocess

    lines = [line for line in shell_lines() if line.startswith("curl ")]
    assert lines
    for line in lines:
        words = [w.replace("localhost:8000", str(server.http_url)) for w in shlex.split(line)]
        result = subprocess.run(words, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0 and result.stdout.strip(), (line, result.stderr)
        assert result.stdout == "200" or '"error"' not in result.stdout, (line, result.stdout)
