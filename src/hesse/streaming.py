"""``out=`` of the public functions: the result streamed into a file, block by block."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .io.sinks import Sink

Fn = Callable[..., torch.Tensor]


def stream(
    quantity: str,
    f: Fn,
    x: torch.Tensor,
    args: tuple,
    kwargs: dict | None,
    out: str | os.PathLike | Sink,
    output: Any,
    batched: bool,
    flat: bool,
    strategy: str,
    max_memory: int | str | None,
    resume: bool,
) -> object:
    """The result of ``quantity`` written into ``out``, a path or a :class:`hesse.io.Sink`.

    Returns:
        What the sink returns: a read-only memmap, a zarr array, the path, or the sink.
    """
    from .io import compute_to  # the file formats' packages load on first use

    if args or kwargs:
        bound, extra, named = f, tuple(args), dict(kwargs or {})

        def f(z: torch.Tensor) -> torch.Tensor:
            return bound(z, *extra, **named)

    return compute_to(
        quantity, f, x, out, output=output, batched=batched, flat=flat, max_memory=max_memory,
        resume=resume, progress=False, strategy=strategy,
    )  # fmt: skip
