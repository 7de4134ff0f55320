"""Strategies built on ``torch.func``: forward-over-reverse and reverse-over-reverse.

Both vectorise the work items of a block with :func:`torch.func.vmap`, so one block is one
batched pass through the model instead of ``r`` Python-level passes.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import ClassVar

import torch
from torch.func import jvp, vjp, vmap

from .base import Capabilities, Fn, ProductStrategy, register_strategy

# torch scripts its forward-mode decompositions the first time jvp runs, which emits
# torch's own DeprecationWarning about torch.jit.script; load them once, quietly.
with warnings.catch_warnings(), contextlib.suppress(ImportError):
    warnings.simplefilter("ignore", DeprecationWarning)
    import torch._decomp.decompositions_for_jvp


def _gradient(fn: Fn, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per-sample gradient of ``u . F(x)``: shape ``(b, n)``."""
    return vjp(fn, x)[1](u)[0]


class _FunctorchBase(ProductStrategy):
    """Shared pieces: vector-Jacobian products by ``vmap(vjp)``."""

    def vjps(self, fn: Fn, x: torch.Tensor, u: torch.Tensor, create_graph: bool) -> torch.Tensor:
        """Vector-Jacobian products, ``(r, b, m)`` to ``(r, b, n)``, one forward pass."""
        _, pull = vjp(fn, x)
        return vmap(lambda ui: pull(ui)[0])(u)


class ForwardOverReverse(_FunctorchBase):
    """``vmap`` of ``jvp`` of ``vjp``: Hessian-vector products by forward-over-reverse AD.

    The best general strategy: one Hessian-vector product costs about 2.5 forward passes,
    and a block of them is one vectorised pass. Needs forward-mode rules and vmap support
    for every op of the model.
    """

    name: ClassVar[str] = "vmap"
    capabilities: ClassVar[Capabilities] = Capabilities(vmap=True, forward_ad=True, jvps=True)
    memory_factor: ClassVar[float] = 6.0
    passes_per_item: ClassVar[float] = 4.0
    description: ClassVar[str] = "forward-over-reverse HVPs, vectorised with torch.func.vmap"

    def hvps(
        self, fn: Fn, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, create_graph: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradient ``(b, n)`` of ``u . F`` and HVPs ``(r, b, n)``."""
        g, hv = vmap(lambda vi: jvp(lambda xx: _gradient(fn, xx, u), (x,), (vi,)))(v)
        return g[0], hv

    def jvps(self, fn: Fn, x: torch.Tensor, v: torch.Tensor, create_graph: bool) -> torch.Tensor:
        """Jacobian-vector products, ``(r, b, n)`` to ``(r, b, m)``."""
        return vmap(lambda vi: jvp(fn, (x,), (vi,))[1])(v)


class ReverseOverReverse(_FunctorchBase):
    """``vmap`` of ``vjp`` of ``vjp``: Hessian-vector products by reverse-over-reverse AD.

    About 1.5x the cost of forward-over-reverse, but needs no forward-mode rules: the
    fallback for ops that only have backward formulas.
    """

    name: ClassVar[str] = "reverse"
    capabilities: ClassVar[Capabilities] = Capabilities(vmap=True, forward_ad=False)
    memory_factor: ClassVar[float] = 7.0
    description: ClassVar[str] = "reverse-over-reverse HVPs, vectorised with torch.func.vmap"

    def hvps(
        self, fn: Fn, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, create_graph: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradient ``(b, n)`` and HVPs ``(r, b, n)`` (``H`` is symmetric: ``v^T H = H v``)."""
        g, pull = vjp(lambda xx: _gradient(fn, xx, u), x)
        return g, vmap(lambda vi: pull(vi)[0])(v)


register_strategy(ForwardOverReverse())
register_strategy(ReverseOverReverse())
