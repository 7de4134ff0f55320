"""What a per-op rule does, and the shared machinery of the generic rules.

Every captured node maps its inputs ``a`` (values) to an output ``y = phi(a)``. The engine
carries, for every value that depends on the input ``x``, its *tangent*: the Jacobian
``J = da/dx`` stored as ``(d, *a.shape)`` (one slice per input direction). A rule

- pushes tangents forward: ``J_y = phi'(a) J_a`` (:meth:`Rule.tangent`);
- contributes its second-order term to the Hessian of the selected output ``s``
  (:meth:`Rule.term`): with ``g = ds/dy`` from one backward pass,

      H += J_a^T  (d^2 (g . phi) / da^2)  J_a          (the structured formula)

  which is zero for ops that are linear in their inputs.

Tangents of several inputs are handled together (``a`` is the tuple of the inputs that
carry tangents). The functions here work for *any* differentiable op through
``torch.func``; rule classes override them with cheaper closed forms where they exist.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import jvp, vjp, vmap


@dataclass
class Site:
    """One evaluated node, as its rule sees it.

    Attributes:
        fn: The op as a function of the inputs that carry tangents only.
        inputs: Those inputs' values.
        tangents: Their tangents, each ``(d, *input.shape)``.
        output: The op's output value.
        call: The module or function the node calls.
        extra_args: How many arguments besides the varying inputs the call received.
        positions: Where the varying inputs sit among the call's arguments.
        state: Whatever the rule kept from :meth:`Rule.tangent` for :meth:`Rule.term`.
    """

    fn: Callable[..., torch.Tensor]
    inputs: tuple[torch.Tensor, ...]
    tangents: tuple[torch.Tensor, ...]
    output: torch.Tensor
    call: Any = None
    extra_args: int = 0
    positions: tuple[int, ...] = ()
    state: Any = None


def push_jvp(site: Site) -> torch.Tensor:
    """Tangent of the output by forward-mode AD, vectorised over the ``d`` directions."""
    return vmap(lambda *ts: jvp(site.fn, site.inputs, ts)[1])(*site.tangents)


def hvp_directions(site: Site, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``d^2 (g . phi) / da^2`` applied to every tangent direction: ``(d, *a.shape)`` each."""

    def grad(*a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return vjp(site.fn, *a)[1](g)

    return vmap(lambda *ts: jvp(grad, site.inputs, ts)[1])(*site.tangents)


def per_sample(t: torch.Tensor, batch: int) -> torch.Tensor:
    """``(d, *shape)`` with the batch first in ``shape`` to ``(batch, d, features)``."""
    return t.reshape(t.shape[0], batch, -1).transpose(0, 1)


def pair_term(
    left: Sequence[torch.Tensor], right: Sequence[torch.Tensor], batch: int, diag: bool
) -> torch.Tensor:
    """``sum_inputs  L^T R`` per sample: ``(B, d, d)``, or only its diagonal ``(B, d)``."""
    total = None
    for lt, rt in zip(left, right, strict=True):
        lt, rt = per_sample(lt, batch), per_sample(rt, batch)
        part = (lt * rt).sum(-1) if diag else torch.bmm(lt, rt.transpose(1, 2))
        total = part if total is None else total + part
    return total  # type: ignore[return-value]


class Rule:
    """Base rule: tangents by forward mode, second-order term by Hessian-vector products.

    Correct for any differentiable op (the *generic* rule). Subclasses set
    ``linear = True`` when the op has no second-order term, or override the methods with
    closed forms.
    """

    name = "generic"
    linear = False

    def tangent(self, site: Site) -> torch.Tensor:
        """Tangent of the output, ``(d, *output.shape)``."""
        return push_jvp(site)

    def term(self, site: Site, g: torch.Tensor, batch: int, diag: bool) -> torch.Tensor | None:
        """This op's part of the Hessian: ``(B, d, d)``, or ``(B, d)`` when ``diag``."""
        if self.linear:
            return None
        return pair_term(hvp_directions(site, g), site.tangents, batch, diag)

    # NOTE: [reverse sweep] Forward-over-reverse by rules: the adjoint's tangent
    # ``gdot = d(adjoint)/dx . e_p`` flows back through each op as
    #     gdot_a = phi'(a)^T gdot_y  +  d^2(g . phi)/da^2 J_a
    # (the transpose of the op, plus its curvature applied to the input's tangent); at the
    # input it is the Hessian. Cost ~2 d forward passes, no d^2 terms.

    def transpose(self, site: Site, gdot: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``phi'(a)^T gdot`` for every direction: one ``(d, *a.shape)`` per input."""
        _, pull = vjp(site.fn, *site.inputs)
        return vmap(pull)(gdot)

    def curvature(self, site: Site, g: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """``d^2 (g . phi) / da^2 J_a`` per input, or None for linear ops."""
        return None if self.linear else hvp_directions(site, g)
