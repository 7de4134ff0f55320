"""How many samples (or Hessian rows) go into one block of a streamed run."""

from __future__ import annotations

import torch

from hesse.errors import HesseError

from ._spec import Spec
from .schedule import block_size

# NOTE: [resident memory per allocated byte] The planner's working-set estimate counts the
# bytes torch allocates; the budget is about resident memory (RSS). For one block of r
# Hessian rows of benchmarks/scale.py:cnn64 (r = 8..48, strategies vmap, reverse, loop),
# torch.profiler's allocator peak was 2.80-2.84 MB a row, within 1% of the estimate, and
# the peak RSS growth 3.2-3.9 MB a row (glibc's arenas and page granularity): 1.13-1.38x.
_RSS_PER_ALLOCATED = 1.4


def _per_block(spec: Spec, budget: int) -> int:
    """Samples (rows) per block from the budget."""
    lay = spec.layout
    itemsize = lay.itemsize
    if lay.row_mode:  # r copies of the sample, r unit vectors, the HVP working set
        work = _hvp_working_set(spec, budget)
        return block_size(lay, budget, work, 2 * spec.n * itemsize)
    return block_size(lay, budget, 0, spec.n * itemsize)


def _hvp_working_set(spec: Spec, budget: int) -> int:
    """Estimated working memory of one Hessian-vector product (one row)."""
    import hesse

    x = spec.inputs(0, 1)
    f = spec.f if spec.batched else torch.func.vmap(spec.f)
    x = x if spec.batched else x.unsqueeze(0)
    try:
        p = hesse.plan(f, x, "hvp", output=spec.output, batched=True, max_memory=budget)
        return int(_RSS_PER_ALLOCATED * p.step_bytes / max(1, p.samples_per_step))
    except HesseError:
        return int(_RSS_PER_ALLOCATED * 16 * spec.n * spec.layout.itemsize)
