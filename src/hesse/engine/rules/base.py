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
from dataclasses import dataclass, replace
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
        extras: Those arguments' values (options such as ``inplace``, constants).
        positions: Where the varying inputs sit among the call's arguments.
        state: Whatever the rule kept from :meth:`Rule.tangent` for :meth:`Rule.term`.
        identity: Whether the only tangent is the identity seed (``d`` = the last axis).
    """

    fn: Callable[..., torch.Tensor]
    inputs: tuple[torch.Tensor, ...]
    tangents: tuple[torch.Tensor, ...]
    output: torch.Tensor
    call: Any = None
    extra_args: int = 0
    extras: tuple[Any, ...] = ()
    positions: tuple[int, ...] = ()
    state: Any = None
    identity: bool = False


def push_jvp(site: Site) -> torch.Tensor:
    """Tangent of the output by forward-mode AD, vectorised over the ``d`` directions."""
    return vmap(lambda *ts: jvp(site.fn, site.inputs, ts)[1])(*site.tangents)


def hvp_directions(site: Site, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``d^2 (g . phi) / da^2`` applied to every tangent direction: ``(d, *a.shape)`` each."""

    def grad(*a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return vjp(site.fn, *a)[1](g)

    return vmap(lambda *ts: jvp(grad, site.inputs, ts)[1])(*site.tangents)


# NOTE: [batch-major tangents] The tangent of a batched value ``a`` ``(B, ...)`` is indexed
# ``(d, B, ...)`` (direction first: ``vmap`` and the generic rules see one value per
# direction) but stored batch-major, as the transposed view of a contiguous
# ``(B, d, ...)`` tensor. Elementwise ops keep that layout, Linear and Conv rules run on the
# contiguous ``(B * d, ...)`` tensor behind it, and :func:`per_sample` is then a free view,
# so the per-sample Gram products are contiguous batched GEMMs.


def batch_major(t: torch.Tensor) -> torch.Tensor | None:
    """The contiguous ``(B, d, ...)`` tensor behind a batch-major tangent, or None.

    None also for one direction (``d = 1``), where both layouts are the same memory but
    the transposed view would send ``F.linear`` to a batched GEMM.
    """
    if t.dim() >= 3 and t.shape[0] > 1:
        behind = t.transpose(0, 1)
        if behind.is_contiguous():
            return behind
    return None


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


# NOTE: [Taylor mode] Instead of pulling adjoints back per output, every value can carry
# its second-order Taylor coefficients forward next to its tangents: for the direction
# pairs ``(i, j)`` asked for, ``S_y[p] = phi'(a) S_a[p] + d^2 phi(a)[J_i, J_j]`` (the first
# part is the tangent map applied to ``S``, the second is zero for linear ops). Pairs are
# ``(i, i)`` for diagonals, ``i <= j`` for Hessians, or the collapsed sum over ``i == j``
# for Laplacians (one coefficient). Only linear ops, elementwise ops and products of two
# branches have exact closed forms here; other curved ops send the call to the Gram form.
# There is no backward pass, so the cost does not grow
# with the number of outputs: the mode for small ``d`` and many outputs.

Pairs = tuple[torch.Tensor, torch.Tensor] | None  # (i, j) indices; None: sum over i == j


class Diagonal(tuple):
    """The pairs ``(i, i)`` of every direction: rules may square tangents, not index them."""


def diagonal_pairs(d: int, device: torch.device) -> Diagonal:
    """``(arange(d), arange(d))``, marked as the whole diagonal."""
    i = torch.arange(d, device=device)
    return Diagonal((i, i))


class NoTaylorRule(Exception):
    """The op has no exact Taylor-mode rule (internal; the engine uses the Gram form)."""


class Rule:
    """Base rule: tangents by forward mode, second-order term by Hessian-vector products.

    Correct for any differentiable op (the *generic* rule). Subclasses set
    ``linear = True`` when the op has no second-order term, or override the methods with
    closed forms.
    """

    name = "generic"
    linear = False

    def prepare(self, args: tuple, kwargs: dict) -> Any:
        """State the rule keeps from the call's arguments (e.g. a weight); None: nothing."""
        return None

    def cost_kind(self, inputs: int, same_shape: bool) -> tuple[str | None, bool]:
        """What the cost model counts for this node, and whether Taylor mode is exact.

        Args:
            inputs: How many of the node's inputs carry tangents.
            same_shape: Whether its one varying input has the output's shape.

        Returns:
            ``"term"`` (a closed-form second-order term of the input's size), ``"generic"``
            (Hessian-vector products of the op itself) or ``None`` (no term); and whether
            the node has an exact Taylor-mode rule.
        """
        return (None, True) if self.linear else ("generic", False)

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

    def push(self, site: Site, coeffs: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
        """The tangent map applied to other coefficients ``(P, *a.shape)`` (None: zeros)."""
        given = [c for c in coeffs if c is not None]
        if not given:
            return None
        p = given[0].shape[0]
        filled = tuple(
            c if c is not None else a.new_zeros(p, *a.shape)
            for c, a in zip(coeffs, site.inputs, strict=True)
        )
        return self.tangent(replace(site, tangents=filled, identity=False))

    def second(
        self, site: Site, coeffs: Sequence[torch.Tensor | None], pairs: Pairs
    ) -> torch.Tensor | None:
        """Second-order coefficients of the output (see NOTE: [Taylor mode]).

        Raises:
            NoTaylorRule: A curved op without a closed form. (Forward-over-forward AD is
                not used: it is silently wrong for some ops, e.g. ``layer_norm`` and
                ``batch_norm`` in torch 2.13, pytorch#196700, #196699, #198017.)
        """
        if not self.linear:
            raise NoTaylorRule(self.name)
        return self.push(site, coeffs)

    def transpose(self, site: Site, gdot: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``phi'(a)^T gdot`` for every direction: one ``(d, *a.shape)`` per input."""
        _, pull = vjp(site.fn, *site.inputs)
        return vmap(pull)(gdot)

    def curvature(self, site: Site, g: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """``d^2 (g . phi) / da^2 J_a`` per input, or None for linear ops."""
        return None if self.linear else hvp_directions(site, g)
