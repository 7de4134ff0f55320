"""Quantities that never form the full Hessian: HVPs, Hessian diagonals, Laplacians."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .io import Sink

from .front import run
from .planning.plan import Request
from .planning.problem import Selection
from .streaming import stream as _stream

Fn = Callable[[torch.Tensor], torch.Tensor]
Memory = int | str | None


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
    args: tuple = (),
    kwargs: dict | None = None,
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
        args: Fixed extra positional arguments of ``f`` after ``x``: passed unchanged to
            every call, not differentiated.
        kwargs: Fixed keyword arguments of ``f``, passed the same way.

    Returns:
        Shape ``Q + S``, with a leading ``B`` when batched.

    >>> import torch, hesse
    >>> hesse.hvp(lambda x: (x**3).sum(), torch.tensor([1.0, 2.0]), torch.ones(2))
    tensor([ 6., 12.])
    """
    request = Request(
        "hesse.hvp", "hvp", output, batched, flat, strategy, None, None, create_graph, False,
        args, kwargs,
    )  # fmt: skip
    return run(request, f, x, v)


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
    out: str | os.PathLike | Sink | None = None,
    resume: bool = False,
    args: tuple = (),
    kwargs: dict | None = None,
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
        Shape ``Q + S`` (the shape of ``x`` per selected output), a leading ``B`` if batched.
    """
    if out is not None:
        return _stream(
            "hessian_diag",
            f,
            x,
            args,
            kwargs,
            out,
            output,
            batched,
            flat,
            strategy,
            max_memory,
            resume,
        )
    request = Request(
        "hesse.hessian_diag", "hessian_diag", output, batched, flat, strategy, chunk_size,
        max_memory, create_graph, progress, args, kwargs,
    )  # fmt: skip
    return run(request, f, x)


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
    out: str | os.PathLike | Sink | None = None,
    resume: bool = False,
    args: tuple = (),
    kwargs: dict | None = None,
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
        Shape ``Q``: one number per selected output, with a leading ``B`` when batched.

    >>> import torch, hesse
    >>> hesse.laplacian(lambda x: (x**2).sum(), torch.zeros(3))
    tensor(6.)
    """
    if out is not None:
        return _stream(
            "laplacian",
            f,
            x,
            args,
            kwargs,
            out,
            output,
            batched,
            flat,
            strategy,
            max_memory,
            resume,
        )
    request = Request(
        "hesse.laplacian", "laplacian", output, batched, flat, strategy, chunk_size,
        max_memory, create_graph, progress, args, kwargs,
    )  # fmt: skip
    return run(request, f, x)
