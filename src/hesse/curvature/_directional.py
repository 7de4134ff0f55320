"""``v^T H v`` for many directions from the structured engine.

:func:`hesse.laplacian_estimate` uses it when the engine captures the model: the tangents
start as the random directions (not the identity), and one pass gives one value per
direction, in the Gram form or Taylor mode (:func:`hesse.engine.modes.directional_pass`),
with no ``vmap`` over directions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..engine import GraphCost, directional_pass
from ..planning.problem import Problem
from ..strategies.structured import cost

Second = Callable[[torch.Tensor], torch.Tensor]


# An elementwise term entry against a GEMM multiply-add (strided, memory-bound, and its
# backward under create_graph); fitted on CPU where the Gram form and Taylor mode cross
# (a tanh MLP 1000-128x4-m, 64 directions: m = 4-5).
ELEMENTWISE = 50
PASS_BYTES = 1 << 28  # tangents of one pass through every node; more directions: chunks


def engine_second(problem: Problem, create_graph: bool) -> tuple[Second, int] | None:
    """``V`` ``(k, B, n) -> (B, k, m)``, ``v^T H v`` per direction, and directions per pass.

    None where the engine cannot take the model (it was not captured); the caller then
    uses ``jvp`` of ``jvp``. Each pass picks the engine's mode by :func:`mode`; more
    directions than fit in ``PASS_BYTES`` of tangents run in several passes.
    """
    bound = problem.anchor
    try:
        if bound is None:
            return None
        graph, facts = bound.graph, cost(problem)
    except Exception:  # CaptureError, or anything the engine's analysis trips on
        return None
    shape = tuple(problem.in_shape)
    xf = problem.x

    def to_model(t: torch.Tensor) -> torch.Tensor:
        return t.reshape((t.shape[0], *shape) if problem.batched else shape)

    def one(v: torch.Tensor) -> torch.Tensor:
        how = mode(facts, problem.m, v.shape[0])
        out = directional_pass(
            graph, bound.inputs, xf, to_model, problem.index, v, how, create_graph
        )
        return out.transpose(1, 2)

    entries = problem.batch * max(facts.total_size, problem.n) * xf.element_size()
    per_pass = max(1, PASS_BYTES // entries)

    def second(v: torch.Tensor) -> torch.Tensor:
        if v.shape[0] <= per_pass:
            return one(v)
        return torch.cat([one(part) for part in v.split(per_pass)], dim=1)

    return second, per_pass


def mode(facts: GraphCost, m: int, k: int) -> str:
    """``"gram"`` or ``"taylor"`` for ``k`` directions and ``m`` outputs.

    Both push the ``k`` tangents. Taylor mode adds ``k`` coefficients through every layer
    (about ``k`` forward passes, in GEMMs); the Gram form one backward pass per output
    (about two forward passes) and ``k`` elementwise terms per curved entry and output,
    each weighed as ``ELEMENTWISE`` multiply-adds of a GEMM. Ops without a closed Taylor
    rule leave the Gram form (generic terms).
    """
    if not facts.taylor:
        return "gram"
    f = facts.forward_macs
    terms = sum(facts.term_sizes) + 10 * sum(facts.generic_sizes)
    return "gram" if m * (2 * f + ELEMENTWISE * k * terms) <= k * f else "taylor"
