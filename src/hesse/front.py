"""Runs requests: plan, then call. The public functions and :class:`Plan` call these.

One call: inside hesse's scope (:mod:`hesse.planning.scope`), with the caller's model
kept as it was, the request becomes a canonical problem (probes kept on the model's
capture), a plan (tuned online on repeated calls of ``"auto"``), an execution by the
driver, and the layout the caller asked for.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from .driver import Outcome, execute, working_alternative
from .engine import CaptureError
from .engine.linearity import piecewise_linear_ops
from .errors import HesseError, MemoryBudgetError, PiecewiseLinearWarning, StrategyError
from .planning.arguments import with_arguments
from .planning.choice import Declined, budget_bytes, check_fits, chunking, make_plan
from .planning.exported import adapt_exported
from .planning.plan import Plan, Request, Tuning
from .planning.problem import Problem, build_problem
from .planning.scope import CALLS, derivative_scope, preserved
from .planning.tuning import SLOW, tuner_for
from .quantities import forward_jacobian
from .results import check_request, direction, empty_result, finish, warn_zero
from .settings import settings
from .strategies import get_strategy
from .strategies.structured import program_note

Fn = Callable[[torch.Tensor], torch.Tensor]


def _tuner(problem: Problem, request: Request, plan: Plan):
    """The online tuner of a repeated ``"auto"`` request, or None."""
    if request.strategy != "auto" or problem.anchor is None or not settings.current().autotune:
        return None
    capture = problem.anchor.capture
    key = (problem.batched, *request.key(problem.index), settings.current().compile)

    def peaks(names):
        return {name: _peak(problem, request, name) for name in names}

    budget = plan.budget_bytes
    costs = dict(plan.costs)
    return tuner_for(capture.lock, capture.facts, key, plan.candidates, costs, peaks, budget)


def _peak(problem: Problem, request: Request, name: str) -> float:
    """Estimated peak bytes of strategy ``name`` (infinite: not even one step fits)."""
    try:
        return float(chunking(problem, request, name).peak_bytes)
    except MemoryBudgetError:
        return float("inf")


def _ran_key(problem: Problem, request: Request) -> tuple:
    return ("ran", *request.key(problem.index))  # qualified by the layout in Problem.fact


def _declined(problem: Problem, request: Request, exc: Declined) -> HesseError:
    """The typed error of a named strategy that declines: it names one that can."""
    if exc.memory:
        return MemoryBudgetError(
            f"{problem.api}: strategy '{request.strategy}' cannot compute this within the "
            f"budget: {exc.reason}. Raise max_memory, or use strategy='auto' (it picks a "
            "strategy that works in chunks of rows)."
        )
    working = working_alternative(problem, request, request.strategy)
    fix = f"strategy='{working}' can" if working else "no other strategy ran it either"
    return StrategyError(
        f"{problem.api}: strategy '{request.strategy}' cannot compute this: {exc.reason}. "
        f"{fix} (strategy='auto' picks one that can)."
    )


def current_plan(problem: Problem, request: Request, pinned: Plan | None = None) -> Plan:
    """The plan this call runs: a pinned plan while its capture holds, else the online one.

    Raises:
        StrategyError: The named strategy declines (the message names one that can).
        MemoryBudgetError: The result, or one sample of a whole-sample strategy, does not
            fit in the budget.
    """
    anchor = problem.anchor.capture if problem.anchor is not None else None
    if pinned is not None and anchor is not None and pinned.anchor is anchor:
        return pinned
    try:
        plan = make_plan(problem, request)
    except Declined as exc:
        raise _declined(problem, request, exc) from None
    tuner = _tuner(problem, request, plan)
    if tuner is not None:
        with anchor.lock:  # type: ignore[union-attr]
            order = [n for n in tuner.order(plan.candidates) if n in plan.candidates]
            record = tuner.record_of()
        if order and order[0] != plan.strategy:
            plan = plan.with_strategy(order[0], chunking(problem, request, order[0]))
            plan = replace(plan, reason=plan.reason.replace("the cheapest candidate", "tuning"))
        plan = replace(plan, tuning=record)
    ran = problem.fact(_ran_key(problem, request), lambda: None) if anchor else None
    program = (
        program_note(problem, request.quantity, request.create_graph)
        if plan.strategy == "structured"
        else None
    )
    return replace(plan, ran=ran, program=program or None)


def _after(problem: Problem, request: Request, plan: Plan, outcome: Outcome) -> None:
    """Records the call's timing (tuning) and what ran, on the capture."""
    if problem.anchor is None:
        return
    capture = problem.anchor.capture
    tuner = None if plan.pinned else _tuner(problem, request, plan)  # pinned: no tuning
    with capture.lock:
        capture.facts[(problem.batched, _ran_key(problem, request))] = outcome.strategy
        if tuner is not None:
            if outcome.strategy != plan.strategy:
                tuner.drop(plan.strategy)
            tuner.record(outcome.strategy, outcome.seconds)


SECOND_ORDER = {"hessian": ("hessian", 2), "hessian_diag": ("diag", 1), "hvp": ("hvp", 1)}


def piecewise_ops(problem: Problem, request: Request) -> tuple[str, ...] | None:
    """The ops of a piecewise-linear model whose ``request`` is zero a.e. (None: not so).

    Only for second-order quantities without ``create_graph`` (a zero result then needs
    no graph), and only on a capture: the graph's rules decide (see
    :mod:`hesse.engine.linearity`), once per capture.
    """
    if request.quantity not in (*SECOND_ORDER, "laplacian") or request.create_graph:
        return None
    if problem.anchor is None:
        return None

    def derive() -> tuple[str, ...] | None:
        try:
            return piecewise_linear_ops(problem.anchor.graph)  # type: ignore[union-attr]
        except CaptureError:
            return None

    return problem.fact("piecewise_linear", derive)


def _zeros(problem: Problem, request: Request, ops: tuple[str, ...]) -> torch.Tensor:
    """Exact zeros of a piecewise-linear model's second-order quantity, with the warning.

    Raises:
        MemoryBudgetError: The result does not fit in the budget.
    """
    dims = _dims(request)
    size = problem.m * problem.n**dims
    budget = budget_bytes(problem, request)
    check_fits(problem, request, problem.batch * size * problem.x.element_size(), 0, budget)
    if ops:
        warnings.warn(
            f"{problem.api}: the result is exactly zero (almost everywhere): every "
            f"nonlinearity between x and the output is piecewise linear ({', '.join(ops)}), "
            "so the second derivative is zero wherever it exists; computed without running "
            "a strategy. Use a smooth activation (Softplus, GELU, SiLU, tanh) if curvature "
            "is needed.",
            PiecewiseLinearWarning,
            stacklevel=4,
        )
    with problem.anchor.capture.lock:  # type: ignore[union-attr]
        problem.anchor.capture.facts[(problem.batched, _ran_key(problem, request))] = "zeros"  # type: ignore[union-attr]
    return problem.x.new_zeros(problem.batch, size)


def _dims(request: Request) -> int:
    return SECOND_ORDER.get(request.quantity, ("laplacian", 0))[1]


def _layout(problem: Problem, request: Request, outcome: Outcome) -> Any:
    """The caller's layout of the arrays (see :mod:`hesse.api` for the shapes)."""
    arrays, flat, quantity = outcome.arrays, request.flat, request.quantity
    if quantity == "jacobian":
        jac = arrays["jacobian"]
        if forward_jacobian(problem, get_strategy(outcome.strategy)):
            jac = jac.transpose(1, 2)
        warn_zero(problem, jac, second_order=False)
        return finish(problem, jac, 1, flat)
    if quantity == "laplacian":
        if "laplacian" in arrays:  # whole-sample strategies: (B, m)
            lap = arrays["laplacian"].reshape(problem.batch, problem.m)
        else:
            lap = arrays["diag"].reshape(problem.batch, problem.m, problem.n).sum(-1)
        warn_zero(problem, lap, second_order=True)
        return finish(problem, lap, 0, flat)
    if quantity == "derivatives":
        with torch.enable_grad() if request.create_graph else torch.no_grad():
            value = problem.fn(problem.x)
        warn_zero(problem, arrays["gradient"], second_order=False)
        warn_zero(problem, arrays["hessian"], second_order=True)
        return (
            finish(problem, value, 0, flat),
            finish(problem, arrays["gradient"], 1, flat),
            finish(problem, arrays["hessian"], 2, flat),
        )
    name, dims = {"hessian": ("hessian", 2), "hessian_diag": ("diag", 1), "hvp": ("hvp", 1)}[
        quantity
    ]
    warn_zero(problem, arrays[name], second_order=True)
    return finish(problem, arrays[name], dims, flat)


def run(
    request: Request,
    f: Fn,
    x: torch.Tensor,
    v: torch.Tensor | None = None,
    pinned: Plan | None = None,
) -> Any:
    """Computes a request: the body of every public function and of ``Plan.__call__``."""
    check_request(request)
    f = adapt_exported(request.api, f, x, request.batched)
    f = with_arguments(request.api, f, request.args, request.kwargs)
    with CALLS, derivative_scope(), preserved(f):
        problem = build_problem(
            request.api,
            f,
            x,
            request.output,
            request.batched,
            keep_graph=request.create_graph,
            capture=request.strategy in ("auto", "structured"),
        )
        flat_v = direction(request.api, v, x, problem.x) if request.quantity == "hvp" else None
        if problem.batch == 0:
            return empty_result(problem, request)
        ops = piecewise_ops(problem, request)
        if ops is not None:
            zeros = _zeros(problem, request, ops)
            return finish(problem, zeros, _dims(request), request.flat)
        plan = current_plan(problem, request, pinned)
        outcome = execute(problem, plan, flat_v, request.progress)
        _after(problem, request, plan, outcome)
        return _layout(problem, request, outcome)


def plan_of(request: Request, f: Fn, x: torch.Tensor) -> Plan:
    """The plan a call of ``request`` on ``(f, x)`` would run now; computes nothing."""
    check_request(request)
    model = adapt_exported(request.api, f, x, request.batched)
    model = with_arguments(request.api, model, request.args, request.kwargs)
    with CALLS, derivative_scope(), preserved(model):
        capture = request.strategy in ("auto", "structured")
        problem = build_problem(
            request.api, model, x, request.output, request.batched, capture=capture
        )
        plan = replace(current_plan(problem, request), model=f, input=input_spec(x))
        # the caller's f: the plan binds the request's arguments again when it is called
        ops = piecewise_ops(problem, request)
        if ops is None:
            return plan
        what = f"piecewise linear ({', '.join(ops)})" if ops else "linear"
        return replace(
            plan,
            strategy="zeros",
            reason=f"the model is {what} in x: the {request.quantity} is exactly zero (a.e.); "
            "zeros of the result's shape, no strategy runs",
            estimates=(("zeros", "no work: every op is (piecewise) linear"), *plan.estimates),
            tuning=None,
            ran=plan.ran,
        )


def tune(plan: Plan, x: torch.Tensor, v: torch.Tensor | None, rounds: int) -> Plan:
    """Times each candidate of ``plan`` on ``x``; returns the plan pinned to the fastest.

    Raises:
        StrategyError: No candidate could run the model.
    """
    request = plan.request
    rounds = max(2, int(rounds))
    model = adapt_exported(request.api, plan.model, x, request.batched)
    model = with_arguments(request.api, model, request.args, request.kwargs)
    with CALLS, derivative_scope(), preserved(model):
        problem = build_problem(request.api, model, x, request.output, request.batched)
        flat_v = direction(request.api, v, x, problem.x) if request.quantity == "hvp" else None
        try:
            base = make_plan(problem, request)
        except Declined as exc:
            raise _declined(problem, request, exc) from None
        times: dict[str, tuple[float, ...]] = {}
        skipped: dict[str, str] = {}
        for name in base.candidates:
            peak = _peak(problem, request, name)
            if name != base.strategy and peak > base.budget_bytes:
                skipped[name] = "estimated peak over the budget"
                continue
            trial = base.with_strategy(name, chunking(problem, request, name))
            trial = replace(trial, candidates=(name,))
            try:
                why = _timed_rounds(problem, trial, flat_v, rounds, times)
            except StrategyError:
                continue
            if why:
                skipped[name] = why
    if not times:
        raise StrategyError(f"{request.api}: Plan.tune: no candidate could run this model.")
    best = min(times, key=lambda n: min(times[n]))
    tuned = base.with_strategy(best, chunking(problem, request, best))
    record = Tuning("settled", tuple(times.items()), best, 0, tuple(skipped.items()))
    return replace(
        tuned,
        model=plan.model,
        tuning=record,
        pinned=True,
        reason=f"{tuned.reason}; tuned: fastest",
        input=input_spec(x),
    )


def _timed_rounds(
    problem: Problem,
    trial: Plan,
    v: torch.Tensor | None,
    rounds: int,
    times: dict[str, tuple[float, ...]],
) -> str:
    """Times ``rounds`` calls of ``trial`` into ``times`` (the first not counted).

    Returns:
        Why the candidate was dropped after its first call (``""``: it was not): slower
        than :data:`~hesse.planning.tuning.SLOW` times the fastest counted call so far.
    """
    fastest = min((min(ts) for ts in times.values()), default=None)
    first = execute(problem, trial, v).seconds
    if fastest is not None and first > SLOW * fastest:
        return f"first call {first:.3g} s, over {SLOW:g}x the fastest ({fastest:.3g} s): dropped"
    times[trial.strategy] = tuple(execute(problem, trial, v).seconds for _ in range(rounds - 1))
    return ""


def input_spec(x: torch.Tensor) -> tuple[tuple[int, ...], str, str]:
    """``(shape, dtype, device type)`` of an input, for saved plans' fingerprints."""
    return tuple(x.shape), str(x.dtype), x.device.type


def pinned_plan(request: Request, f: Fn, x: torch.Tensor, name: str, record: Tuning | None) -> Plan:
    """The plan of ``request`` pinned to strategy ``name`` (a loaded plan).

    When ``name`` declines the request now (or the result is zeros without a strategy),
    the plan ``hesse.plan`` would make, with why in its reason.
    """
    base = plan_of(request, f, x)
    if base.strategy == "zeros" or name not in base.candidates:
        why = dict(base.estimates).get(name, "not a candidate")
        return replace(
            base, reason=f"{base.reason}; the saved strategy '{name}' is not used ({why})"
        )
    model = adapt_exported(request.api, f, x, request.batched)
    model = with_arguments(request.api, model, request.args, request.kwargs)
    with CALLS, derivative_scope(), preserved(model):
        problem = build_problem(request.api, model, x, request.output, request.batched)
        plan = make_plan(problem, request, order=(name,))
        program = program_note(problem, request.quantity) if name == "structured" else None
    return replace(
        plan,
        model=f,
        tuning=record,
        pinned=True,
        program=program or None,
        reason=plan.reason.replace("chosen by tuning", "saved by tuning"),
        input=input_spec(x),
    )
