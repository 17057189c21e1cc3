"""The pages of the documentation that the README tests hold to their rules."""

from __future__ import annotations

from pathlib import Path

from conftest import ROOT


def docs_pages() -> list[Path]:
    """The entry page and every page of the manual: each is held to the same rules."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
