"""The block schedule of a streamed run, and the one function that computes a block.

Every result is viewed as a 3-D *work array* ``(B', R, C)`` in C order, the same bytes as
the result in its public shape: ``B'`` samples (``1`` unless ``batched``), ``R`` rows per
sample and ``C`` entries per row. Two kinds of runs:

- **sample blocks** (``R == 1``): each block is a range of samples, computed by one
  public call (``hesse.hessian(f, x[s0:s1], batched=True, ...)``), for per-sample
  Jacobians, Hessians, diagonals and Laplacians over a data set;
- **row blocks** (``R == C == n``): one Hessian too large for the budget is computed as
  ranges of rows of one sample, ``H[r0:r1, :]``, by :func:`hessian_rows`.

The schedule depends only on the problem and the budget, never on the number of
processes, so any split of the blocks over processes, and any resume, computes every
block the same way and gives the same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Layout:
    """Shape of a streamed result.

    Attributes:
        shape: The result's public shape (leading ``B`` when batched).
        samples: ``B'``: samples (``1`` when not batched).
        rows: ``R``: rows per sample (``n`` for row blocks, else ``1``).
        cols: ``C``: entries per row.
        dtype: NumPy dtype name of the result, e.g. ``"float32"``.
        row_mode: Blocks are row ranges of one sample's Hessian.
        batched: The result has a leading sample dimension.
    """

    shape: tuple[int, ...]
    samples: int
    rows: int
    cols: int
    dtype: str
    row_mode: bool
    batched: bool

    @property
    def work_shape(self) -> tuple[int, int, int]:
        """``(B', R, C)``."""
        return (self.samples, self.rows, self.cols)

    @property
    def itemsize(self) -> int:
        """Bytes per entry."""
        return torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    def with_samples(self, samples: int) -> Layout:
        """The same layout with ``samples`` samples (a batched sample-block layout)."""
        return replace(self, shape=(samples, *self.shape[1:]), samples=samples)


@dataclass(frozen=True)
class Block:
    """One unit of work and of writing: ``work[s0:s1, r0:r1, :]``."""

    id: int
    s0: int
    s1: int
    r0: int
    r1: int

    @property
    def size(self) -> int:
        """Samples (sample blocks) or rows (row blocks) in the block."""
        return (self.s1 - self.s0) * (self.r1 - self.r0)


def make_blocks(layout: Layout, per_block: int) -> list[Block]:
    """Split the work array into blocks of ``per_block`` samples (or rows).

    Args:
        layout: The result's layout.
        per_block: Samples per block, or rows per block in row mode.

    Returns:
        The blocks in order; ids are their positions.
    """
    blocks: list[Block] = []
    if layout.row_mode:
        for s in range(layout.samples):
            for r0 in range(0, layout.rows, per_block):
                r1 = min(r0 + per_block, layout.rows)
                blocks.append(Block(len(blocks), s, s + 1, r0, r1))
    else:
        for s0 in range(0, layout.samples, per_block):
            blocks.append(Block(len(blocks), s0, min(s0 + per_block, layout.samples), 0, 1))
    return blocks


def block_size(layout: Layout, budget: int, unit_work_bytes: int, unit_input_bytes: int) -> int:
    """Samples (or rows) per block so that a block's result and working set fit ``budget``.

    Half the budget holds the block (its result, its inputs, the working set of the
    computation); the other half is slack for the process and the sink's buffers.

    Args:
        layout: The result's layout.
        budget: Memory budget in bytes.
        unit_work_bytes: Estimated working memory of one sample (or row).
        unit_input_bytes: Input bytes that one sample (or row) brings in.

    Returns:
        At least 1, at most the samples (rows) there are.
    """
    total = layout.rows if layout.row_mode else layout.samples
    unit_result = layout.cols * layout.itemsize * (1 if layout.row_mode else layout.rows)
    unit = unit_result + unit_work_bytes + unit_input_bytes
    return max(1, min(total, math.floor(budget / 2 / max(unit, 1))))


def hessian_rows(
    f: torch.nn.Module | object,
    x: torch.Tensor,
    rows: slice,
    *,
    output: int | tuple[int, ...],
    batched: bool,
    strategy: str = "auto",
) -> torch.Tensor:
    """Rows ``H[rows, :]`` of the Hessian of one selected output, flat ``(r, n)``.

    ``H e_i`` is row ``i`` of the symmetric ``H``, so the rows are ``r`` Hessian-vector
    products with rows of the identity, computed as one batch of ``r`` copies of the
    sample through the public :func:`hesse.hvp`. A model that takes batches
    (``batched=True``) gets the copies as a batch; an unbatched function is vectorised
    with :func:`torch.func.vmap`. This is the only place that knows how row blocks are
    computed; a plan with its own row-block program can replace it.

    Args:
        f: The model, taking ``(b, *S)`` when ``batched`` else ``S``.
        x: One sample, shape ``S``.
        rows: Which rows, ``slice(r0, r1)``.
        output: One output element (flat index or index tuple).
        batched: Whether ``f`` takes a batch dimension.
        strategy: Passed to :func:`hesse.hvp`.

    Returns:
        Shape ``(r1 - r0, n)``, the dtype and device of ``x``.
    """
    import hesse

    n = x.numel()
    r0, r1, _ = rows.indices(n)
    count = r1 - r0
    xs = x.unsqueeze(0).expand(count, *x.shape).contiguous()
    eye = torch.zeros(count, n, dtype=x.dtype, device=x.device)
    eye[torch.arange(count), torch.arange(r0, r1)] = 1
    fb = f if batched else torch.func.vmap(f)
    return hesse.hvp(
        fb,
        xs,
        eye.reshape(count, *x.shape),
        output=output,
        batched=True,
        flat=True,
        strategy=strategy,
    )
