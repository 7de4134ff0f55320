"""The model zoo, for the tests: it lives in ``benchmarks/zoo_models.py`` (shared)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the `benchmarks` package

from benchmarks.zoo_models import ATOMS, ZOO, Bound, ZooCase, math_attention, reference_twin

__all__ = ["ATOMS", "ZOO", "Bound", "ZooCase", "math_attention", "reference_twin"]
