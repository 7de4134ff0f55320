"""The driver: runs a plan as a stream of blocks into sinks, and falls back when it must.

``execute`` walks the plan's candidates. A candidate that raises anything but a
:class:`~hesse.errors.HesseError` cannot run this model: under ``"auto"`` the failure is
remembered on the model's capture (see :mod:`hesse.planning.capture`; for a model that
cannot be captured, on the model object), the next candidate runs, and one
:class:`~hesse.errors.FallbackWarning` names the failure. An explicitly named strategy
that cannot run raises :class:`~hesse.errors.StrategyError`, naming a strategy that ran
the model on its first sample. No internal exception leaves the driver.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch
from torch.func import jvp, vjp
from tqdm.auto import tqdm

from .errors import (
    FallbackWarning,
    HesseError,
    StrategyError,
    StrategyMismatchError,
    UnsupportedModelError,
)
from .io import TensorSink
from .planning.choice import chunking, make_plan
from .planning.failures import failure_key, first_warning, known_failure, remember_failure
from .planning.plan import Plan, Request
from .planning.problem import Problem
from .planning.tuning import clock
from .quantities import QUANTITIES, Work
from .strategies import Strategy, get_strategy


def _probe_modes_agree(problem: Problem) -> bool:
    """Checks ``u^T (J v) == (u^T J) v`` on one sample: forward and reverse mode agree.

    ``torch.no_grad()`` inside a model blocks reverse mode but not forward mode
    (pytorch#128600), so forward-over-reverse would silently differ from the truth the
    model's author meant.

    Raises:
        StrategyMismatchError: They disagree.
    """
    x = problem.x[:1].detach()
    gen = torch.Generator(device=x.device).manual_seed(0)
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        out, jv = jvp(problem.fn, (x,), (v,))
        u = torch.randn(out.shape, generator=gen, dtype=x.dtype, device=x.device)
        uj = vjp(problem.fn, x)[1](u)[0]
    a, b = float((u * jv).sum()), float((uj * v).sum())
    tol = (1e-4 if x.dtype == torch.float32 else 1e-9) * max(1.0, abs(a), abs(b))
    if abs(a - b) > tol:
        raise StrategyMismatchError(
            f"{problem.api}: forward-mode and reverse-mode derivatives of f disagree "
            f"(u.Jv = {a:.6g} vs uJ.v = {b:.6g}); f likely uses torch.no_grad() inside, "
            "which forward-mode AD ignores (pytorch#128600). Replace it with .detach(), or "
            "pass strategy='reverse' (or 'loop') to use reverse mode only."
        )
    return True


def _first_order(problem: Problem, x: torch.Tensor, u: torch.Tensor, graph: bool):
    """``(x as a leaf, the gradient of u . F at x)``; the gradient keeps a graph on request."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        out = problem.fn(leaf)
        (g,) = torch.autograd.grad(
            (out * u).sum(), leaf, create_graph=graph, allow_unused=True, materialize_grads=True
        )
    return leaf, g


def _probe_double_backward(problem: Problem) -> bool:
    """Checks that autograd's second derivative of f is not silently zero.

    A custom ``autograd.Function`` whose backward is ``@once_differentiable`` (or runs
    under ``no_grad``) gives a gradient that autograd believes constant, so
    reverse-over-reverse returns zeros. When the Hessian-vector product of one sample is
    exactly zero, central differences of the gradient at two step sizes decide: a real
    curvature gives the same difference quotient at both, a kink (ReLU) one that grows as
    the step shrinks, and a linear function none.

    Raises:
        UnsupportedModelError: The gradient changes with ``x`` but its derivative is zero.
    """
    x = problem.x[:1].detach()
    gen = torch.Generator(device=x.device).manual_seed(1)
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
    u = torch.randn((1, problem.m), generator=gen, dtype=x.dtype, device=x.device)
    leaf, g = _first_order(problem, x, u, graph=True)
    if g.requires_grad:
        with torch.enable_grad():
            (hv,) = torch.autograd.grad(
                (g * v).sum(), leaf, allow_unused=True, materialize_grads=True
            )
        if bool((hv != 0).any()):
            return True
    f64 = x.dtype == torch.float64
    step = (1e-4 if f64 else 3e-2) * (1.0 + float(x.abs().max()))
    quotients = []
    for eps in (step, step / 10):
        up = _first_order(problem, x + eps * v, u, graph=False)[1]
        down = _first_order(problem, x - eps * v, u, graph=False)[1]
        quotients.append(float(((up - down) / (2 * eps)).norm()))
    scale = 1.0 + float(g.detach().norm())
    if max(quotients) <= (1e-6 if f64 else 1e-2) * scale:
        return True  # the gradient does not change: a zero second derivative is right
    big, small = quotients
    if small > 3 * big:  # grows as the step shrinks: a kink, not a curvature
        return True
    raise UnsupportedModelError(
        f"{problem.api}: autograd's second derivative of f is zero although its gradient "
        f"changes with x (difference quotient {big:.3g}): a custom autograd.Function "
        "in f has a backward marked @once_differentiable or computed without a graph. "
        "Give it a differentiable backward (or a jvp and setup_context for torch.func)."
    )


def run_plan(
    problem: Problem, plan: Plan, v: torch.Tensor | None, create_graph: bool, progress: bool
) -> dict[str, torch.Tensor]:
    """Runs one plan: every block of every step, written into in-memory sinks.

    Returns:
        Each output array, shape ``(B, items, *tail)``.
    """
    quantity = QUANTITIES[plan.quantity]
    strategy = get_strategy(plan.strategy)
    dtype, device = problem.x.dtype, problem.x.device
    outputs = quantity.outputs(problem, strategy)
    sinks = {
        name: TensorSink((problem.batch, items, *tail), dtype, device, differentiable=create_graph)
        for name, (items, tail) in outputs.items()
    }
    bar = tqdm(total=plan.steps, desc=problem.api, disable=not progress, leave=False)
    with bar:
        for s0 in range(0, problem.batch, plan.samples_per_step):
            samples = slice(s0, min(s0 + plan.samples_per_step, problem.batch))
            direction = None if v is None else v[samples]
            if strategy.capabilities.whole_samples:
                arrays = strategy.compute(  # type: ignore[attr-defined]
                    problem, plan.quantity, problem.x[samples], direction, create_graph
                )
                for name, arr in arrays.items():
                    sinks[name].write(samples, slice(None), arr)
                bar.update()
                continue
            for i0 in range(0, plan.items, plan.rows_per_step):
                i1 = min(i0 + plan.rows_per_step, plan.items)
                items = torch.arange(i0, i1, device=device)
                work = Work(problem.x[samples], items, direction)
                for name, (block, index) in quantity.kernel(
                    strategy, problem, work, create_graph
                ).items():
                    where = slice(i0, i1) if index is None else index
                    sinks[name].write(samples, where, block.movedim(0, 1))
                bar.update()
    return {name: sink.result() for name, sink in sinks.items()}


@dataclass(frozen=True)
class Outcome:
    """What :func:`execute` ran.

    Attributes:
        arrays: The output arrays.
        strategy: The strategy that computed them.
        seconds: Its wall time.
        plan: The plan it ran (its chunking is the strategy's own).
    """

    arrays: dict[str, torch.Tensor]
    strategy: str
    seconds: float
    plan: Plan


def _run_one(
    problem: Problem, plan: Plan, name: str, v: torch.Tensor | None, progress: bool
) -> Outcome:
    st = get_strategy(name)
    create_graph = plan.request.create_graph
    if name != plan.strategy:
        plan = plan.with_strategy(name, chunking(problem, plan.request, name))
    if st.capabilities.forward_ad:
        problem.fact(("modes_agree", _index_key(problem)), lambda: _probe_modes_agree(problem))
    elif QUANTITIES[plan.quantity].second_order and not st.capabilities.whole_samples:
        key = ("double_backward", _index_key(problem))
        problem.fact(key, lambda: _probe_double_backward(problem))
    start = clock(problem.x.device)
    arrays = run_plan(problem, plan, v, create_graph, progress)
    return Outcome(arrays, name, clock(problem.x.device) - start, plan)


def _index_key(problem: Problem) -> tuple | None:
    return None if problem.index is None else tuple(problem.index.tolist())


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:160]}" if lines else type(exc).__name__


def execute(
    problem: Problem, plan: Plan, v: torch.Tensor | None = None, progress: bool = False
) -> Outcome:
    """Runs the plan's first candidate, falling back across candidates under ``"auto"``.

    Raises:
        StrategyError: The named strategy cannot run this model, or no candidate can.
        HesseError: Any typed error of the checks (memory, model, mismatch of modes).
    """
    explicit = plan.request.strategy != "auto"
    failures = [f"'{name}' ({why})" for name, why in plan.failed]
    for name in plan.candidates:
        key = failure_key(name, plan.quantity, plan.request.create_graph)
        earlier = "" if explicit else known_failure(problem, key)
        if earlier:
            failures.append(f"'{name}' ({earlier})")
            continue
        try:
            outcome = _run_one(problem, plan, name, v, progress)
        except StrategyMismatchError:
            if explicit:
                raise
            reason = "forward and reverse mode disagree: torch.no_grad in f?"
        except HesseError:
            raise
        except Exception as exc:
            reason = _describe(exc)
            if explicit:
                raise StrategyError(_cannot_run(problem, plan, name, reason)) from None
        else:
            if failures and first_warning(problem, (plan.quantity, *failures)):
                warnings.warn(
                    f"{problem.api}: strategy {', '.join(failures)} could not run this "
                    f"model; used strategy '{name}' instead. Pass strategy='{name}' to skip "
                    "the attempt.",
                    FallbackWarning,
                    stacklevel=4,
                )
            return outcome
        remember_failure(problem, key, reason)
        failures.append(f"'{name}' ({reason})")
    raise StrategyError(
        f"{problem.api}: no strategy could run this model: {'; '.join(failures)}. Make the "
        "model differentiable twice with torch.autograd (no @once_differentiable, no "
        "custom Function without a double backward)."
    )


def _cannot_run(problem: Problem, plan: Plan, name: str, reason: str) -> str:
    """The message of a named strategy that failed, naming one that runs the model."""
    working = working_alternative(problem, plan.request, name)
    fix = (
        f"strategy='{working}' runs it (or strategy='auto' picks one)"
        if working
        else "no other strategy ran it either: make the model differentiable twice"
    )
    return f"{problem.api}: strategy '{name}' cannot run this model ({reason}); {fix}."


def working_alternative(problem: Problem, request: Request, failed: str) -> str | None:
    """The first other product strategy that computes the request on the first sample."""
    one = dataclasses.replace(problem, x=problem.x[:1].detach(), anchor=None)
    for other in ("vmap", "reverse", "loop"):
        if other == failed:
            continue
        st: Strategy = get_strategy(other)
        if st.unsupported(one, request.quantity, request.create_graph) is not None:
            continue
        direction = torch.ones_like(one.x) if request.quantity == "hvp" else None
        try:
            trial = make_plan(one, dataclasses.replace(request, strategy=other))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run_plan(one, trial, direction, False, False)
        except Exception:  # this one cannot run it either
            continue
        return other
    return None
