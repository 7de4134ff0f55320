"""Sinks: where the blocks of a chunked computation go.

A computation is a stream of blocks, each covering a range of samples and a range (or an
index set) of work items. A sink receives them in any order. :class:`TensorSink` keeps the
result in memory; an on-disk sink with the same interface lets results larger than memory
stream to a file.

A streamed run (:func:`hesse.io.compute_to`) writes through the :class:`BlockSink`
protocol instead: blocks are regions ``work[s0:s1, r0:r1, :]`` of the result viewed as a
3-D work array (see :mod:`hesse.io.schedule`). :class:`MemorySink` keeps it in memory; the
file sinks are in :mod:`hesse.io.files`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

if TYPE_CHECKING:
    from .schedule import Block, Layout


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


@runtime_checkable
class BlockSink(Protocol):
    """Receives the blocks of a streamed run, in any order, from one or more processes."""

    kind: str
    layout: Layout

    def write(self, region: Block, block: np.ndarray) -> None:
        """Stores ``block`` (shape ``(s1 - s0, r1 - r0, C)``) at ``region``."""
        ...

    def read(self, region: Block) -> np.ndarray:
        """Reads ``region`` back, to check a recorded block's checksum on resume."""
        ...

    def finish(self) -> None:
        """Called once by one process after every block is written."""
        ...

    def result(self) -> Any:
        """A handle to the result: a tensor, memmap, zarr array or path."""
        ...

    def close(self) -> None:
        """Releases files and maps (the data written so far stays)."""
        ...


class MemorySink:
    """A :class:`BlockSink` in memory (one process only): a preallocated tensor.

    Args:
        layout: Shape and dtype of the result.
        device: Where the result lives.
    """

    kind = "memory"

    def __init__(self, layout: Layout, device: torch.device | str = "cpu"):
        self.layout = layout
        self._data = torch.zeros(
            layout.work_shape, dtype=getattr(torch, layout.dtype), device=device
        )

    def write(self, region: Block, block: np.ndarray) -> None:
        """Stores ``block`` at ``region``."""
        target = self._data[region.s0 : region.s1, region.r0 : region.r1]
        target.copy_(torch.from_numpy(np.ascontiguousarray(block)))

    def read(self, region: Block) -> np.ndarray:
        """The stored values of ``region``."""
        return self._data[region.s0 : region.s1, region.r0 : region.r1].cpu().numpy()

    def finish(self) -> None:
        """Nothing to do."""

    def result(self) -> torch.Tensor:
        """The result in its public shape."""
        return self._data.reshape(self.layout.shape)

    def close(self) -> None:
        """Nothing to do."""
