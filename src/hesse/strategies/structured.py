"""The structured strategy: the engine of :mod:`hesse.engine` behind the registry.

It runs on the graph TorchDynamo captured of the model (:mod:`hesse.planning.capture`),
with the current values of the parameters and buffers the graph reads. Unlike the
product-based strategies it computes whole per-sample results at once (``compute``), so
the driver chunks it over samples only. Each sub-batch shape is captured on its own (the
graph bakes shapes in); the captures share TorchDynamo's guards with the model.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..engine import CaptureError, GraphCost, graph_cost, structured_pass
from ..engine.compiling import CompiledRunner
from ..engine.program import emit
from ..planning.capture import Bound, capture
from ..planning.problem import Problem
from ..settings import settings
from .base import Capabilities, register_strategy

WANTS: dict[str, frozenset[str]] = {
    "jacobian": frozenset({"jacobian"}),
    "hessian": frozenset({"hessian"}),
    "hessian_diag": frozenset({"diag"}),
    "laplacian": frozenset({"laplacian"}),
    "derivatives": frozenset({"hessian", "gradient"}),
    "hvp": frozenset({"hessian"}),  # forms H per sample, then H v: for small inputs
}


def _model_shape(problem: Problem, s: int) -> tuple[int, ...]:
    return (s, *problem.in_shape) if problem.batched else tuple(problem.in_shape)


def _bound(problem: Problem, x: torch.Tensor) -> Bound:
    """The capture of the model at the sub-batch ``x`` ``(s, n)``."""
    if problem.model is None:
        raise CaptureError("no model to capture")
    if problem.anchor is not None and x.shape[0] == problem.batch:
        return problem.anchor
    return capture(problem.model, x.detach().reshape(_model_shape(problem, x.shape[0])))


def cost(problem: Problem) -> GraphCost:
    """The engine's cost facts of the problem's capture (derived once per capture).

    Raises:
        CaptureError: The model was not captured, or the engine cannot run it.
    """
    bound = problem.anchor
    if bound is None:
        raise CaptureError(problem.capture_failure or "the model was not captured")
    graph = bound.graph  # raises the capture's reason

    def derive() -> GraphCost:
        x = problem.x.reshape(_model_shape(problem, problem.batch))
        return graph_cost(graph, bound.inputs, x, problem.n, problem.batch)

    return problem.fact("graph_cost", derive)


PROGRAM_AFTER = 2  # calls of a request interpreted before its program is emitted


def _program(
    problem: Problem, bound: Bound, x: torch.Tensor, args: tuple, create_graph: bool
) -> CompiledRunner | None:
    """The request's derivative program, emitted on its third call (see :mod:`..engine.program`).

    Kept on the sub-batch's capture under everything the program bakes in: the layout, the
    sub-batch shape, the arrays, the selected outputs, the engine mode, the compile setting
    and the grad mode (the runner times and compiles for one). A program that cannot be
    traced is not tried again; the engine interprets.
    """
    _, _, index, want, mode = args
    compile_ = settings.current().compile
    key = _program_key(problem, x, want, index, mode, compile_, create_graph)
    if bound.capture.count(("calls", *key)) <= PROGRAM_AFTER:
        return None

    def derive() -> CompiledRunner | None:
        try:
            program = emit(bound.graph, bound.inputs, x, *args)
        except Exception:  # tracing failed: keep interpreting
            return None
        if create_graph and program.cuts_gradients:
            return None  # its result would differentiate wrongly: keep interpreting
        return CompiledRunner(program, compile_, create_graph)

    return bound.capture.fact(key, derive)


def _program_key(
    problem: Problem,
    x: torch.Tensor,
    want: frozenset[str],
    index: torch.Tensor | None,
    mode: str,
    compile_: bool | str,
    create_graph: bool,
) -> tuple:
    selected = None if index is None else tuple(index.tolist())
    key = ("program", problem.batched, tuple(x.shape), x.dtype, tuple(sorted(want)), selected)
    return (*key, mode, compile_, create_graph)


_THEN = {
    True: "compiled whole (settings(compile=True))",
    False: "not compiled",
    "auto": "compiled whole when that pays (settings(compile='auto'))",
}


def program_note(problem: Problem, quantity: str, create_graph: bool = False) -> str:
    """How the engine runs this request now: interpreted, or as a (compiled) program."""
    if problem.anchor is None or isinstance(problem.anchor.capture.graph, CaptureError):
        return ""
    mode, _ = cost(problem).best(quantity, problem.m)
    compile_ = settings.current().compile
    key = _program_key(
        problem, problem.x, WANTS[quantity], problem.index, mode, compile_, create_graph
    )
    capture = problem.anchor.capture
    with capture.lock:
        calls, emitted, runner = (
            capture.facts.get(("calls", *key), 0),
            key in capture.facts,
            capture.facts.get(key),
        )
    if emitted and runner is None and create_graph:
        return (
            "interpreted (the traced derivative program would cut gradients, or tracing "
            "failed; see hesse.engine.program)"
        )
    if emitted and runner is None:
        return "interpreted (tracing the derivative program failed)"
    if emitted:
        return f"derivative program of {runner.program.nodes} ATen ops, {runner.note()}"
    left = max(0, PROGRAM_AFTER - calls)
    return f"interpreted for {left} more call(s), then a derivative program ({_THEN[compile_]})"


class Structured:
    """Per-layer rules on the captured graph: ``H = sum_k J_k^T M_k J_k``, no autograd loop."""

    name: ClassVar[str] = "structured"
    capabilities: ClassVar[Capabilities] = Capabilities(
        vmap=False, forward_ad=False, whole_samples=True, sequential=False, differentiable=True
    )
    memory_factor: ClassVar[float] = 3.0
    description: ClassVar[str] = (
        "structured engine: tangents through the captured graph, per-layer Hessian terms"
    )

    def unsupported(self, problem: Problem, quantity: str, create_graph: bool) -> str | None:
        """Why this strategy cannot run the request, or ``None`` if it can."""
        if quantity not in WANTS:
            return f"computes {', '.join(WANTS)} only, not {quantity}"
        try:
            cost(problem)
        except CaptureError as exc:
            return str(exc)
        return None

    def estimate(self, problem: Problem, quantity: str) -> float:
        """Estimated multiply-adds of the call (see :mod:`hesse.engine.cost`)."""
        graph_cost_ = cost(problem)
        _, macs = graph_cost_.best(quantity, problem.m)
        return problem.batch * macs + graph_cost_.overhead(quantity, problem.m)

    def describe(self, problem: Problem, quantity: str) -> str:
        """The engine mode the cost model picks, for plans."""
        mode, _ = cost(problem).best(quantity, problem.m)
        return f"{mode} mode"

    def sample_bytes(self, problem: Problem, quantity: str) -> int:
        """Working bytes of one sample: its tangents (and Hessian terms) in the engine."""
        graph_cost_ = cost(problem)
        mode, _ = graph_cost_.best(quantity, problem.m)
        return int(graph_cost_.sample_bytes(quantity, problem.m, mode, problem.x.element_size()))

    def traffic(self, problem: Problem, quantity: str) -> float:
        """Bytes written and read: tangents through every node, and the per-layer terms."""
        graph_cost_ = cost(problem)
        mode, _ = graph_cost_.best(quantity, problem.m)
        itemsize = problem.x.element_size()
        return problem.batch * graph_cost_.traffic(quantity, problem.m, mode, itemsize)

    def compute(
        self,
        problem: Problem,
        quantity: str,
        x: torch.Tensor,
        v: torch.Tensor | None = None,
        create_graph: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Arrays for the sinks, ``(s, items, *tail)``, for the sub-batch ``x`` ``(s, n)``.

        ``v`` (``(s, n)``) is the direction of an ``hvp`` call.
        """
        s = x.shape[0]
        shape = _model_shape(problem, s)
        mode, _ = cost(problem).best(quantity, problem.m)
        bound = _bound(problem, x)
        batch = s if problem.batched else 1
        args = (lambda t: t.reshape(shape), batch, problem.index, WANTS[quantity], mode)
        program = _program(problem, bound, x, args, create_graph)
        if program is not None:
            out = program(bound.inputs, x)
        else:
            out = structured_pass(bound.graph, bound.inputs, x, *args, differentiable=create_graph)
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
