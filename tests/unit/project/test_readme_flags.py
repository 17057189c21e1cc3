"""The flag table of `onnxserve serve` (docs/serving.md) lists exactly the flags the command takes,
with the environment variable each one reads."""

from __future__ import annotations

import argparse
import re

from support.doc_pages import docs_pages

from onnxserve.serving.cli import build_parser
from onnxserve.serving.triton_flags import ALIASES


def _serve_parser() -> argparse.ArgumentParser:
    subparsers = next(a for a in build_parser()._actions
                      if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices["serve"]


HEADER = "| flag | environment | default | meaning |"


def _table() -> dict[str, str]:
    """Each flag in the table -> its row's environment cell. The table lives on one page of
    README.md and docs/ (docs/serving.md): two would drift apart."""
    pages = [page for page in docs_pages() if HEADER in page.read_text()]
    assert [page.name for page in pages] == ["serving.md"], pages
    table = pages[0].read_text().split(HEADER, 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        flag_cell, env_cell = line.split("|")[1:3]
        for flag in re.findall(r"--[a-z0-9-]+", flag_cell):
            rows[flag] = env_cell
    return rows


def test_the_flag_table_lists_every_serve_flag() -> None:
    parser = _serve_parser()
    documented = _table()
    flags = {option for action in parser._actions if action.help != argparse.SUPPRESS
             for option in action.option_strings if option.startswith("--")} - {"--help"}
    flags -= set(ALIASES)  # Triton's names for these settings: docs/triton.md lists them
    assert set(documented) == flags, (sorted(flags - set(documented)),
                                      sorted(set(documented) - flags))
    for action in parser._actions:
        if action.help in (None, argparse.SUPPRESS) or "--help" in action.option_strings:
            continue
        named = re.search(r"env (ONNXSERVE_[A-Z0-9_]+)", action.help)
        for option in action.option_strings:
            if option.startswith("--no-"):
                continue
            if named:
                assert named.group(1) in documented[option], option
