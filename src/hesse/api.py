"""The public front: Jacobians, Hessians, their diagonals, Laplacians and HVPs in one call.

Every function is a thin wrapper: it states the request, and :mod:`hesse.front` plans it
(or finds the plan of an earlier call on the unchanged model) and runs it. Shapes, with
``S`` the per-sample input shape and ``Q`` the shape of the selected per-sample output
(``()`` for one selected element):

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

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .io import Sink

from .front import plan_of, run
from .planning.plan import Plan, Request
from .planning.problem import Selection
from .streaming import stream as _stream

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
    out: str | os.PathLike | Sink | None = None,
    resume: bool = False,
    args: tuple = (),
    kwargs: dict | None = None,
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
        out: Stream the result into a file instead of memory: ``"H.npy"``, ``"H.zarr"``
            or ``"H.safetensors"``, or a :class:`hesse.io.Sink` object, block by block
            within ``max_memory``, with a manifest of finished blocks (see
            :func:`hesse.io.compute_to`); returns its handle. With ``out``, ``x`` may
            also be a NumPy memmap, a zarr array or an iterable of batches (e.g. a
            ``DataLoader``; ``batched=True``), streamed through.
        resume: With ``out``, skip the blocks an interrupted run already finished.
        args: Fixed extra positional arguments of ``f`` after ``x`` (species, neighbour
            lists, conditioning inputs): passed unchanged to every call, not
            differentiated.
        kwargs: Fixed keyword arguments of ``f``, passed the same way.

    Returns:
        Shape ``Q + S`` (``(m, n)`` / ``(n,)`` flat), with a leading ``B`` when batched.

    >>> import torch, hesse
    >>> W = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    >>> torch.equal(hesse.jacobian(lambda x: W @ x, torch.ones(2)), W)
    True
    """
    if out is not None:
        return _stream(
            "jacobian", f, x, args, kwargs, out, output, batched, flat, strategy, max_memory, resume
        )
    request = Request(
        "hesse.jacobian", "jacobian", output, batched, flat, strategy, chunk_size, max_memory,
        create_graph, progress, args, kwargs,
    )  # fmt: skip
    return run(request, f, x)


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
    out: str | os.PathLike | Sink | None = None,
    resume: bool = False,
    args: tuple = (),
    kwargs: dict | None = None,
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
        out: Stream the result into a file instead of memory: ``"H.npy"``, ``"H.zarr"``
            or ``"H.safetensors"``, or a :class:`hesse.io.Sink` object, block by block
            within ``max_memory``, with a manifest of finished blocks (see
            :func:`hesse.io.compute_to`); returns its handle. With ``out``, ``x`` may
            also be a NumPy memmap, a zarr array or an iterable of batches (e.g. a
            ``DataLoader``; ``batched=True``), streamed through.
        resume: With ``out``, skip the blocks an interrupted run already finished.
        args: Fixed extra positional arguments of ``f`` after ``x`` (species, neighbour
            lists, conditioning inputs): passed unchanged to every call, not
            differentiated.
        kwargs: Fixed keyword arguments of ``f``, passed the same way.

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
    if out is not None:
        return _stream(
            "hessian", f, x, args, kwargs, out, output, batched, flat, strategy, max_memory, resume
        )
    request = Request(
        "hesse.hessian", "hessian", output, batched, flat, strategy, chunk_size, max_memory,
        create_graph, progress, args, kwargs,
    )  # fmt: skip
    return run(request, f, x)


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
    args: tuple = (),
    kwargs: dict | None = None,
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
        args: Fixed extra positional arguments of ``f`` after ``x`` (species, neighbour
            lists, conditioning inputs): passed unchanged to every call, not
            differentiated.
        kwargs: Fixed keyword arguments of ``f``, passed the same way.

    Returns:
        ``(value, jacobian, hessian)`` of shapes ``Q``, ``Q + S`` and ``Q + S + S``
        (flat: ``(m,)``, ``(m, n)``, ``(m, n, n)``, without ``m`` for one element), each
        with a leading ``B`` when batched.
    """
    request = Request(
        "hesse.derivatives", "derivatives", output, batched, flat, strategy, chunk_size,
        max_memory, create_graph, progress, args, kwargs,
    )  # fmt: skip
    return run(request, f, x)


def plan(
    f: Fn,
    x: torch.Tensor,
    quantity: str = "hessian",
    *,
    output: Selection = None,
    batched: bool = False,
    flat: bool = False,
    strategy: str = "auto",
    chunk_size: int | None = None,
    max_memory: Memory = None,
    create_graph: bool = False,
    progress: bool = False,
    args: tuple = (),
    kwargs: dict | None = None,
) -> Plan:
    """The plan of a call: strategy, steps, memory estimates and why; callable and tunable.

    Runs the same checks as the call and probes the model (one forward pass of one sample,
    kept while the model is unchanged), but computes no derivative. The plan is what the
    call would run now, with the tuning of earlier calls; ``print(p)`` shows it as a
    table, ``p(x)`` computes the quantity for an input of the same shape, ``p.tune(x)``
    times the candidates and returns the plan pinned to the fastest.

    Args:
        f: Function or ``nn.Module``.
        x: Input, as for the call.
        quantity: ``"jacobian"``, ``"hessian"``, ``"hessian_diag"``, ``"laplacian"``,
            ``"hvp"`` or ``"derivatives"``.
        output: As for the call.
        batched: As for the call.
        flat: As for the call.
        strategy: As for the call.
        chunk_size: As for the call.
        max_memory: As for the call.
        create_graph: As for the call.
        progress: As for the call.
        args: Fixed extra positional arguments of ``f`` after ``x`` (species, neighbour
            lists, conditioning inputs): passed unchanged to every call, not
            differentiated.
        kwargs: Fixed keyword arguments of ``f``, passed the same way.

    Returns:
        A :class:`Plan`.

    Raises:
        MemoryBudgetError: The call would not fit in the budget.

    >>> import torch, hesse
    >>> p = hesse.plan(lambda x: (x**3).sum(), torch.ones(2), "laplacian")
    >>> p(torch.ones(2))
    tensor(12.)
    """
    request = Request(
        f"hesse.plan({quantity})", quantity, output, batched, flat, strategy, chunk_size,
        max_memory, create_graph, progress, args, kwargs,
    )  # fmt: skip
    return plan_of(request, f, x)
