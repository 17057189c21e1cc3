"""README.md's and the docs/ pages' commands name what exists, and their links lead somewhere
(their code blocks run against a server: tests/served/test_readme_served.py)."""

from __future__ import annotations

import re
from pathlib import Path

from support import ROOT
from support.doc_pages import docs_pages, shell_lines


def test_the_manual_has_its_pages() -> None:
    names = {page.name for page in docs_pages()}
    assert {"README.md", "serving.md", "http.md", "streaming-and-shared-memory.md",
            "model-repository.md", "export.md", "clients.md", "benchmarks.md",
            "operating.md", "gpu.md", "deploying.md", "layout.md"} <= names
    # the entry page leads to every page of the manual
    readme = (ROOT / "README.md").read_text()
    for page in docs_pages()[1:]:
        assert f"](docs/{page.name})" in readme, page.name


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
            raise AssertionError(f"command of no known kind in the docs: {line}")
        checked += 1
    assert checked >= 20


def test_the_entry_page_keeps_the_two_commands() -> None:
    lines = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[0]
    assert [line.split()[:2] for line in lines.splitlines()] == [["make", "demo"],
                                                                 ["make", "test"]]


def _anchors(page: Path) -> set[str]:
    """The anchors a Markdown renderer gives the page's headings (GitHub's rule: lower case,
    punctuation but '-' and '_' dropped, spaces made '-')."""
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.*)$", page.read_text(), re.M)}


def test_every_relative_link_leads_to_a_file_and_heading() -> None:
    """A page moved or a heading renamed must not leave a link pointing at nothing."""
    checked = 0
    for page in [*docs_pages(), ROOT / "benchmarks" / "README.md"]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), (page.name, target)
            if anchor:
                assert anchor in _anchors(linked), (page.name, target)
            checked += 1
    assert checked >= 15


def test_the_layout_names_every_module() -> None:
    """docs/layout.md's table and list name each module of serving/ and benchmarks/, so a
    module added or renamed shows up there too."""
    layout = (ROOT / "docs" / "layout.md").read_text()
    named = set(re.findall(r"`([a-z_]+)(?:\.py|/)?`", layout))
    for folder in ("serving", "benchmarks"):
        modules = {path.stem for path in (ROOT / folder).rglob("*.py")
                   if path.stem not in ("__init__", "__main__")}
        assert modules <= named, (folder, sorted(modules - named))
