"""Sinks: where the blocks of a chunked computation go.

A computation is a stream of blocks, each covering a range of samples and a range (or an
index set) of work items. A sink receives them in any order. :class:`TensorSink` keeps the
result in memory; an on-disk sink with the same interface lets results larger than memory
stream to a file.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Sink(Protocol):
    """Receives blocks of shape ``(samples, items, *tail)``."""

    shape: tuple[int, ...]

    def write(self, samples: slice, items: slice | torch.Tensor, block: torch.Tensor) -> None:
        """Stores ``block`` at ``[samples, items]``."""
        ...

    def result(self) -> torch.Tensor:
        """The assembled array, shape ``(B, items, *tail)``."""
        ...


class TensorSink:
    """An in-memory sink: one preallocated tensor.

    Args:
        shape: ``(B, items, *tail)``.
        dtype: dtype of the result.
        device: Where the result lives (the input's device).
        differentiable: Keep the blocks' autograd history (``create_graph=True``);
            otherwise blocks are detached, so no graph outlives the call.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        differentiable: bool = False,
    ):
        self.shape = tuple(shape)
        self.differentiable = differentiable
        self._data = torch.zeros(self.shape, dtype=dtype, device=device)

    def write(self, samples: slice, items: slice | torch.Tensor, block: torch.Tensor) -> None:
        """Stores ``block`` (shape ``(s, r, *tail)``) at ``[samples, items]``."""
        if not self.differentiable:
            block = block.detach()
        if isinstance(items, slice):
            self._data[samples, items] = block.to(self._data.dtype)
        else:
            view = self._data[samples]
            view[:, items] = block.to(self._data.dtype)

    def result(self) -> torch.Tensor:
        """The result tensor, shape ``(B, items, *tail)``."""
        return self._data
