"""The public front: Jacobians, Hessians, their diagonals, Laplacians and HVPs in one call.

Every function validates its arguments, reduces the request to the canonical problem of
:mod:`hesse._problem`, lets the planner pick a strategy and chunking, runs it through the
engine, and shapes the result. Shapes, with ``S`` the per-sample input shape and ``Q`` the
shape of the selected per-sample output (``()`` for one selected element):

============  ================  =======================================
quantity      ``flat=False``    ``flat=True``
============  ================  =======================================
jacobian      ``Q + S``         ``(m, n)``, or ``(n,)`` when ``Q == ()``
hessian       ``Q + S + S``     ``(m, n, n)``, or ``(n, n)``
hessian_diag  ``Q + S``         ``(m, n)``, or ``(n,)``
laplacian     ``Q``             ``(m,)``, or ``()``
hvp           ``Q + S``         ``(m, n)``, or ``(n,)``
============  ================  =======================================

``batched=True`` prepends the batch size ``B`` to every shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._engine import execute
from ._problem import Selection, build_problem
from ._quantities import QUANTITIES, forward_jacobian
from ._results import check_options, finish, warn_zero
from ._tuning import request_key, tuner_for
from .errors import StrategyError, UnsupportedInputError
from .planner import Plan, candidate_order, make_plan, measure
from .strategies import get_strategy

Fn = Callable[[torch.Tensor], torch.Tensor]
Memory = int | str | None


def jacobian(
    f: Fn,
    x: torch.Tensor,
    *,
    output: Selection = None,
    batched: bool = False,
    flat: bool = False,
    strategy: str = "auto",
    chunk_size: int | None = None,
    max_memory: Memory = None,
    create_graph: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """Jacobian of ``f`` with respect to its input, by vectorised reverse (or forward) mode.

    Args:
        f: Function or ``nn.Module`` taking one tensor and returning one tensor.
        x: Input, shape ``S`` (or ``(B, *S)`` with ``batched=True``), any floating dtype.
        output: Which outputs: ``None`` (all), an int (flat index into the per-sample
            output), a tuple (one element), a list / slice / 1-D LongTensor (several).
        batched: The first dimension of ``x`` holds independent samples; ``f`` is called on
            (sub-)batches and the result holds one Jacobian per sample.
        flat: Return matrices ``(m, n)`` instead of ``Q + S``.
        strategy: ``"auto"`` or one of :func:`hesse.available_strategies`.
        chunk_size: Work items (Jacobian rows, over all samples) per vectorised step;
            ``None``: as many as the memory budget allows; ``1``: one at a time.
        max_memory: Memory budget in bytes or a string like ``"2GB"``.
        create_graph: Keep the graph so the result can be differentiated again.
        progress: Show a progress bar over the steps.

    Returns:
        Shape ``Q + S`` (``(m, n)`` / ``(n,)`` flat), with a leading ``B`` when batched.

    >>> import torch, hesse
    >>> W = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    >>> torch.equal(hesse.jacobian(lambda x: W @ x, torch.ones(2)), W)
    True
    """
    api = "hesse.jacobian"
    check_options(api, chunk_size, strategy, batched=batched, flat=flat)
    problem = build_problem(api, f, x, output, batched, keep_graph=create_graph)
    arrays, plan = execute(
        problem,
        "jacobian",
        strategy,
        chunk_size,
        max_memory,
        create_graph=create_graph,
        progress=progress,
    )
    jac = arrays["jacobian"]
    if forward_jacobian(problem, get_strategy(plan.strategy)):
        jac = jac.transpose(1, 2)
    warn_zero(problem, jac, second_order=False)
    return finish(problem, jac, 1, flat)


def hessian(
    f: Fn,
    x: torch.Tensor,
    *,
    output: Selection = None,
    batched: bool = False,
    flat: bool = False,
    strategy: str = "auto",
    chunk_size: int | None = None,
    max_memory: Memory = None,
    create_graph: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """Hessian of ``f`` with respect to its input, from vectorised Hessian-vector products.

    Rows of each selected output's Hessian are computed in chunks of Hessian-vector
    products (forward-over-reverse by default) and streamed into the result. For a batch,
    each sample gets its own Hessian; there are no cross-sample blocks.

    Args:
        f: Function or ``nn.Module`` taking one tensor and returning one tensor.
        x: Input, shape ``S`` (or ``(B, *S)`` with ``batched=True``).
        output: Which outputs (see :func:`jacobian`); one element gives ``Q = ()``.
        batched: The first dimension of ``x`` holds independent samples.
        flat: Return ``(m, n, n)`` matrices (``(n, n)`` for one selected element).
        strategy: ``"auto"`` or one of :func:`hesse.available_strategies`.
        chunk_size: Hessian rows (over all samples and outputs) per vectorised step;
            ``None``: as many as the memory budget allows; ``1``: one row at a time.
        max_memory: Memory budget in bytes or a string like ``"2GB"``; the result must fit.
        create_graph: Keep the graph so the Hessian can be differentiated again.
        progress: Show a progress bar over the steps.

    Returns:
        Shape ``Q + S + S`` (``(m, n, n)`` / ``(n, n)`` flat), a leading ``B`` when batched.

    Raises:
        MemoryBudgetError: The result does not fit in ``max_memory``.

    >>> import torch, hesse
    >>> f = lambda x: x * x * torch.arange(4.0)
    >>> hesse.hessian(f, torch.ones(4), output=2)
    tensor([[0., 0., 0., 0.],
            [0., 0., 0., 0.],
            [0., 0., 4., 0.],
            [0., 0., 0., 0.]])
    """
    api = "hesse.hessian"
    check_options(api, chunk_size, strategy, batched=batched, flat=flat)
    problem = build_problem(api, f, x, output, batched, keep_graph=create_graph)
    arrays, _ = execute(
        problem,
        "hessian",
        strategy,
        chunk_size,
        max_memory,
        create_graph=create_graph,
        progress=progress,
    )
    warn_zero(problem, arrays["hessian"], second_order=True)
    return finish(problem, arrays["hessian"], 2, flat)


def derivatives(
    f: Fn,
    x: torch.Tensor,
    *,
    output: Selection = None,
    batched: bool = False,
    flat: bool = False,
    strategy: str = "auto",
    chunk_size: int | None = None,
    max_memory: Memory = None,
    create_graph: bool = False,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Value, Jacobian and Hessian of ``f`` from one pass of Hessian-vector products.

    The gradients come for free with the Hessian-vector products (the primal output of
    forward-over-reverse), so this costs one :func:`hessian` call.

    Args:
        f: Function or ``nn.Module`` taking one tensor and returning one tensor.
        x: Input, shape ``S`` (or ``(B, *S)`` with ``batched=True``).
        output: Which outputs (see :func:`jacobian`).
        batched: The first dimension of ``x`` holds independent samples.
        flat: Matrices instead of input-shaped layouts (see :func:`hessian`).
        strategy: ``"auto"`` or one of :func:`hesse.available_strategies`.
        chunk_size: Hessian rows per vectorised step (see :func:`hessian`).
        max_memory: Memory budget in bytes or a string like ``"2GB"``.
        create_graph: Keep the graph so the results can be differentiated again.
        progress: Show a progress bar over the steps.

    Returns:
        ``(value, jacobian, hessian)`` of shapes ``Q``, ``Q + S`` and ``Q + S + S``
        (flat: ``(m,)``, ``(m, n)``, ``(m, n, n)``, without ``m`` for one element), each
        with a leading ``B`` when batched.
    """
    api = "hesse.derivatives"
    check_options(api, chunk_size, strategy, batched=batched, flat=flat)
    problem = build_problem(api, f, x, output, batched, keep_graph=create_graph)
    arrays, _ = execute(
        problem,
        "derivatives",
        strategy,
        chunk_size,
        max_memory,
        create_graph=create_graph,
        progress=progress,
    )
    with torch.no_grad() if not create_graph else torch.enable_grad():
        value = problem.fn(problem.x)
    warn_zero(problem, arrays["gradient"], second_order=False)
    warn_zero(problem, arrays["hessian"], second_order=True)
    return (
        finish(problem, value, 0, flat),
        finish(problem, arrays["gradient"], 1, flat),
        finish(problem, arrays["hessian"], 2, flat),
    )


def plan(
    f: Fn,
    x: torch.Tensor,
    quantity: str = "hessian",
    *,
    output: Selection = None,
    batched: bool = False,
    strategy: str = "auto",
    chunk_size: int | None = None,
    max_memory: Memory = None,
) -> Plan:
    """The plan a call would follow: strategy, steps, memory estimates and why.

    Runs the same checks as the call itself and one forward pass of one sample (to measure
    the working set), but computes no derivative.

    Args:
        f: Function or ``nn.Module``.
        x: Input, as for the call.
        quantity: ``"jacobian"``, ``"hessian"``, ``"hessian_diag"``, ``"laplacian"``,
            ``"hvp"`` or ``"derivatives"``.
        output: As for the call.
        batched: As for the call.
        strategy: As for the call.
        chunk_size: As for the call.
        max_memory: As for the call.

    Returns:
        A :class:`Plan`; ``print(plan)`` shows it as a table.

    Raises:
        MemoryBudgetError: The call would not fit in the budget.
    """
    api = f"hesse.plan({quantity})"
    if quantity not in QUANTITIES:
        raise UnsupportedInputError(
            f"hesse.plan: unknown quantity {quantity!r}; expected one of "
            f"{', '.join(map(repr, QUANTITIES))}."
        )
    check_options(api, chunk_size, strategy, batched=batched)
    problem = measure(build_problem(api, f, x, output, batched))
    candidates, estimates = candidate_order(problem, quantity, strategy)
    if not candidates:
        raise StrategyError(f"{api}: no strategy can compute this: {dict(estimates)}.")
    key = request_key(problem, quantity, chunk_size, max_memory, False)
    tuner = tuner_for(problem, key, candidates) if strategy == "auto" else None
    if tuner is not None:  # earlier calls timed the close candidates
        candidates = tuner.order(candidates)
        estimates = (*estimates, ("tuning", tuner.summary()))
    return make_plan(
        problem, quantity, candidates[0], candidates, chunk_size, max_memory, estimates
    )
