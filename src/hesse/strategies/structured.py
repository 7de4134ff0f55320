"""The structured strategy: the engine of :mod:`hesse.structured` behind the registry.

Unlike the product-based strategies it computes whole per-sample results at once
(``compute``), so the engine chunks it over samples only.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .._problem import Problem
from ..structured import CaptureError, capture, graph_cost, structured_pass
from .base import register_strategy

WANTS: dict[str, frozenset[str]] = {
    "jacobian": frozenset({"jacobian"}),
    "hessian": frozenset({"hessian"}),
    "hessian_diag": frozenset({"diag"}),
    "laplacian": frozenset({"laplacian"}),
    "derivatives": frozenset({"hessian", "gradient"}),
    "hvp": frozenset({"hessian"}),  # forms H per sample, then H v: for small inputs
}


class Structured:
    """Per-layer rules on the captured graph: ``H = sum_k J_k^T M_k J_k``, no autograd loop."""

    name: ClassVar[str] = "structured"
    uses_vmap: ClassVar[bool] = True
    uses_forward_ad: ClassVar[bool] = True
    memory_factor: ClassVar[float] = 3.0
    sequential: ClassVar[bool] = False
    description: ClassVar[str] = (
        "structured engine: tangents through the captured graph, per-layer Hessian terms"
    )

    def unsupported(self, problem: Problem, quantity: str, create_graph: bool) -> str | None:
        """Why this strategy cannot run the request, or ``None`` if it can."""
        if quantity not in WANTS:
            return f"computes {', '.join(WANTS)} only, not {quantity}"
        if create_graph:
            return "does not keep a graph (create_graph=True)"
        if problem.model is None:
            return "no model to capture"
        try:
            capture(problem.model)
        except CaptureError as exc:
            return str(exc)
        return None

    def estimate(self, problem: Problem, quantity: str) -> float:
        """Estimated multiply-adds of the call (see :mod:`hesse.structured.cost`)."""
        if "graph_cost" not in problem.cache:
            shape = (1, *problem.in_shape) if problem.batched else problem.in_shape
            x1 = problem.x[:1].reshape(shape)
            captured = capture(problem.model)  # type: ignore[arg-type]
            problem.cache["graph_cost"] = graph_cost(captured, x1, problem.n)
        cost = problem.cache["graph_cost"]
        _, macs = cost.best(quantity, problem.m)
        return problem.batch * macs + cost.overhead(quantity, problem.m)

    def describe(self, problem: Problem, quantity: str) -> str:
        """The engine mode the cost model picks, for plans (after :meth:`estimate`)."""
        mode, _ = problem.cache["graph_cost"].best(quantity, problem.m)
        return f"{mode} mode"

    def compute(
        self, problem: Problem, quantity: str, x: torch.Tensor, v: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Arrays for the sinks, ``(s, items, *tail)``, for the sub-batch ``x`` ``(s, n)``.

        ``v`` (``(s, n)``) is the direction of an ``hvp`` call.
        """
        s = x.shape[0]
        shape = (s, *problem.in_shape) if problem.batched else tuple(problem.in_shape)
        self.estimate(problem, quantity)  # fills the graph cost in the problem's cache
        mode, _ = problem.cache["graph_cost"].best(quantity, problem.m)
        out = structured_pass(
            capture(problem.model),  # type: ignore[arg-type]  # checked by unsupported()
            x,
            lambda t: t.reshape(shape),
            s if problem.batched else 1,
            problem.index,
            WANTS[quantity],
            mode,
        )
        if quantity == "hvp" and v is not None:
            return {"hvp": torch.einsum("bmij,bj->bmi", out["hessian"], v)}
        layouts = {
            "jacobian": lambda a: a,
            "gradient": lambda a: a,
            "hessian": lambda a: a.reshape(s, -1, x.shape[1]),
            "diag": lambda a: a.reshape(s, -1),
            "laplacian": lambda a: a,
        }
        return {k: layouts[k](out[k]) for k in WANTS[quantity]}


register_strategy(Structured())
