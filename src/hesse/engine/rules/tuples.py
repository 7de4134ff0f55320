"""Ops that return several tensors (``chunk``, ``split``, ``unbind``), and indexing into them.

A tuple-valued node's tangent is the tuple of its elements' tangents, each
``(d, *element.shape)``; ``operator.getitem`` on it picks one. Splitting is linear, so
the tangents are the op applied to the input's tangent over every direction
(``torch.vmap`` shifts the op's ``dim`` past the direction axis, for either layout of
the tangent: see NOTE: [batch-major tangents] in :mod:`.base`); the elements are views of
the input's tangent. In the reverse sweep the adjoints' tangents travel back as tuples
whose unread elements are ``None``, and the split's transpose concatenates them (zeros
where ``None``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.func import vjp, vmap

from .base import Rule, Site

SPLIT_OPS = ("chunk", "split", "unbind", "tensor_split", "split_with_sizes", "hsplit", "vsplit")


def is_tensors(value: Any) -> bool:
    """Whether ``value`` is a tuple or list of floating tensors (a split's result)."""
    return (
        isinstance(value, (tuple, list))
        and len(value) > 0
        and all(isinstance(v, torch.Tensor) and v.is_floating_point() for v in value)
    )


class SplitRule(Rule):
    """``chunk``/``split``/``unbind``/``tensor_split`` of one varying tensor: linear."""

    linear = True

    def __init__(self, name: str):
        self.name = name

    def tangent(self, site: Site) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        """The split of every direction: a tuple of ``(d, *element.shape)``."""
        if len(site.tangents) != 1:
            raise TypeError(f"{self.name}: expected one varying tensor")
        return tuple(vmap(site.fn)(site.tangents[0]))

    def push(self, site: Site, coeffs: Sequence[Any]) -> Any:
        """The split of other coefficients ``(P, *a.shape)`` (None: None)."""
        (coeff,) = coeffs
        return None if coeff is None else tuple(vmap(site.fn)(coeff))

    def transpose(self, site: Site, gdot: Any) -> tuple[torch.Tensor, ...]:
        """The elements' adjoint tangents put back together (zeros for unread elements)."""
        (a,) = site.inputs
        outs = site.output
        given = next(g for g in gdot if g is not None)
        d = given.shape[0]
        filled = tuple(
            g if g is not None else o.new_zeros(d, *o.shape)
            for g, o in zip(gdot, outs, strict=True)
        )
        _, pull = vjp(site.fn, a)
        return vmap(pull)(filled)


class ItemRule(Rule):
    """``getitem``: an element of a split's tuple, or indexing a tensor (linear either way)."""

    linear = True

    def __init__(self, name: str = "getitem"):
        self.name = name

    @staticmethod
    def _index(site: Site) -> int | None:
        """The element picked from a tuple input, or None for tensor indexing."""
        if len(site.inputs) == 1 and isinstance(site.inputs[0], (tuple, list)):
            return int(site.extras[0])
        return None

    def tangent(self, site: Site) -> torch.Tensor:
        """The element's tangent (or the indexed tangent over every direction)."""
        i = self._index(site)
        return super().tangent(site) if i is None else site.tangents[0][i]

    def push(self, site: Site, coeffs: Sequence[Any]) -> torch.Tensor | None:
        """The element's coefficients."""
        i = self._index(site)
        if i is None:
            return super().push(site, coeffs)
        (coeff,) = coeffs
        return None if coeff is None else coeff[i]

    def transpose(self, site: Site, gdot: torch.Tensor) -> tuple[Any, ...]:
        """A tuple with ``gdot`` at the element and None elsewhere."""
        i = self._index(site)
        if i is None:
            return super().transpose(site, gdot)
        parts: list[torch.Tensor | None] = [None] * len(site.inputs[0])
        parts[i] = gdot
        return (tuple(parts),)


def accumulate(old: Any, new: Any) -> Any:
    """``old + new`` for tangents, or elementwise for tuples holding None."""
    if old is None:
        return new
    if new is None:
        return old
    if isinstance(old, tuple):
        return tuple(accumulate(a, b) for a, b in zip(old, new, strict=True))
    return old + new
