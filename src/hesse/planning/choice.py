"""The choice: which strategy, how many work items per step, and how much memory.

``strategy="auto"`` takes the candidates of the decision table (:data:`AUTO_ORDER`, per
quantity and shape regime), drops those that decline the request (with the reason) or
failed on this model before, and orders the rest by estimated time (multiply-adds and
bytes moved, see :func:`hesse.engine.cost.seconds`). Chunks
are sized from the memory budget: the result must fit, and a step of ``s`` samples times
``r`` work items costs ``s * r`` times the measured working set of one item (``s`` times
for strategies that run items one after another, or the strategy's own per-sample
estimate for whole-sample strategies).
"""

from __future__ import annotations

from ..engine.cost import seconds
from ..errors import MemoryBudgetError, StrategyError
from ..quantities import QUANTITIES
from ..strategies import Strategy, get_strategy
from .failures import failure_key, known_failure
from .memory import available_bytes, format_bytes, parse_bytes
from .plan import Chunking, Plan, Request
from .problem import Problem

# NOTE: [auto decision table]
# Forward-over-reverse ("vmap") is the cheapest general Hessian-vector product (~2.5
# forward passes each, vectorised); reverse-over-reverse needs no forward-mode rules; the
# loop needs neither vmap nor forward mode. Jacobians pull m cotangents back (reverse)
# unless there are fewer inputs than outputs, where pushing n tangents forward is cheaper.
# The structured engine computes whole Hessians from per-layer terms; the cost model
# decides between it and the product-based strategies (it loses to them when a layer
# widens the representation a lot, e.g. a convolution over an image).
AUTO_ORDER: dict[tuple[str, str], tuple[str, ...]] = {
    ("first_order", "tall"): ("vmap", "structured", "reverse", "loop"),
    ("first_order", "wide"): ("reverse", "structured", "vmap", "loop"),
    ("second_order", "tall"): ("structured", "vmap", "reverse", "loop"),
    ("second_order", "wide"): ("structured", "vmap", "reverse", "loop"),
}
SCRIPTED_ORDER = ("loop",)  # TorchScript: vmap and forward mode are unreliable there
DEFAULT_BUDGET_FRACTION = 0.5  # of the device's free memory, when max_memory is None
# Normalisations whose forward-mode AD torch gets wrong beyond second order (measured in
# torch 2.13: d/dx of a Laplacian through layer_norm by forward-over-reverse is off by O(1);
# see also pytorch#196700, #196699, #198017). With create_graph=True, strategies that push
# tangents forward through them decline; reverse mode is right.
FORWARD_AD_UNSAFE = ("layer_norm", "batch_norm", "group_norm", "instance_norm", "rms_norm")


class Declined(Exception):
    """A named strategy declines a request (internal; the front names one that can).

    Attributes:
        reason: Why.
        memory: It declined because one sample does not fit in the budget.
    """

    def __init__(self, reason: str, memory: bool = False, failed: str = ""):
        super().__init__(reason)
        self.reason, self.memory, self.failed = reason, memory, failed


def _declines(st: Strategy, problem: Problem, request: Request) -> Declined | None:
    """Why a strategy declines the request up front (``None``: it accepts)."""
    if request.create_graph and not st.capabilities.differentiable:
        return Declined("cannot keep a graph (create_graph=True)")
    if problem.scripted and st.capabilities.vmap:
        return Declined("TorchScript: vmap and forward mode are unreliable there")
    pushes_forward = st.capabilities.forward_ad or st.capabilities.whole_samples
    unsafe = sorted(op for op in problem.ops if op in FORWARD_AD_UNSAFE)
    if request.create_graph and pushes_forward and unsafe:
        return Declined(
            f"create_graph=True through {', '.join(unsafe)} needs third derivatives, which "
            "torch's forward-mode AD gets wrong there; reverse mode is right"
        )
    reason = st.unsupported(problem, request.quantity, request.create_graph)
    if reason is not None:
        return Declined(reason)
    failed = known_failure(problem, failure_key(st.name, request.quantity, request.create_graph))
    if failed:
        return Declined(f"failed on this model before ({failed})", failed=failed)
    too_big = _too_big(st, problem, request)
    return None if too_big is None else Declined(too_big, memory=True)


def _too_big(st: Strategy, problem: Problem, request: Request) -> str | None:
    """Whole-sample strategies decline when one sample does not fit in the budget."""
    sample_bytes = getattr(st, "sample_bytes", None)
    if not st.capabilities.whole_samples or not callable(sample_bytes):
        return None
    need = sample_bytes(problem, request.quantity)
    budget = budget_bytes(problem, request)
    if need > budget:
        return f"one sample needs ~{format_bytes(need)}, over the budget {format_bytes(budget)}"
    return None


def work_of(st: Strategy, problem: Problem, quantity: str) -> tuple[float, float, float]:
    """``(estimated seconds, multiply-adds, bytes moved)`` of one call of strategy ``st``."""
    macs = float(st.estimate(problem, quantity))
    traffic = getattr(st, "traffic", None)  # optional in the protocol
    moved = float(traffic(problem, quantity)) if callable(traffic) else 0.0
    device, itemsize = problem.x.device.type, problem.x.element_size()
    return seconds(macs, moved, device, itemsize), macs, moved


def _note(work: tuple[float, float, float], detail: str) -> str:
    time_, macs, moved = work
    text = f"~{1e3 * time_:.3g} ms: {format_bytes(int(moved))} moved, {macs:.3g} MAC"
    return text + (f" ({detail})" if detail else "")


def candidate_order(
    problem: Problem, request: Request
) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...], dict[str, tuple], tuple]:
    """The candidates in order, a note on each, their estimates, and earlier failures.

    Returns:
        The names to try, cheapest first; ``(name, note)`` for every strategy of the table
        (the estimate, or why it declined); ``(seconds, MACs, bytes)`` estimates; and
        ``(name, why)`` of those skipped because they failed on this model before.

    Raises:
        StrategyError: A named strategy does not exist.
        Declined: A named strategy declines the request.
    """
    if request.strategy != "auto":
        st = get_strategy(request.strategy, problem.api)
        declined = _declines(st, problem, request)
        if declined is not None:
            raise declined
        work = work_of(st, problem, request.quantity)
        return (st.name,), ((st.name, _note(work, "")),), {st.name: work}, ()
    if problem.scripted:
        names: tuple[str, ...] = SCRIPTED_ORDER
    else:
        order = "second_order" if QUANTITIES[request.quantity].second_order else "first_order"
        names = AUTO_ORDER[(order, "tall" if problem.n < problem.m else "wide")]
    notes, costs, failed = [], {}, []
    for name in names:
        st = get_strategy(name)
        declined = _declines(st, problem, request)
        if declined is not None and declined.failed:
            failed.append((name, declined.failed))
        if declined is None:
            costs[name] = work_of(st, problem, request.quantity)
            notes.append((name, _note(costs[name], st.describe(problem, request.quantity))))
        else:
            notes.append((name, f"n/a: {declined.reason}"))
    ordered = tuple(sorted(costs, key=lambda k: costs[k][0]))
    return ordered, tuple(notes), costs, tuple(failed)


def budget_bytes(problem: Problem, request: Request) -> int:
    """The budget in bytes: ``max_memory``, or a fraction of the device's free memory."""
    given = parse_bytes(request.max_memory, problem.api)
    return given or int(available_bytes(problem.x.device) * DEFAULT_BUDGET_FRACTION)


def result_bytes(problem: Problem, quantity: str, strategy: Strategy) -> int:
    """Bytes of the arrays a strategy writes for ``quantity``."""
    size = 0
    for items, tail in QUANTITIES[quantity].outputs(problem, strategy).values():
        per = items
        for d in tail:
            per *= d
        size += per
    return problem.batch * size * problem.x.element_size()


def chunking(problem: Problem, request: Request, name: str) -> Chunking:
    """Sizes the steps of strategy ``name`` within the memory budget.

    ``chunk_size`` counts work items (Hessian rows, over all samples) per step; ``None``
    lets the budget decide (all at once if it fits), ``1`` is one item of one sample a step.

    Raises:
        MemoryBudgetError: The result, or one item's working set next to it, exceeds the
            budget.
    """
    strategy = get_strategy(name, problem.api)
    caps = strategy.capabilities
    budget = budget_bytes(problem, request)
    items = QUANTITIES[request.quantity].items(problem, strategy)
    result = result_bytes(problem, request.quantity, strategy)
    per_row = 3 * problem.n * problem.x.element_size()  # directions, products, result rows
    if caps.whole_samples and callable(getattr(strategy, "sample_bytes", None)):
        per_sample = int(strategy.sample_bytes(problem, request.quantity))  # type: ignore[attr-defined]
        graph, per_item = 0, max(1, per_sample // max(items, 1))
    elif caps.sequential:  # one graph per sample; items add their rows only
        graph = int(strategy.memory_factor * max(problem.saved_bytes, 1))
        per_item = per_row
    else:
        graph, per_item = 0, int(strategy.memory_factor * max(problem.saved_bytes, 1)) + per_row
    check_fits(problem, request, result, graph + per_item, budget)
    if request.chunk_size is not None:
        units, why = request.chunk_size, f"chunk_size={request.chunk_size}"
    else:
        units = max(1, (budget - result - graph) // per_item)
        why = (
            "all work in one step fits the budget"
            if units >= items * problem.batch
            else f"steps sized to the budget ({format_bytes(budget)})"
        )
    if caps.whole_samples:
        rows, samples = items, max(1, min(problem.batch, units // max(items, 1)))
    elif units >= items:
        rows, samples = items, max(1, min(problem.batch, units // items))
    else:
        rows, samples = units, 1
    steps = -(-problem.batch // samples) * -(-max(items, 1) // max(rows, 1))
    step_bytes = samples * graph + samples * rows * per_item
    return Chunking(
        items=items,
        samples_per_step=samples,
        rows_per_step=rows,
        steps=steps,
        result_bytes=result,
        step_bytes=step_bytes,
        budget_bytes=budget,
        why=why,
    )


def check_fits(problem: Problem, request: Request, result: int, per_item: int, budget: int) -> None:
    """Checks that the result and one item's working set fit in the budget.

    Raises:
        MemoryBudgetError: They do not.
    """
    source = "max_memory" if request.max_memory is not None else "half of the free memory"
    if result + per_item > budget:
        raise MemoryBudgetError(
            f"{problem.api}: the {request.quantity} of B={problem.batch} samples with "
            f"n={problem.n} inputs and m={problem.m} outputs needs {format_bytes(result)} "
            f"for the result plus at least {format_bytes(per_item)} of working memory, but "
            f"the budget ({source}) is {format_bytes(budget)}. Raise max_memory, select "
            "fewer outputs with output=, pass fewer samples, or ask for hessian_diag / "
            "laplacian / hvp, which never form the full matrix."
        )


def make_plan(problem: Problem, request: Request, order: tuple[str, ...] | None = None) -> Plan:
    """The plan of a request: candidates, estimates and the steps of the first candidate.

    Args:
        problem: The canonical problem.
        request: What the caller asked for.
        order: The candidates in the order to try them (tuning's order); ``None``: by
            estimated cost.

    Raises:
        StrategyError: No strategy can compute the request.
        Declined: The named strategy declines it.
        MemoryBudgetError: The result does not fit in the budget.
    """
    candidates, notes, costs, failed = candidate_order(problem, request)
    if not candidates:
        raise StrategyError(
            f"{problem.api}: no strategy can compute this: "
            + "; ".join(f"{name}: {note}" for name, note in notes)
            + "."
        )
    if order is not None:
        candidates = tuple(n for n in order if n in candidates) + tuple(
            n for n in candidates if n not in order
        )
    first = candidates[0]
    if request.strategy != "auto":
        choice = "requested"
    elif order is not None:
        choice = "chosen by tuning"
    else:
        choice = "the cheapest candidate" if len(candidates) > 1 else "the only candidate"
    plan_chunks = chunking(problem, request, first)
    reason = f"{get_strategy(first).description}; {choice}; {plan_chunks.why}"
    return Plan(
        request=request,
        model=problem.model,
        strategy=first,
        candidates=candidates,
        costs=tuple((name, work[0]) for name, work in costs.items()),
        work=tuple((name, work[1], work[2]) for name, work in costs.items()),
        batch=problem.batch,
        n=problem.n,
        m=problem.m,
        chunks=plan_chunks,
        reason=reason,
        estimates=notes,
        failed=failed,
        captured=problem.anchor is not None,
        capture_note=problem.capture_failure,
        anchor=problem.anchor.capture if problem.anchor is not None else None,
    )
