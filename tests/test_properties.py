"""Hypothesis properties over small random MLPs (reliability.md section 5.2, P1-P3).

Structure (depth, widths, input size, activation, batching, strategy, output selection) is
drawn by hypothesis; weights and inputs come from a seeded generator (fast, reproducible).
The reference is nested ``torch.func`` in float64, never hesse itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import hesse
from cases import mlp, seeded
from reference import Ref, assert_close, assert_symmetric, expected, func_reference

ACTIVATIONS = {"tanh": nn.Tanh, "softplus": nn.Softplus, "sigmoid": nn.Sigmoid, "silu": nn.SiLU}
ALL_STRATEGIES = (*hesse.available_strategies(), "auto")
CORE = ("vmap", "reverse", "loop", "auto")


def refused(p: Problem, err: hesse.StrategyError) -> bool:
    """A non-core (e.g. rule-based) strategy may refuse a model with a StrategyError."""
    if p.strategy in CORE:
        return False
    assert str(err).startswith("hesse."), str(err)
    return True


@dataclass
class Problem:
    model: nn.Module
    x: torch.Tensor
    batched: bool
    output: Any
    strategy: str
    description: str

    def ref(self) -> Ref:
        return func_reference(self.model, self.x, self.batched, self.output)

    def kwargs(self) -> dict[str, Any]:
        return {"batched": self.batched, "output": self.output, "strategy": self.strategy}


@st.composite
def problems(draw: st.DrawFn) -> Problem:
    depth = draw(st.integers(1, 3))
    widths = tuple(draw(st.lists(st.integers(2, 8), min_size=depth, max_size=depth)))
    d = draw(st.integers(1, 5))
    m = draw(st.integers(1, 3))
    act = draw(st.sampled_from(sorted(ACTIVATIONS)))
    batched = draw(st.booleans())
    b = draw(st.integers(1, 3))
    output = draw(st.one_of(st.none(), st.integers(0, m - 1)))
    strategy = draw(st.sampled_from(ALL_STRATEGIES))
    seed = draw(st.integers(0, 2**16))
    with seeded(seed):
        model = mlp(d, widths[:-1], widths[-1], ACTIVATIONS[act])
        model = nn.Sequential(model, ACTIVATIONS[act](), nn.Linear(widths[-1], m))
        x = torch.randn(b, d) if batched else torch.randn(d)
    description = (
        f"mlp d={d} widths={widths} m={m} act={act} batched={batched} B={b} "
        f"output={output} strategy={strategy} seed={seed}"
    )
    return Problem(model, x, batched, output, strategy, description)


@given(problems())
def test_hessian_matches_torch_func(p: Problem):
    try:
        got = hesse.hessian(p.model, p.x, **p.kwargs())
        assert_close(got, expected("hessian", p.ref()), name=p.description)
    except hesse.StrategyError as err:
        if not refused(p, err):
            raise


@given(problems())
def test_hessian_symmetric(p: Problem):
    try:
        got = hesse.hessian(p.model, p.x, **p.kwargs(), flat=True)
        assert_symmetric(got, p.x.shape[-1], name=p.description)
    except hesse.StrategyError as err:
        if not refused(p, err):
            raise


@given(problems())
def test_laplacian_is_trace(p: Problem):
    try:
        ref = p.ref()
        got = hesse.laplacian(p.model, p.x, **p.kwargs())
        assert_close(got, expected("laplacian", ref), name=f"laplacian vs ref: {p.description}")
        trace = torch.diagonal(hesse.hessian(p.model, p.x, **p.kwargs()), dim1=-2, dim2=-1).sum(-1)
        assert_close(got, trace, name=f"laplacian vs trace(hesse.hessian): {p.description}")
    except hesse.StrategyError as err:
        if not refused(p, err):
            raise


@given(problems())
def test_hessian_diag_is_diagonal(p: Problem):
    try:
        ref = p.ref()
        got = hesse.hessian_diag(p.model, p.x, **p.kwargs())
        assert_close(got, expected("hessian_diag", ref), name=f"diag vs ref: {p.description}")
        hess = hesse.hessian(p.model, p.x, **p.kwargs())
        diag = torch.diagonal(hess, dim1=-2, dim2=-1)
        assert_close(got, diag, name=f"diag vs diagonal(hesse.hessian): {p.description}")
    except hesse.StrategyError as err:
        if not refused(p, err):
            raise
