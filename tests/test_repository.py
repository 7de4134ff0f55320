"""The repository itself: no merge-conflict markers left in the docs, sources or tests."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^(<{7} |>{7} |={7}$)", re.MULTILINE)


def test_no_conflict_markers() -> None:
    files = [ROOT / "README.md", *ROOT.glob("benchmarks/**/*.md")]
    files += [*ROOT.glob("src/**/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("*.toml")]
    assert len(files) > 20  # the globs found the tree
    marked = [str(p.relative_to(ROOT)) for p in files if MARKER.search(p.read_text())]
    assert not marked, f"merge-conflict markers in {marked}"
