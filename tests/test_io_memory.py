"""Memory of streamed runs: nothing kept alive from one block to the next.

A row-block Hessian calls :func:`hesse.hvp` once per block, each time on new tensors; a
reference kept per call (the planner's forward profile once kept its saved activations
alive through a cycle the garbage collector cannot see) grows the process by a block's
activations every block, far past ``max_memory`` over a long run.
"""

from __future__ import annotations

import gc

import torch

from hesse.io import hessian_rows
from hesse.planning.memory import profile_forward
from io_models import mlp


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def test_forward_profile_keeps_nothing_alive() -> None:
    model = mlp().double()  # Tanh saves its own output: the case of the cycle
    model(torch.randn(1, 6))
    profile_forward(model, torch.randn(1, 6))
    before = _live_tensors()
    for _ in range(3):
        profile_forward(model, torch.randn(1, 6))
    assert _live_tensors() == before


def test_row_blocks_keep_nothing_alive() -> None:
    model, x = mlp().double(), torch.randn(6, dtype=torch.float64)
    hessian_rows(model, x, slice(0, 2), output=1, batched=True, strategy="reverse")
    before = _live_tensors()
    for r0 in (2, 4):
        hessian_rows(model, x, slice(r0, r0 + 2), output=1, batched=True, strategy="reverse")
    assert _live_tensors() == before
