"""``torch.export`` programs: a static batch size, made to work per sample.

``torch.export.export(model, (x,)).module()`` is a ``GraphModule`` that checks its input
shapes against the example it was exported with (``_guards_fn``): with a static batch
size ``B0`` it refuses every other batch size, including the single samples hesse's
probes and strategies call it on. Samples are independent (hesse checks it), so a
sub-batch of ``k`` samples can be run inside a batch of ``B0``: :class:`StaticBatch` fills
the other rows with detached copies of the first sample and returns the first ``k``
outputs, which depend on the ``k`` inputs alone; more than ``B0`` samples run in blocks of
``B0``. Per-sample shapes the program was not exported for, and single inputs of another
shape, get a typed error naming the shapes, before torch's guard can fail.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError


def exported_shape(f: object) -> tuple[int | None, ...] | None:
    """The input shape a ``torch.export`` module was exported for (None: dynamic dim).

    None if ``f`` is not such a module or its first input is not one tensor.
    """
    if not isinstance(f, torch.fx.GraphModule) or not hasattr(f, "_guards_fn"):
        return None
    first = next((n for n in f.graph.nodes if n.op == "placeholder"), None)
    val = first.meta.get("val") if first is not None else None
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(s if isinstance(s, int) else None for s in val.shape)


class StaticBatch(nn.Module):
    """Runs sub-batches of any size through a program exported for a batch of ``size``."""

    def __init__(self, program: nn.Module, size: int):
        super().__init__()
        self.training = False
        self.program = program
        self.size = size

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The program's outputs for the ``k`` samples of ``x``: ``(k, ...)``."""
        k, size = x.shape[0], self.size
        if k == size:
            return self.program(x, *args, **kwargs)
        if k > size:
            blocks = [self(x[i : i + size], *args, **kwargs) for i in range(0, k, size)]
            return torch.cat(blocks)
        fill = x[:1].detach().expand(size - k, *x.shape[1:])
        return self.program(torch.cat([x, fill]), *args, **kwargs)[:k]


def adapt_exported(
    api: str, f: Callable[..., Any], x: torch.Tensor, batched: bool
) -> Callable[..., Any]:
    """``f``, or a ``torch.export`` module with a static batch size wrapped per sample.

    Raises:
        UnsupportedModelError: The program was exported for other per-sample shapes, or a
            single ``x`` does not have the exported shape.
    """
    shape = exported_shape(f)
    if shape is None or not isinstance(x, torch.Tensor):
        return f
    got = tuple(x.shape)
    same_rank = len(shape) == len(got)
    if not batched:
        if same_rank and all(s is None or s == g for s, g in zip(shape, got, strict=True)):
            return f
        raise UnsupportedModelError(
            f"{api}: f is a torch.export program traced for inputs of shape "
            f"{_show(shape)}, got x of shape {got}. Pass x of that shape, or a batch with "
            "batched=True (hesse then runs each sample inside the exported batch), or export "
            "with a dynamic batch dimension (torch.export.Dim)."
        )
    if not same_rank or any(
        s is not None and s != g for s, g in zip(shape[1:], got[1:], strict=True)
    ):
        raise UnsupportedModelError(
            f"{api}: f is a torch.export program traced for batches of shape {_show(shape)}, "
            f"got samples of shape {got[1:]} (x of shape {got}). Export the model with the "
            "per-sample shape of x."
        )
    if shape[0] is None or shape[0] == 0:
        return f  # a dynamic batch dimension: the program takes sub-batches itself
    return StaticBatch(f, shape[0])  # type: ignore[arg-type]


def _show(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("B" if s is None else str(s) for s in shape) + ")"
