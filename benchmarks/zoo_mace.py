"""MACE in the zoo benchmark (filled in below)."""

from __future__ import annotations

import argparse
from typing import Any


def run(args: argparse.Namespace) -> dict[str, Any]:
    return {"status": "skipped", "note": "not yet"}
