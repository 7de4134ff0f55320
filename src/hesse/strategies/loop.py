"""The loop strategy: ``torch.autograd.grad`` one work item at a time.

Works on anything autograd can differentiate twice, including code that ``vmap`` rejects
(``.item()``, in-place updates of captured tensors, data-dependent control flow) and
TorchScript. The forward pass and each gradient are computed once per block and reused.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import Capabilities, Fn, ProductStrategy, register_strategy


def _grad(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, create_graph: bool):
    """``w^T d out / d x``, zeros (never ``None``) when ``out`` does not depend on ``x``."""
    if not out.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(
        out,
        x,
        w,
        retain_graph=True,
        create_graph=create_graph,
        allow_unused=True,
        materialize_grads=True,
    )
    return g


class AutogradLoop(ProductStrategy):
    """Row-by-row ``torch.autograd.grad``: the widest operator coverage, the slowest."""

    name: ClassVar[str] = "loop"
    capabilities: ClassVar[Capabilities] = Capabilities(
        vmap=False, forward_ad=False, sequential=True
    )
    memory_factor: ClassVar[float] = 4.0
    item_overhead: ClassVar[float] = 5e6
    description: ClassVar[str] = "torch.autograd.grad row by row (no vmap, no forward AD)"

    def _leaf(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.requires_grad else x.detach().requires_grad_(True)

    def vjps(self, fn: Fn, x: torch.Tensor, u: torch.Tensor, create_graph: bool) -> torch.Tensor:
        """Vector-Jacobian products, ``(r, b, m)`` to ``(r, b, n)``."""
        with torch.enable_grad():
            xl = self._leaf(x)
            out = fn(xl)
            return torch.stack([_grad(out, xl, ui, create_graph) for ui in u])

    def hvps(
        self, fn: Fn, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, create_graph: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradient ``(b, n)`` of ``u . F`` and HVPs ``(r, b, n)``, one backward each."""
        with torch.enable_grad():
            xl = self._leaf(x)
            g = _grad(fn(xl), xl, u, create_graph=True)
            products = torch.stack([_grad(g, xl, vi, create_graph) for vi in v])
        return g, products


register_strategy(AutogradLoop())
