"""``v^T H v`` for many directions from the structured engine's Taylor mode.

:func:`hesse.laplacian_estimate` uses it when the engine runs the model: the tangents
start as the random directions (not the identity), and one forward pass pushes one
second-order coefficient per direction (NOTE: [Taylor mode] in
:mod:`hesse.engine.rules.base`), with no ``vmap`` over directions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..engine import CaptureError, directional_pass
from ..planning.problem import Problem
from ..strategies.structured import cost

Second = Callable[[torch.Tensor], torch.Tensor]


def engine_second(problem: Problem, create_graph: bool) -> Second | None:
    """``V`` ``(k, B, n) -> (B, k, m)``, ``v^T H v`` per direction, or None.

    None where the engine cannot take the model: it was not captured, or a curved op
    has no closed Taylor rule (the caller then uses ``jvp`` of ``jvp``).
    """
    bound = problem.anchor
    try:
        if bound is None or not cost(problem).taylor:
            return None
        graph = bound.graph
    except CaptureError:
        return None
    shape = tuple(problem.in_shape)
    xf = problem.x

    def to_model(t: torch.Tensor) -> torch.Tensor:
        return t.reshape((t.shape[0], *shape) if problem.batched else shape)

    def second(v: torch.Tensor) -> torch.Tensor:
        out = directional_pass(graph, bound.inputs, xf, to_model, problem.index, v, create_graph)
        return out.transpose(1, 2)

    return second
