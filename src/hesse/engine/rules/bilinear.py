"""Products of tensors: ``a * b``, ``a @ b``, ``a / b``.

With one varying argument (a product with a constant) the op is linear and has no
second-order term; with two (products of branches, attention scores) the generic term
couples the branches' tangents.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.func import vmap

from .base import Diagonal, NoTaylorRule, Pairs, Rule, Site


class BilinearRule(Rule):
    """An op linear in each of its tensor arguments taken alone."""

    def __init__(self, name: str, linear_positions: tuple[int, ...] | None = None):
        self.name = name
        self.linear_positions = linear_positions  # None: linear in any single argument

    def cost_kind(self, inputs: int, same_shape: bool) -> tuple[str | None, bool]:
        """No counted term; Taylor mode is exact for one varying argument or two."""
        return None, inputs < 2 or (inputs == 2 and self.linear_positions is None)

    def _linear_here(self, site: Site) -> bool:
        single = len(site.tangents) == 1
        return single and (self.linear_positions is None or site.positions == self.linear_positions)

    def term(self, site: Site, g: torch.Tensor, batch: int, diag: bool) -> torch.Tensor | None:
        """None when one argument varies (and it is one the op is linear in)."""
        return None if self._linear_here(site) else super().term(site, g, batch, diag)

    def curvature(self, site: Site, g: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """None when one argument varies (and it is one the op is linear in)."""
        return None if self._linear_here(site) else super().curvature(site, g)

    def second(
        self, site: Site, coeffs: Sequence[torch.Tensor | None], pairs: Pairs
    ) -> torch.Tensor | None:
        """``B(S_a, b) + B(a, S_b) + B(J_a,i, J_b,j) + B(J_a,j, J_b,i)`` for ``y = B(a, b)``.

        See NOTE: [Taylor mode]; only the tangent map when one argument varies.
        """
        if self._linear_here(site):
            return self.push(site, coeffs)
        if len(site.tangents) != 2 or self.linear_positions is not None:
            raise NoTaylorRule(self.name)
        ja, jb = site.tangents
        both = vmap(site.fn)
        if pairs is None:
            cross = 2 * both(ja, jb).sum(0, keepdim=True)
        elif isinstance(pairs, Diagonal):
            cross = 2 * both(ja, jb)
        else:
            i, j = pairs
            cross = both(ja[i], jb[j]) + both(ja[j], jb[i])
        lin = self.push(site, coeffs)
        return cross if lin is None else lin + cross
