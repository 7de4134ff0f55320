"""Sinks: where the blocks of a chunked computation go.

A computation is a stream of blocks, each covering a range of samples and a range (or an
index set) of work items. A sink receives them in any order. :class:`TensorSink` keeps the
result in memory; an on-disk sink with the same interface lets results larger than memory
stream to a file.

A streamed run (:func:`hesse.io.compute_to`, ``out=`` of the public functions) writes
through the public :class:`Sink` protocol instead: blocks are regions
``work[s0:s1, r0:r1, :]`` of the result viewed as a 3-D work array (see
:mod:`hesse.io.schedule`). :class:`MemorySink` keeps it in memory, :class:`CallbackSink`
hands each block to a function; the file sinks are in :mod:`hesse.io.files`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

if TYPE_CHECKING:
    from .schedule import Block, Layout


@runtime_checkable
class ItemSink(Protocol):
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


class Sink(abc.ABC):
    """Where a streamed run writes its blocks: the sink protocol of ``out=``.

    The result of shape ``layout.shape`` is viewed as the C-ordered work array
    ``layout.work_shape == (B', R, C)`` (same bytes); each :class:`~hesse.io.Block` ``b`` is
    its region ``work[b.s0:b.s1, b.r0:b.r1, :]``. A run calls, in each process:

    1. ``open(layout, blocks, create)`` once (``create``: a fresh output, in one process;
       ``False`` in the other processes of ``torchrun`` and when resuming);
    2. ``write(block, data)`` for each of this process's blocks, in any order;
    3. ``finish()`` once, in one process, after every block of every process is written;
    4. ``result()``: what :func:`hesse.io.compute_to` (and ``hesse.hessian(..., out=sink)``)
       returns; ``close()`` always, also after an error.

    Subclass it and implement :meth:`write`; the other methods have defaults. A sink with a
    :attr:`path` gets a manifest next to it (``PATH.manifest.json``, a SHA-256 per block)
    and can be resumed (``resume=True``): the resumed run reopens it (``create=False``),
    reads each recorded block back with :meth:`read` and recomputes the blocks whose bytes
    differ. Without a path a sink is neither resumable nor shared by processes. Anything
    a sink raises reaches the caller as :class:`~hesse.OutputWriteError`, and a block is
    recorded in the manifest only after its ``write`` returned.

    Attributes:
        path: The output's path (the manifest sits next to it), or ``None``.
        kind: The sink's name in the manifest; by default its class name.
        growable: :meth:`grow` can enlarge the sample axis (for iterables of batches of
            unknown length, see :func:`hesse.io.compute_to`).

    >>> import numpy as np, torch, hesse.io
    >>> class Rows(hesse.io.Sink):  # keeps the blocks in a dict
    ...     def open(self, layout, blocks, create):
    ...         self.layout, self.blocks = layout, {}
    ...     def write(self, block, data):  # data: (s1 - s0, r1 - r0, C)
    ...         self.blocks[block.id] = data.copy()
    >>> sink = hesse.io.compute_to("hessian", lambda x: (x**3).sum(-1), torch.ones(2, 3),
    ...                            Rows(), batched=True, block_size=1, progress=False)
    >>> sorted(sink.blocks), sink.blocks[1].shape, sink.layout.shape
    ([0, 1], (1, 1, 9), (2, 3, 3))
    """

    path: Path | None = None
    growable: bool = False

    @property
    def kind(self) -> str:
        """The sink's name in the manifest (a resume must use the same kind)."""
        return type(self).__name__

    def open(self, layout: Layout, blocks: Sequence[Block], create: bool) -> None:  # noqa: B027
        """Prepares the output for ``layout`` (shape ``layout.shape``, ``layout.dtype``).

        Args:
            layout: Shape and dtype of the result, and its work shape ``(B', R, C)``.
            blocks: Every block of the run (``blocks[i].id == i``).
            create: Create a fresh output (else reopen one, or join another process's).
        """

    @abc.abstractmethod
    def write(self, block: Block, data: np.ndarray) -> None:
        """Stores ``data``, shape ``(s1 - s0, r1 - r0, C)`` in ``layout.dtype``, at ``block``."""

    def read(self, block: Block) -> np.ndarray | None:
        """The stored values of ``block`` (checked against the manifest on resume).

        Returns:
            The values, or ``None`` when they cannot be read back (the block is redone).
        """
        return None

    def grow(self, samples: int) -> None:
        """Enlarges the sample axis to ``samples`` (only when :attr:`growable`)."""
        raise NotImplementedError  # never called unless growable

    def finish(self) -> None:  # noqa: B027
        """Called once, in one process, after every block is written."""

    def result(self) -> Any:
        """What the run returns: the sink itself unless a subclass says otherwise."""
        return self

    def close(self) -> None:  # noqa: B027
        """Releases files and maps (the data written so far stays)."""

    def exists(self) -> bool:
        """Whether the output already holds data (then it must be resumed or removed)."""
        return False

    def discard(self) -> None:  # noqa: B027
        """Deletes what ``open(create=True)`` made, when the run could not start."""


class MemorySink(Sink):
    """A :class:`Sink` in memory (one process only): a preallocated tensor.

    Args:
        device: Where the result lives.
    """

    growable = True

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = device

    def open(self, layout: Layout, blocks: Sequence[Block], create: bool) -> None:
        """Allocates the result."""
        self.layout = layout
        self._data = torch.zeros(
            layout.work_shape, dtype=getattr(torch, layout.dtype), device=self.device
        )

    def write(self, block: Block, data: np.ndarray) -> None:
        """Stores ``data`` at ``block``."""
        target = self._data[block.s0 : block.s1, block.r0 : block.r1]
        target.copy_(torch.from_numpy(np.ascontiguousarray(data)))

    def read(self, block: Block) -> np.ndarray:
        """The stored values of ``block``."""
        return self._data[block.s0 : block.s1, block.r0 : block.r1].cpu().numpy()

    def grow(self, samples: int) -> None:
        """Enlarges the sample axis (doubling, so that growing costs O(B) copies)."""
        have = self._data.shape[0]
        if samples > have:
            more = max(samples, 2 * have) - have
            pad = self._data.new_zeros((more, *self._data.shape[1:]))
            self._data = torch.cat([self._data, pad])
        self.layout = self.layout.with_samples(samples)

    def result(self) -> torch.Tensor:
        """The result in its public shape."""
        return self._data[: self.layout.samples].reshape(self.layout.shape)


class CallbackSink(Sink):
    """Hands each block to a function: ``fn(block, data)``, ``data`` ``(s, r, C)``.

    For results consumed as they come (statistics, a database, a queue). Not resumable.

    Args:
        fn: Called once per block, in the order blocks finish.

    >>> import torch, hesse.io
    >>> seen = []
    >>> sink = hesse.io.CallbackSink(lambda b, d: seen.append((b.s0, b.s1, d.shape)))
    >>> L = hesse.io.compute_to("laplacian", lambda x: (x**3).sum(-1), torch.ones(4, 2),
    ...                         sink, batched=True, block_size=2, progress=False)
    >>> seen
    [(0, 2, (2, 1, 1)), (2, 4, (2, 1, 1))]
    """

    growable = True

    def __init__(self, fn: Callable[[Block, np.ndarray], Any]):
        self.fn = fn

    def write(self, block: Block, data: np.ndarray) -> None:
        """Calls ``fn(block, data)``."""
        self.fn(block, data)

    def grow(self, samples: int) -> None:
        """Nothing to enlarge."""
