"""The progress bar of a streamed run (rank 0), counting the blocks of every process."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from hesse.errors import HesseError

from . import manifest as mf
from .schedule import Block


def _bar(enabled: bool, blocks: list[Block], initial: int) -> Any:
    """A tqdm bar over samples (or Hessian rows), with rate and ETA."""
    from tqdm.auto import tqdm

    unit = "row" if blocks and blocks[0].r1 - blocks[0].r0 > 1 else "sample"
    total = sum(b.size for b in blocks)
    return tqdm(total=total, initial=initial, unit=unit, disable=not enabled, desc="hesse")


def _advance(bar: Any, path: Path, blocks: list[Block], before: set[int]) -> None:
    """Set the bar to the blocks every process has recorded (read from their parts)."""
    done: set[int] = set()
    for part in mf.part_paths(path):
        with contextlib.suppress(HesseError):
            done |= set(mf.read_manifest(part).done)
    units = sum(blocks[i].size for i in done | before)
    bar.update(max(0, units - bar.n))
