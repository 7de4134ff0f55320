"""Elementwise ops: ``y_i = phi(a_i)``.

Tangent: ``J_y = phi'(a) J_a``. Second-order term: ``J_a^T diag(g * phi''(a)) J_a``, one
weighted Gram matrix per sample (one batched GEMM). ``phi'`` and ``phi''`` come from two
nested reverse-mode passes with all-ones cotangents (exact for elementwise ops; reverse
rather than forward mode because some activations, e.g. SiLU, have no forward-mode rule
for their backward), which
honours every module option (Softplus' beta and threshold, ELU's alpha, GELU's
approximation), so registering a new elementwise op costs one line. Piecewise-linear
ops (ReLU, LeakyReLU, Hardtanh, Hardsigmoid, ...) have ``phi'' = 0`` and skip the term.
Ops without a double backward in torch (Hardswish, Hardsigmoid) need a closed form.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.func import vjp

from .. import kernels
from .base import Diagonal, Pairs, Rule, Site, per_sample


def _tanh(a: torch.Tensor, y: torch.Tensor, call) -> tuple[torch.Tensor, torch.Tensor]:
    d1 = 1 - y * y
    return d1, -2 * y * d1


def _sigmoid(a: torch.Tensor, y: torch.Tensor, call) -> tuple[torch.Tensor, torch.Tensor]:
    d1 = y * (1 - y)
    return d1, d1 * (1 - 2 * y)


def _softplus(a: torch.Tensor, y: torch.Tensor, call) -> tuple[torch.Tensor, torch.Tensor]:
    beta, threshold = getattr(call, "beta", 1.0), getattr(call, "threshold", 20.0)
    s = torch.sigmoid(beta * a)
    linear = beta * a > threshold  # softplus returns a itself there
    return torch.where(linear, 1.0, s), torch.where(linear, 0.0, beta * s * (1 - s))


def _exp(a: torch.Tensor, y: torch.Tensor, call) -> tuple[torch.Tensor, torch.Tensor]:
    return y, y


def _sin(a: torch.Tensor, y: torch.Tensor, call) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cos(a), -y


def _cos(a: torch.Tensor, y: torch.Tensor, call) -> tuple[torch.Tensor, torch.Tensor]:
    return -torch.sin(a), -y


def _hardswish(a: torch.Tensor, y: torch.Tensor, call) -> tuple[torch.Tensor, torch.Tensor]:
    # x (x + 3) / 6 on [-3, 3], 0 below, x above: piecewise quadratic, phi'' = 1/3 inside.
    # The masks are those of torch's hardswish_backward (phi' = x / 3 + 1/2 on [-3, 3]).
    inside = (a >= -3) & (a <= 3)
    d1 = torch.where(inside, a / 3 + 0.5, (a > 3).to(a.dtype))
    return d1, inside.to(a.dtype) / 3


def _hardsigmoid(a: torch.Tensor, y: torch.Tensor, call) -> tuple[torch.Tensor, torch.Tensor]:
    # clamp(x + 3, 0, 6) / 6: slope 1/6 on (-3, 3) (torch's hardsigmoid_backward), no curvature
    inside = ((a > -3) & (a < 3)).to(a.dtype)
    return inside / 6, torch.zeros_like(a)


# Closed forms ``(a, y, call) -> (phi'(a), phi''(a))`` for the commonest activations; the
# call is the module or function (for options such as Softplus' beta). Ops with options
# that change the formula are only listed here for the module types that expose them.
# Hardswish and Hardsigmoid need theirs: torch has no double backward for them.
CLOSED_FORMS = {
    "tanh": _tanh,
    "sigmoid": _sigmoid,
    "softplus": _softplus,
    "exp": _exp,
    "sin": _sin,
    "cos": _cos,
    "hardswish": _hardswish,
    "hardsigmoid": _hardsigmoid,
}


def derivatives(fn, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``phi'(a)`` and ``phi''(a)`` of an elementwise ``phi``, each shaped like ``a``."""
    ones = torch.ones_like(a)
    d1, pull = vjp(lambda t: vjp(fn, t)[1](ones)[0], a)
    return d1, pull(ones)[0]


class ElementwiseRule(Rule):
    """A smooth elementwise op (tanh, softplus, GELU, SiLU, exp, ...)."""

    name = "elementwise"
    curvature_on = True

    def __init__(self, name: str):
        self.name = name

    def tangent(self, site: Site) -> torch.Tensor:
        """``phi'(a) * J``; keeps ``phi''(a)`` for the term."""
        if len(site.tangents) != 1 or site.inputs[0].shape != site.output.shape:
            site.state = None
            return super().tangent(site)
        closed = CLOSED_FORMS.get(self.name) if self.call_is_plain(site) else None
        a = site.inputs[0]  # the caller's grad mode decides whether d1, d2 keep a graph
        d1, d2 = closed(a, site.output, site.call) if closed else derivatives(site.fn, a)
        site.state = (d1, d2)
        return d1 * site.tangents[0]

    def cost_kind(self, inputs: int, same_shape: bool) -> tuple[str | None, bool]:
        """A term of the input's size (none for ReLU-like ops); Taylor mode on one input."""
        return ("term" if self.curvature_on else None), inputs == 1 and same_shape

    def call_is_plain(self, site: Site) -> bool:
        """Whether the closed form applies: a module, or a function of ``a`` alone.

        Flags (``inplace=False``, as ``nn.Hardswish`` passes it) do not change the formula.
        """
        if isinstance(site.call, torch.nn.Module) or site.extra_args == 0:
            return True
        return bool(site.extras) and all(isinstance(v, bool) for v in site.extras)

    def term(self, site: Site, g: torch.Tensor, batch: int, diag: bool) -> torch.Tensor | None:
        """``J^T diag(g phi'') J`` per sample, or its diagonal."""
        if site.state is None:
            return super().term(site, g, batch, diag)
        if not self.curvature_on:
            return None
        jt = per_sample(site.tangents[0], batch)  # (B, d, I)
        w = (g * site.state[1]).reshape(batch, 1, -1)
        if diag:
            return kernels.run("gram_diag", jt, w)
        return torch.bmm(jt * w, jt.transpose(1, 2))

    def second(
        self, site: Site, coeffs: Sequence[torch.Tensor | None], pairs: Pairs
    ) -> torch.Tensor | None:
        """``phi'(a) S + phi''(a) J_i J_j`` (see NOTE: [Taylor mode])."""
        if site.state is None:
            return super().second(site, coeffs, pairs)
        (coeff,), (t,) = coeffs, site.tangents
        d1, d2 = site.state
        if not self.curvature_on:
            return None if coeff is None else d1 * coeff
        if pairs is None:  # the Laplacian: one fused kernel (see .kernels)
            if coeff is None:
                return kernels.run("taylor_first", d2, t)
            return kernels.run("taylor_collapsed", d1, d2, t, coeff)
        if isinstance(pairs, Diagonal):
            curv = d2 * (t * t)
        else:
            i, j = pairs
            curv = d2 * (t[i] * t[j])
        return curv if coeff is None else torch.addcmul(curv, d1, coeff)

    def transpose(self, site: Site, gdot: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``phi'(a) * gdot``."""
        if site.state is None:
            return super().transpose(site, gdot)
        return (site.state[0] * gdot,)

    def curvature(self, site: Site, g: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """``phi''(a) * g * J_a``."""
        if site.state is None:
            return super().curvature(site, g)
        if not self.curvature_on:
            return None
        return (site.state[1] * g * site.tangents[0],)


class PiecewiseLinearRule(ElementwiseRule):
    """ReLU-like ops: ``phi''`` is zero almost everywhere, so there is no term."""

    curvature_on = False
