"""Quantities that never form the full Hessian: HVPs, Hessian diagonals, Laplacians."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._engine import execute
from ._problem import Selection, build_problem
from ._results import check_options, finish, warn_zero
from .errors import NonFiniteError, UnsupportedInputError

Fn = Callable[[torch.Tensor], torch.Tensor]
Memory = int | str | None


def _flat_v(api: str, v: object, x: torch.Tensor, flat_x: torch.Tensor) -> torch.Tensor:
    """Checks ``v`` against ``x`` and flattens it like the problem's input: ``(B, n)``."""
    if not isinstance(v, torch.Tensor) or not v.is_floating_point():
        got = type(v).__name__ if not isinstance(v, torch.Tensor) else f"dtype {v.dtype}"
        raise UnsupportedInputError(
            f"{api}: expected v to be a real floating tensor shaped like x, got {got}."
        )
    if v.shape != x.shape:
        raise UnsupportedInputError(
            f"{api}: expected v of the same shape as x, {tuple(x.shape)}, got "
            f"{tuple(v.shape)}. For a batch, pass one direction per sample."
        )
    if not bool(torch.isfinite(v).all()):
        raise NonFiniteError(f"{api}: v holds NaN/Inf entries; pass a finite direction.")
    return v.to(device=flat_x.device, dtype=flat_x.dtype).reshape(flat_x.shape)


def hvp(
    f: Fn,
    x: torch.Tensor,
    v: torch.Tensor,
    *,
    output: Selection = None,
    batched: bool = False,
    flat: bool = False,
    strategy: str = "auto",
    create_graph: bool = False,
) -> torch.Tensor:
    """Hessian-vector product ``H(x) v`` of each selected output, without forming ``H``.

    Args:
        f: Function or ``nn.Module`` taking one tensor and returning one tensor.
        x: Input, shape ``S`` (or ``(B, *S)`` with ``batched=True``).
        v: Direction, the same shape as ``x`` (one direction per sample when batched).
        output: Which outputs (see :func:`hesse.jacobian`).
        batched: The first dimension of ``x`` holds independent samples.
        flat: Return ``(m, n)`` (``(n,)`` for one element) instead of ``Q + S``.
        strategy: ``"auto"`` or one of :func:`hesse.available_strategies`.
        create_graph: Keep the graph so the product can be differentiated again.

    Returns:
        Shape ``Q + S``, with a leading ``B`` when batched.

    >>> import torch, hesse
    >>> hesse.hvp(lambda x: (x**3).sum(), torch.tensor([1.0, 2.0]), torch.ones(2))
    tensor([ 6., 12.])
    """
    api = "hesse.hvp"
    check_options(api, None, strategy, batched=batched, flat=flat)
    problem = build_problem(api, f, x, output, batched, keep_graph=create_graph)
    direction = _flat_v(api, v, x, problem.x)
    arrays, _ = execute(
        problem, "hvp", strategy, None, None, v=direction, create_graph=create_graph
    )
    warn_zero(problem, arrays["hvp"], second_order=True)
    return finish(problem, arrays["hvp"], 1, flat)


def hessian_diag(
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
    """Diagonal of the Hessian, from Hessian-vector products, without storing ``H``.

    Args:
        f: Function or ``nn.Module`` taking one tensor and returning one tensor.
        x: Input, shape ``S`` (or ``(B, *S)`` with ``batched=True``).
        output: Which outputs (see :func:`hesse.jacobian`).
        batched: The first dimension of ``x`` holds independent samples.
        flat: Return ``(m, n)`` (``(n,)`` for one element) instead of ``Q + S``.
        strategy: ``"auto"`` or one of :func:`hesse.available_strategies`.
        chunk_size: Hessian rows per vectorised step (see :func:`hesse.hessian`).
        max_memory: Memory budget in bytes or a string like ``"2GB"``.
        create_graph: Keep the graph so the diagonal can be differentiated again.
        progress: Show a progress bar over the steps.

    Returns:
        Shape ``Q + S`` (the shape of ``x`` per selected output), a leading ``B`` if batched.
    """
    api = "hesse.hessian_diag"
    check_options(api, chunk_size, strategy, batched=batched, flat=flat)
    problem = build_problem(api, f, x, output, batched, keep_graph=create_graph)
    arrays, _ = execute(
        problem,
        "hessian_diag",
        strategy,
        chunk_size,
        max_memory,
        create_graph=create_graph,
        progress=progress,
    )
    warn_zero(problem, arrays["diag"], second_order=True)
    return finish(problem, arrays["diag"], 1, flat)


def laplacian(
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
    """Laplacian ``trace(H)`` of each selected output, without storing ``H``.

    Args:
        f: Function or ``nn.Module`` taking one tensor and returning one tensor.
        x: Input, shape ``S`` (or ``(B, *S)`` with ``batched=True``).
        output: Which outputs (see :func:`hesse.jacobian`).
        batched: The first dimension of ``x`` holds independent samples.
        flat: Return ``(m,)`` instead of ``Q`` (``()`` for one element either way).
        strategy: ``"auto"`` or one of :func:`hesse.available_strategies`.
        chunk_size: Hessian rows per vectorised step (see :func:`hesse.hessian`).
        max_memory: Memory budget in bytes or a string like ``"2GB"``.
        create_graph: Keep the graph, e.g. to train a PINN on a Laplacian residual.
        progress: Show a progress bar over the steps.

    Returns:
        Shape ``Q``: one number per selected output, with a leading ``B`` when batched.

    >>> import torch, hesse
    >>> hesse.laplacian(lambda x: (x**2).sum(), torch.zeros(3))
    tensor(6.)
    """
    api = "hesse.laplacian"
    check_options(api, chunk_size, strategy, batched=batched, flat=flat)
    problem = build_problem(api, f, x, output, batched, keep_graph=create_graph)
    arrays, _ = execute(
        problem,
        "laplacian",
        strategy,
        chunk_size,
        max_memory,
        create_graph=create_graph,
        progress=progress,
    )
    if "laplacian" in arrays:  # whole-result strategies: (B, m)
        lap = arrays["laplacian"].reshape(problem.batch, problem.m)
    else:
        lap = arrays["diag"].reshape(problem.batch, problem.m, problem.n).sum(-1)
    warn_zero(problem, lap, second_order=True)
    return finish(problem, lap, 0, flat)
