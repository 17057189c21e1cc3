"""The pages of the documentation that the README tests hold to their rules."""

from __future__ import annotations

import re
from pathlib import Path

from support import ROOT


def docs_pages() -> list[Path]:
    """The entry page and every page of the manual: each is held to the same rules."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shell_lines() -> list[str]:
    """Every command in the pages' sh blocks, without its comment."""
    blocks = [block for page in docs_pages()
              for block in re.findall(r"```sh\n(.*?)```", page.read_text(), re.S)]
    return [line.split("  #", 1)[0].strip() for block in blocks for line in block.splitlines()
            if line.strip()]
