"""The engine: runs a plan as a stream of blocks into sinks, and falls back when it must.

``execute`` walks the candidate strategies of the planner. A candidate that fails because
of an operator (no forward-mode rule, not batchable by vmap, ...) is skipped together with
every later candidate that needs the same capability; ``"auto"`` then warns once, naming
the operator and the strategy used. An explicitly named strategy that cannot run raises
:class:`~hesse.errors.StrategyError` with the operator and the fix.
"""

from __future__ import annotations

import re
import warnings

import torch
from torch.func import jvp, vjp
from tqdm.auto import tqdm

from ._problem import Problem
from ._quantities import QUANTITIES, Work
from ._tuning import clock, request_key, tuner_for
from .errors import FallbackWarning, StrategyError, StrategyMismatchError
from .io import TensorSink
from .planner import Plan, candidate_order, estimate, make_plan, measure
from .strategies import Strategy, get_strategy

# Error messages that mean "this strategy cannot run this model": capability -> patterns.
INCOMPATIBLE: dict[str, tuple[str, ...]] = {
    "forward_ad": (
        r"forward AD",
        r"forward[- ]mode",
        r"forward grad",
        r"implement the jvp",
        r"jvp.*not (implemented|supported)",
    ),
    "vmap": (
        r"vmap",
        r"[Bb]atching rule",
        r"[Bb]atched ?[Tt]ensor",
        r"\.item\(\)",
        r"data-dependent",
        r"dynamic shape",
        r"captured [Tt]ensor",
        r"functorch",
        r"setup_context",
        r"in-place operation",
    ),
}
_OP = re.compile(r"(aten::[\w.]+)|with (\w+) that does not support|operator (\S+)")


def incompatibility(exc: BaseException, strategy: Strategy) -> str | None:
    """The capability the strategy lacked (``"vmap"``, ``"forward_ad"``), or ``None``."""
    if not isinstance(exc, (RuntimeError, NotImplementedError, TypeError, ValueError)):
        return None
    text = str(exc)
    for capability, patterns in INCOMPATIBLE.items():
        needed = strategy.uses_forward_ad if capability == "forward_ad" else strategy.uses_vmap
        if needed and any(re.search(p, text) for p in patterns):
            return capability
    return None


def operator_name(exc: BaseException) -> str:
    """The operator named in an error message, or its first line."""
    match = _OP.search(str(exc))
    if match:
        return next(g for g in match.groups() if g)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return first[:120]


def _probe_modes_agree(problem: Problem) -> None:
    """Checks ``u^T (J v) == (u^T J) v`` on one sample: forward and reverse mode agree.

    ``torch.no_grad()`` inside a model blocks reverse mode but not forward mode
    (pytorch#128600), so forward-over-reverse would silently differ from the truth the
    model's author meant.
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
    sinks = {
        name: TensorSink((problem.batch, items, *tail), dtype, device)
        for name, (items, tail) in quantity.outputs(problem, strategy).items()
    }
    bar = tqdm(total=plan.steps, desc=problem.api, disable=not progress, leave=False)
    if callable(getattr(strategy, "compute", None)):  # whole per-sample results at once
        with bar:
            for s0 in range(0, problem.batch, plan.samples_per_step):
                samples = slice(s0, min(s0 + plan.samples_per_step, problem.batch))
                direction = None if v is None else v[samples]
                arrays = strategy.compute(problem, plan.quantity, problem.x[samples], direction)  # type: ignore[attr-defined]
                for name, arr in arrays.items():
                    sinks[name].write(samples, slice(None), arr.detach())
                bar.update()
        return {name: sink.result() for name, sink in sinks.items()}
    with bar:
        for s0 in range(0, problem.batch, plan.samples_per_step):
            samples = slice(s0, min(s0 + plan.samples_per_step, problem.batch))
            for i0 in range(0, plan.items, plan.rows_per_step):
                i1 = min(i0 + plan.rows_per_step, plan.items)
                items = torch.arange(i0, i1, device=device)
                work = Work(problem.x[samples], items, None if v is None else v[samples])
                for name, (block, index) in quantity.kernel(
                    strategy, problem, work, create_graph
                ).items():
                    if not create_graph:  # never keep a graph alive in the result
                        block = block.detach()
                    sinks[name].write(
                        samples, slice(i0, i1) if index is None else index, block.movedim(0, 1)
                    )
                bar.update()
    return {name: sink.result() for name, sink in sinks.items()}


def execute(
    problem: Problem,
    quantity: str,
    strategy: str,
    chunk_size: int | None,
    max_memory: int | str | None,
    *,
    v: torch.Tensor | None = None,
    create_graph: bool = False,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], Plan]:
    """Plans and runs ``quantity`` on ``problem``, falling back across candidates.

    Returns:
        The output arrays (see :func:`run_plan`) and the plan that produced them.

    Raises:
        StrategyError: The named strategy cannot run this model, or no candidate can.
    """
    measure(problem)
    candidates, estimates = candidate_order(problem, quantity, strategy, create_graph)
    tuner = None
    if strategy == "auto":
        costs = {n: estimate(problem, quantity, get_strategy(n)) for n in candidates}
        key = request_key(problem, quantity, chunk_size, max_memory, create_graph)
        tuner = tuner_for(problem, key, candidates, costs)
    if tuner is not None:
        candidates = tuner.order(candidates)
        estimates = (*estimates, ("tuning", tuner.summary()))
    lacking: set[str] = set()
    failures: list[str] = []
    for name in candidates:
        st = get_strategy(name)
        if ("vmap" in lacking and st.uses_vmap) or ("forward_ad" in lacking and st.uses_forward_ad):
            continue
        plan = make_plan(problem, quantity, name, candidates, chunk_size, max_memory, estimates)
        try:
            # Grad mode stays on: under no_grad, forward-mode AD through some backward
            # formulas (e.g. silu_backward) fails. Blocks are detached instead.
            if st.uses_forward_ad and not problem.cache.get("modes_agree"):
                _probe_modes_agree(problem)
                problem.cache["modes_agree"] = True
            start = clock(problem.x.device)
            out = run_plan(problem, plan, v, create_graph, progress)
            if tuner is not None:
                tuner.record(name, clock(problem.x.device) - start)
        except StrategyMismatchError:
            if strategy != "auto":
                raise
            lacking.add("forward_ad")
            if tuner is not None:
                tuner.drop(name)
            failures.append(f"'{name}' (forward and reverse mode disagree: torch.no_grad in f?)")
            continue
        except Exception as exc:
            capability = incompatibility(exc, st)
            if capability is None:
                raise
            op = operator_name(exc)
            if strategy != "auto":
                raise StrategyError(_cannot_run(problem.api, name, capability, op)) from exc
            lacking.add(capability)
            if tuner is not None:
                tuner.drop(name)
            failures.append(f"'{name}' ({op})")
            continue
        if failures:
            warnings.warn(
                f"{problem.api}: strategy {', '.join(failures)} could not run this model; "
                f"used strategy '{name}' instead. Pass strategy='{name}' to skip the attempt.",
                FallbackWarning,
                stacklevel=4,
            )
        return out, plan
    raise StrategyError(
        f"{problem.api}: no strategy could run this model: {'; '.join(failures)}. Make the "
        "model differentiable twice with torch.autograd (no @once_differentiable)."
    )


_HINTS = {
    "vmap": "it is not batchable by torch.func.vmap (.item(), data-dependent control flow, "
    "in-place writes into captured tensors, boolean-mask indexing). Rewrite with "
    "torch.where / new_zeros, or pass strategy='loop'",
    "forward_ad": "an operator has no forward-mode AD rule. Pass strategy='reverse' or 'loop'",
}


def _cannot_run(api: str, name: str, capability: str, op: str) -> str:
    return f"{api}: strategy '{name}' cannot run this model ({op}): {_HINTS[capability]}."
