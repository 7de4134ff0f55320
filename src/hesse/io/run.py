"""Streamed, resumable, distributed computation of one quantity into a sink.

:func:`compute_to` cuts the work into blocks (:mod:`hesse.io.schedule`), computes each
with the public hesse functions, writes it into a sink (:mod:`hesse.io.files`) and records
it in a manifest (:mod:`hesse.io.manifest`): block data first, then the manifest, so a
block recorded as done is always in the file. Under ``torchrun`` the processes share the
blocks round-robin; rank 0 creates the output, resolves the strategy once (so every block
is computed the same way in every process and every resumed run), shows the progress bar
and assembles the result at the end.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hesse.errors import HesseError, UnsupportedInputError

from ._atomic import sink_errors
from ._dist import rank_and_world
from ._progress import _bar
from ._resumable import run_resumable
from ._sizing import _per_block
from ._spec import Spec, build_spec, fingerprint_data, fingerprint_model, output_json
from .batches import compute_batches, is_batches
from .files import open_sink
from .schedule import Block, hessian_rows, make_blocks
from .sinks import MemorySink, Sink


def compute_to(
    quantity: str,
    f: Callable[[torch.Tensor], torch.Tensor],
    x: Any,
    out: str | Path | Sink | None = None,
    *,
    output: Any = None,
    batched: bool = False,
    flat: bool = False,
    max_memory: int | str | None = None,
    resume: bool = False,
    progress: bool = True,
    strategy: str = "auto",
    device: str | torch.device | None = None,
    row_blocks: bool | None = None,
    block_size: int | None = None,
    num_samples: int | None = None,
) -> Any:
    """Compute ``quantity`` of ``f`` at ``x`` block by block into ``out``; return a handle.

    Blocks are ranges of samples (per-sample results over a data set), or ranges of Hessian
    rows when one sample's Hessian does not fit in half of ``max_memory``. Each block is
    written when it is done, so the result may be far larger than memory. Under
    ``torchrun`` (a ``torch.distributed`` process group), the processes split the blocks
    and write their own regions; the bytes equal those of a one-process run.

    Args:
        quantity: ``"jacobian"``, ``"hessian"``, ``"hessian_diag"`` or ``"laplacian"``.
        f: Model or function, as for :func:`hesse.hessian`.
        x: Input: a tensor, a NumPy array (e.g. ``np.load(path, mmap_mode="r")``) or a
            zarr array. With ``batched=True``, shape ``(B, *S)``, read a block at a time.
            Or (``batched=True``, one process) an iterable of batches: a generator, a list
            or a ``torch.utils.data.DataLoader`` yielding ``(b, *S)`` tensors or arrays,
            or tuples ``(x, ...)`` whose first element is differentiated (see
            :mod:`hesse.io.batches`).
        out: ``"H.npy"``, ``"H.zarr"``, ``"H.safetensors"``, a :class:`hesse.io.Sink`
            object, or ``None`` for a tensor in memory (one process only).
        output: Which outputs, as for :func:`hesse.hessian`.
        batched: ``x``'s first dimension holds independent samples.
        flat: Flat matrices, as for :func:`hesse.hessian`.
        max_memory: Budget for one block (its inputs, working set and result), bytes or a
            string like ``"100MB"``; ``None``: half of the free memory.
        resume: Continue an interrupted run into the same ``out`` (its blocks recorded as
            done, with matching checksums, are skipped). Without it an existing ``out``
            is an error.
        progress: Show a progress bar (rank 0 only) with rate and ETA.
        strategy: ``"auto"`` (the cost model's choice, fixed for the run), ``"timed"``
            (the fastest candidate on the first block) or a strategy name.
        device: Where to compute (default: ``x``'s device for tensors, else CPU).
        row_blocks: Force (``True``) or forbid (``False``) Hessian row blocks; ``None``
            decides from the budget.
        block_size: Samples (rows) per block; ``None``: from the budget. A resumed run
            keeps the interrupted run's blocks.
        num_samples: For an iterable of batches: how many samples it yields (checked).
            Needed for ``.npy``; without it ``.zarr`` and ``.safetensors`` grow.

    Returns:
        The result: a tensor (``out=None``), a read-only ``numpy.memmap`` (``.npy``), a
        zarr array (``.zarr``; row-block Hessians as ``(B, n, n)`` / ``(n, n)``), the
        path of the ``.safetensors`` file, or a sink object's :meth:`~hesse.io.Sink.result`
        (the sink itself by default). Shapes as for the in-memory call.

    Raises:
        OutputExistsError: ``out`` exists and ``resume`` is false.
        ResumeMismatchError: ``resume`` with a different model, input or options (or,
            for an iterable, other batches than the interrupted run's).
        OutputWriteError: ``out`` cannot be written (a full disk, or a sink that raised).

    >>> import torch, hesse.io
    >>> H = hesse.io.compute_to("hessian", lambda x: (x**3).sum(), torch.ones(3), progress=False)
    >>> torch.equal(H, 6 * torch.eye(3))
    True
    """
    from hesse.planning.memory import available_bytes, parse_bytes

    rank, world = rank_and_world()
    dev = torch.device(device) if device is not None else getattr(x, "device", torch.device("cpu"))
    budget = parse_bytes(max_memory, "hesse.io.compute_to") or available_bytes(dev) // 2
    if is_batches(x):
        if not batched or world > 1:
            raise UnsupportedInputError(
                "hesse.io.compute_to: an iterable of batches needs batched=True and runs in "
                f"one process (got batched={batched}, {world} processes); for torchrun, save "
                "the inputs as .npy or .zarr"
            )
        return compute_batches(
            quantity, f, x, as_sink(out, quantity, dev), output=output, flat=flat,
            budget=budget, device=None if device is None else dev, num_samples=num_samples,
            resume=resume, progress=progress, strategy=strategy, block_size=block_size,
        )  # fmt: skip
    spec = build_spec(quantity, f, x, output, batched, flat, dev, budget, row_blocks)
    per_block = block_size or _per_block(spec, budget)
    blocks = make_blocks(spec.layout, per_block)
    runner = _Runner(spec, blocks, budget, strategy, block_size is not None)
    sink = as_sink(out, quantity, spec.device)
    if sink.path is None:
        if world > 1:
            raise UnsupportedInputError(
                f"hesse.io.compute_to: out={out!r} has no path, so its blocks cannot be shared "
                "by several processes; pass a file path (.npy, .zarr, .safetensors)"
            )
        if resume:
            raise UnsupportedInputError(
                f"hesse.io.compute_to: resume=True needs an output with a path (a file, or a "
                f"hesse.io.Sink with .path set) to keep the manifest in; got {out!r}"
            )
        return runner.run_plain(sink, progress)
    config = {
        "quantity": quantity,
        "output": output_json(output),
        "batched": batched,
        "flat": flat,
        "shape": list(spec.layout.shape),
        "dtype": spec.layout.dtype,
        "row_mode": spec.layout.row_mode,
        "per_block": per_block,
        "blocks": len(blocks),
        "sink": sink.kind,
        "input": fingerprint_data(x, batched),
        "model": fingerprint_model(f),
        "torch": torch.__version__,
        "strategy": strategy,
    }
    return run_resumable(runner, sink, config, resume, progress, rank, world)


def as_sink(out: Any, quantity: str, device: torch.device) -> Sink:
    """The sink of ``out=``: a path's file sink, a :class:`Sink`, or memory for ``None``.

    Raises:
        UnsupportedInputError: ``out`` is none of these, or a path with an unknown suffix.
    """
    if out is None:
        return MemorySink(device)
    if isinstance(out, Sink):
        return out
    if isinstance(out, str | os.PathLike):
        return open_sink(Path(out), quantity)
    raise UnsupportedInputError(
        f"hesse.io.compute_to: out must be None, a path (.npy, .zarr, .safetensors) or a "
        f"hesse.io.Sink, got {type(out).__name__}; wrap other objects in a subclass of "
        "hesse.io.Sink (implement write) or in hesse.io.CallbackSink(fn)"
    )


class _Runner:
    """Computes blocks with one resolved strategy and streams them into a sink."""

    def __init__(
        self, spec: Spec, blocks: list[Block], budget: int, strategy: str, fixed_blocks: bool
    ):
        self.spec, self.blocks, self.budget, self.strategy = spec, blocks, budget, strategy
        self.fixed_blocks = fixed_blocks

    def compute(self, block: Block, strategy: str) -> np.ndarray:
        """One block as ``(s, r, C)`` in the result's dtype."""
        import hesse

        spec, lay = self.spec, self.spec.layout
        if lay.row_mode:
            x = spec.inputs(block.s0, block.s1)[0] if spec.batched else spec.inputs(0, 1)
            res = hessian_rows(
                spec.f,
                x,
                slice(block.r0, block.r1),
                output=spec.output,
                batched=spec.batched,
                strategy=strategy,
            )
        else:
            fn = getattr(hesse, spec.quantity)
            res = fn(
                spec.f,
                spec.inputs(block.s0, block.s1),
                output=spec.output,
                batched=spec.batched,
                flat=spec.flat,
                strategy=strategy,
                max_memory=self.budget,
            )
        arr = res.detach().cpu().numpy().astype(lay.dtype, copy=False)
        return np.ascontiguousarray(arr).reshape(block.s1 - block.s0, block.r1 - block.r0, lay.cols)

    def resolve(self, block: Block) -> tuple[str, np.ndarray]:
        """Fix the run's strategy on its first block; return it and the block.

        ``"auto"``: the first of the cost model's candidates (:func:`hesse.plan`) that
        runs; a fresh process always makes the same choice, so separate runs (1 or N
        processes) give the same bytes. ``"timed"``: the fastest candidate, timed on the
        block (twice in long runs); faster when the cost model is off, but two separate
        runs may choose differently. Either way the choice is recorded in the manifest,
        shared by every process of the run and kept on resume.
        """
        if self.strategy not in ("auto", "timed"):
            return self.strategy, self.compute(block, self.strategy)
        candidates = self._candidates()
        timed = self.strategy == "timed"
        repeats = 2 if timed and len(self.blocks) >= 4 * len(candidates) else 1
        first: Exception | None = None
        best: tuple[float, str, np.ndarray] | None = None
        for name in candidates:
            try:
                seconds = float("inf")
                for _ in range(repeats):  # the first call warms up
                    t0 = time.perf_counter()
                    data = self.compute(block, name)
                    seconds = min(seconds, time.perf_counter() - t0)
            except Exception as exc:  # an operator this strategy cannot run: try the next
                first = first or exc
                continue
            if best is None or seconds < best[0]:
                best = (seconds, name, data)
            if not timed:
                break
        if best is None:
            assert first is not None
            raise first
        return best[1], best[2]

    def _candidates(self) -> tuple[str, ...]:
        import hesse

        spec = self.spec
        x = spec.inputs(0, 1)
        quantity = "hvp" if spec.layout.row_mode else spec.quantity
        f = spec.f
        if spec.layout.row_mode and not spec.batched:
            f, x = torch.func.vmap(spec.f), x.unsqueeze(0)
        try:
            plan = hesse.plan(
                f,
                x,
                quantity,
                output=spec.output,
                batched=spec.batched or spec.layout.row_mode,
                max_memory=self.budget,
            )
        except HesseError:
            return ("vmap", "reverse", "loop")
        if spec.layout.row_mode:  # NOTE: structured HVPs of r copies run out of memory
            return tuple(c for c in plan.candidates if c != "structured")
        return plan.candidates

    def run_plain(self, sink: Sink, progress: bool) -> Any:
        """Every block into a sink without a manifest (in memory, a callback): one process."""
        strategy, first = self.resolve(self.blocks[0])
        try:
            with sink_errors(sink, "open"):
                sink.open(self.spec.layout, self.blocks, True)
            bar = _bar(progress, self.blocks, 0)
            for i, block in enumerate(self.blocks):
                data = first if i == 0 else self.compute(block, strategy)
                with sink_errors(sink, f"write block {block.id}"):
                    sink.write(block, data)
                bar.update(block.size)
            bar.close()
            with sink_errors(sink, "finish"):
                sink.finish()
        finally:
            with sink_errors(sink, "close"):
                sink.close()
        with sink_errors(sink, "return its result"):
            return sink.result()
