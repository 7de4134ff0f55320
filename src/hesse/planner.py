"""The planner: which strategy, how many work items per step, and how much memory.

``strategy="auto"`` takes the candidates of the decision table (:data:`AUTO_ORDER`, per
quantity and shape regime), drops those that decline the request (with the reason), and
orders the rest by estimated cost (multiply-adds, see :func:`estimate`). The cheapest
runs; if it fails on an operator (no forward-mode rule, not vmappable) the engine moves to
the next one that does not need what failed. Chunks are sized from the memory budget: the
result must fit, and a step of ``s`` samples times ``r`` work items costs ``s * r`` times
the measured working set of one item (``s`` times for strategies that run items one
after another).
"""

from __future__ import annotations

from dataclasses import dataclass

from ._problem import Problem
from ._quantities import QUANTITIES
from ._tuning import TIMING
from .errors import MemoryBudgetError, StrategyError
from .memory import available_bytes, format_bytes, parse_bytes, profile_forward
from .strategies import Strategy, get_strategy

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
# Cost of one work item in forward passes, and fixed costs in multiply-add equivalents
# (Python and dispatch overhead): per vectorised step, and per item for the loop.
PRODUCT_COST = {"vmap": 4.0, "reverse": 5.0, "loop": 5.0}
STEP_OVERHEAD = 2e6
ITEM_OVERHEAD = {"loop": 5e6}
SCRIPTED_ORDER = ("loop",)  # TorchScript: vmap and forward mode are unreliable there
DEFAULT_BUDGET_FRACTION = 0.5  # of the device's free memory, when max_memory is None


@dataclass(frozen=True)
class Plan:
    """A printable plan: what will run, in how many steps, with how much memory.

    Attributes:
        api: The public call.
        quantity: ``"hessian"``, ``"jacobian"``, ...
        strategy: The strategy that runs first.
        candidates: Strategies ``"auto"`` would try, in order.
        batch: Number of samples ``B``.
        n: Inputs per sample.
        m: Selected outputs per sample.
        items: Work items per sample (Hessian rows over all selected outputs, ...).
        samples_per_step: Samples per vectorised step.
        rows_per_step: Work items per vectorised step.
        steps: Number of steps.
        result_bytes: Size of the result.
        step_bytes: Estimated working memory of one step.
        budget_bytes: The memory budget used to size the steps.
        reason: Why this strategy and these steps.
        estimates: ``(strategy, estimated cost or why it declined)`` for every candidate.
    """

    api: str
    quantity: str
    strategy: str
    candidates: tuple[str, ...]
    batch: int
    n: int
    m: int
    items: int
    samples_per_step: int
    rows_per_step: int
    steps: int
    result_bytes: int
    step_bytes: int
    budget_bytes: int
    reason: str
    estimates: tuple[tuple[str, str], ...] = ()

    @property
    def peak_bytes(self) -> int:
        """Estimated peak: the result plus one step's working set."""
        return self.result_bytes + self.step_bytes

    def __str__(self) -> str:
        rows = [
            ("call", self.api if self.quantity in self.api else f"{self.api} ({self.quantity})"),
            ("strategy", self.strategy),
            ("problem", f"B={self.batch} samples, n={self.n} inputs, m={self.m} outputs"),
            ("work", f"{self.items} items per sample, {self.batch * self.items} in all"),
            ("step", f"{self.samples_per_step} samples x {self.rows_per_step} items"),
            ("steps", str(self.steps)),
            ("result", format_bytes(self.result_bytes)),
            ("peak (est.)", format_bytes(self.peak_bytes)),
            ("budget", format_bytes(self.budget_bytes)),
            ("why", self.reason),
        ]
        rows += [(f"  {name}", note) for name, note in self.estimates]
        width = max(len(k) for k, _ in rows)
        return "hesse plan\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def unsupported(st: Strategy, problem: Problem, quantity: str, create_graph: bool) -> str | None:
    """Why a strategy declines a request up front (``None``: it accepts)."""
    check = getattr(st, "unsupported", None)
    return check(problem, quantity, create_graph) if callable(check) else None


def estimate(problem: Problem, quantity: str, st: Strategy) -> float:
    """Estimated multiply-adds (plus overheads) of the whole call with strategy ``st``."""
    own = getattr(st, "estimate", None)
    if callable(own):
        return float(own(problem, quantity))
    items = QUANTITIES[quantity].items(problem, st)
    passes = 2.0 if quantity == "jacobian" else PRODUCT_COST.get(st.name, 5.0)
    per_item = problem.forward_macs * passes
    overhead = ITEM_OVERHEAD.get(st.name, 0.0) * items + STEP_OVERHEAD
    return problem.batch * items * per_item + overhead


def candidate_order(
    problem: Problem, quantity: str, strategy: str, create_graph: bool = False
) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """The strategies to try, cheapest first, and a note on every candidate.

    Returns:
        The names to try in order, and ``(name, note)`` pairs: the estimated cost, or why
        the strategy declined.

    Raises:
        StrategyError: A named strategy does not exist or declines the request.
    """
    if strategy != "auto":
        st = get_strategy(strategy, problem.api)
        reason = unsupported(st, problem, quantity, create_graph)
        if reason is not None:
            raise StrategyError(
                f"{problem.api}: strategy '{strategy}' cannot compute this: {reason}. Use "
                "strategy='auto' to let hesse pick one that can."
            )
        return (strategy,), ((strategy, f"{estimate(problem, quantity, st):.3g} MAC"),)
    if problem.scripted:
        names: tuple[str, ...] = SCRIPTED_ORDER
    else:
        order = "second_order" if QUANTITIES[quantity].second_order else "first_order"
        names = AUTO_ORDER[(order, "tall" if problem.n < problem.m else "wide")]
    notes, costs = [], {}
    for name in names:
        st = get_strategy(name)
        reason = unsupported(st, problem, quantity, create_graph)
        if reason is None:
            costs[name] = estimate(problem, quantity, st)
            describe = getattr(st, "describe", None)
            detail = f" ({describe(problem, quantity)})" if callable(describe) else ""
            notes.append((name, f"{costs[name]:.3g} MAC{detail}"))
        else:
            notes.append((name, f"n/a: {reason}"))
    ordered = tuple(sorted(costs, key=lambda k: costs[k]))
    return ordered, tuple(notes)


def _result_bytes(problem: Problem, quantity: str, strategy: Strategy) -> int:
    size = sum(
        items * _prod(tail)
        for items, tail in QUANTITIES[quantity].outputs(problem, strategy).values()
    )
    return problem.batch * size * problem.x.element_size()


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _choice(estimates: tuple[tuple[str, str], ...]) -> str:
    """Why this candidate runs: requested, cheapest estimate, or timed (see :mod:`._tuning`)."""
    tuned = dict(estimates).get("tuning", "")
    if tuned.startswith(TIMING):
        return "the close candidates are being timed, one after the other"
    if tuned:
        return "the fastest of the close candidates when timed"
    return "the cheapest candidate" if len(estimates) > 1 else "requested"


def make_plan(
    problem: Problem,
    quantity: str,
    strategy_name: str,
    candidates: tuple[str, ...],
    chunk_size: int | None,
    max_memory: int | str | None,
    estimates: tuple[tuple[str, str], ...] = (),
) -> Plan:
    """Sizes the steps of ``strategy_name`` on ``problem`` within the memory budget.

    Args:
        problem: The canonical problem.
        quantity: A key of :data:`hesse._quantities.QUANTITIES`.
        strategy_name: The strategy to plan for.
        candidates: The full candidate list (for the printout).
        chunk_size: Work items (Hessian rows, over all samples) per step; ``None`` lets the
            budget decide (all at once if it fits), ``1`` is one item of one sample a step.
        max_memory: Budget in bytes or a string like ``"2GB"``; ``None`` means half of the
            device's free memory.
        estimates: Notes on every candidate, for the printout.

    Returns:
        The plan.

    Raises:
        MemoryBudgetError: The result, or one item's working set next to it, exceeds the
            budget.
    """
    strategy = get_strategy(strategy_name, problem.api)
    given = parse_bytes(max_memory, problem.api)
    budget = given or int(available_bytes(problem.x.device) * DEFAULT_BUDGET_FRACTION)
    items = QUANTITIES[quantity].items(problem, strategy)
    result = _result_bytes(problem, quantity, strategy)
    itemsize = problem.x.element_size()
    per_item = int(strategy.memory_factor * max(problem.saved_bytes, 1))
    per_item += 3 * problem.n * itemsize
    spare = budget - result
    _check_fits(problem, quantity, result, per_item, budget, given is not None)
    if chunk_size is not None:
        units, why = chunk_size, f"chunk_size={chunk_size}"
    else:
        units = max(1, spare // per_item)
        why = (
            "all work in one step fits the budget"
            if units >= items * problem.batch
            else (f"steps sized to the budget ({format_bytes(budget)})")
        )
    if strategy.sequential or callable(getattr(strategy, "compute", None)):
        rows, samples = items, max(1, min(problem.batch, units // max(items, 1)))
    elif units >= items:
        rows, samples = items, min(problem.batch, units // items)
    else:
        rows, samples = units, 1
    steps = -(-problem.batch // samples) * -(-items // rows)
    step_units = samples if strategy.sequential else samples * rows
    reason = f"{strategy.description}; {_choice(estimates)}; {why}"
    return Plan(
        api=problem.api,
        quantity=quantity,
        strategy=strategy_name,
        candidates=candidates,
        batch=problem.batch,
        n=problem.n,
        m=problem.m,
        items=items,
        samples_per_step=samples,
        rows_per_step=rows,
        steps=steps,
        result_bytes=result,
        step_bytes=step_units * per_item,
        budget_bytes=budget,
        reason=reason,
        estimates=estimates,
    )


def _check_fits(
    problem: Problem, quantity: str, result: int, per_item: int, budget: int, given: bool
) -> None:
    source = "max_memory" if given else "half of the free memory"
    if result + per_item > budget:
        raise MemoryBudgetError(
            f"{problem.api}: the {quantity} of B={problem.batch} samples with n={problem.n} "
            f"inputs and m={problem.m} outputs needs {format_bytes(result)} for the result "
            f"plus at least {format_bytes(per_item)} of working memory, but the budget "
            f"({source}) is {format_bytes(budget)}. Raise max_memory, select fewer outputs "
            "with output=, pass fewer samples, or ask for hessian_diag / laplacian / hvp, "
            "which never form the full matrix."
        )


def measure(problem: Problem) -> Problem:
    """Fills in the working set and multiply-adds of one sample (one extra forward pass)."""
    if "profile" not in problem.cache:
        problem.cache["profile"] = profile_forward(problem.fn, problem.x[:1])
    return problem
