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

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hesse import errors
from hesse.errors import HesseError, OutputExistsError, ResumeMismatchError

from . import manifest as mf
from ._atomic import os_errors
from ._dist import barrier, broadcast_json, rank_and_world
from ._progress import _advance, _bar
from ._sizing import _per_block
from ._spec import Spec, build_spec, fingerprint_data, fingerprint_model, output_json
from .files import open_sink, sink_kind, sink_paths
from .schedule import Block, hessian_rows, make_blocks
from .sinks import BlockSink, MemorySink

# config entries a resume takes from the manifest rather than from the new call
_IDENTITY_KEYS = ("strategy", "per_block", "blocks")


def compute_to(
    quantity: str,
    f: Callable[[torch.Tensor], torch.Tensor],
    x: Any,
    out: str | Path | None = None,
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
        out: ``"H.npy"``, ``"H.zarr"``, ``"H.safetensors"``, or ``None`` for a tensor in
            memory (one process only).
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

    Returns:
        The result: a tensor (``out=None``), a read-only ``numpy.memmap`` (``.npy``), a
        zarr array (``.zarr``; row-block Hessians as ``(B, n, n)`` / ``(n, n)``), or the
        path of the ``.safetensors`` file. Shapes as for the in-memory call.

    Raises:
        OutputExistsError: ``out`` exists and ``resume`` is false.
        ResumeMismatchError: ``resume`` with a different model, input or options.
        OutputWriteError: ``out`` cannot be written.

    >>> import torch, hesse.io
    >>> H = hesse.io.compute_to("hessian", lambda x: (x**3).sum(), torch.ones(3), progress=False)
    >>> torch.equal(H, 6 * torch.eye(3))
    True
    """
    from hesse.planning.memory import available_bytes, parse_bytes

    rank, world = rank_and_world()
    dev = torch.device(device) if device is not None else getattr(x, "device", torch.device("cpu"))
    budget = parse_bytes(max_memory, "hesse.io.compute_to") or available_bytes(dev) // 2
    spec = build_spec(quantity, f, x, output, batched, flat, dev, budget, row_blocks)
    per_block = block_size or _per_block(spec, budget)
    blocks = make_blocks(spec.layout, per_block)
    runner = _Runner(spec, blocks, budget, strategy, block_size is not None)
    if out is None:
        if world > 1:
            raise HesseError("hesse.io.compute_to: out=None cannot be used with several processes")
        return runner.to_memory(progress)
    path = Path(out)
    sink_kind(path)
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
        "sink": sink_kind(path),
        "input": fingerprint_data(x, batched),
        "model": fingerprint_model(f),
        "torch": torch.__version__,
        "strategy": strategy,
    }
    return runner.to_file(path, config, resume, progress, rank, world)


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

    def to_memory(self, progress: bool) -> torch.Tensor:
        """Compute every block into a :class:`MemorySink`."""
        sink = MemorySink(self.spec.layout, self.spec.device)
        strategy, first = self.resolve(self.blocks[0])
        sink.write(self.blocks[0], first)
        bar = _bar(progress, self.blocks, self.blocks[0].size)
        for block in self.blocks[1:]:
            sink.write(block, self.compute(block, strategy))
            bar.update(block.size)
        bar.close()
        return sink.result()

    def to_file(
        self,
        path: Path,
        config: dict[str, Any],
        resume: bool,
        progress: bool,
        rank: int,
        world: int,
    ) -> Any:
        """The streamed, resumable, distributed run (see :func:`compute_to`)."""
        state: dict[str, Any]
        sink: BlockSink | None = None
        if rank == 0:
            try:
                state, sink = self._prepare(path, config, resume)
            except HesseError as exc:
                state = {"error": type(exc).__name__, "message": str(exc)}
            except KeyboardInterrupt:
                state = {"error": "HesseError", "message": "interrupted"}
                broadcast_json(state, rank, world)
                raise
        else:
            state = {}
        state = broadcast_json(state, rank, world)
        if "error" in state:
            raise getattr(errors, state["error"], HesseError)(state["message"])
        config = state["config"]
        per_block = config["per_block"]
        self.blocks = make_blocks(self.spec.layout, per_block)
        if sink is None:
            sink = open_sink(
                path,
                self.spec.layout,
                self.blocks,
                create=False,
                per_block=per_block,
                name=self.spec.quantity,
            )
        todo = [self.blocks[i] for i in state["todo"]]
        mine = todo[rank::world]
        part = mf.Manifest(mf.manifest_path(path, rank), config)
        done_before = sum(self.blocks[i].size for i in state["done"])
        bar = _bar(progress and rank == 0, self.blocks, done_before) if todo else None
        try:
            for block in mine:
                data = self.compute(block, config["strategy"])
                sink.write(block, data)
                part.mark(block.id, mf.digest(data))
                if bar is not None:
                    _advance(bar, path, self.blocks, set(state["done"]))
        except KeyboardInterrupt:
            sink.close()
            raise
        if bar is not None:
            bar.close()
        barrier(world)
        if rank == 0:
            self._complete(path, sink)
        barrier(world)
        sink.close()
        return sink.result()

    def _prepare(
        self, path: Path, config: dict[str, Any], resume: bool
    ) -> tuple[dict[str, Any], BlockSink]:
        """Rank 0: check or create the output; return the blocks still to do."""
        present = [p for p in sink_paths(path) if p.exists()]
        old = mf.read_all(path)
        if (present or old is not None) and not resume:
            raise OutputExistsError(
                f"hesse compute: {path} already exists; pass --resume (resume=True) to "
                "continue an interrupted run, or remove it"
            )
        if old is not None and present:
            return self._reopen(path, config, old)
        if present:
            raise OutputExistsError(
                f"hesse compute: {path} exists but has no manifest, so it is not a resumable "
                "hesse output; remove it or choose another path"
            )
        mf.remove_all(path)
        with os_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
        strategy, first = self.resolve(self.blocks[0])
        config = {**config, "strategy": strategy}
        sink = open_sink(
            path,
            self.spec.layout,
            self.blocks,
            create=True,
            per_block=config["per_block"],
            name=self.spec.quantity,
        )
        start = mf.Manifest(mf.manifest_path(path), config)
        start.save()
        sink.write(self.blocks[0], first)
        start.mark(0, mf.digest(first))
        todo = [b.id for b in self.blocks[1:]]
        return {"config": config, "todo": todo, "done": [0]}, sink

    def _reopen(
        self, path: Path, config: dict[str, Any], old: mf.Manifest
    ) -> tuple[dict[str, Any], BlockSink]:
        """Rank 0, resuming: check the configuration, keep the blocks whose bytes match."""
        if self.strategy not in ("auto", "timed") and old.config["strategy"] != self.strategy:
            raise ResumeMismatchError(
                f"hesse compute: {path} was computed with strategy "
                f"{old.config.get('strategy')!r}, not {self.strategy!r}"
            )
        mine = {k: v for k, v in config.items() if k not in _IDENTITY_KEYS}
        theirs = {k: v for k, v in old.config.items() if k not in _IDENTITY_KEYS}
        if mine != theirs:
            changed = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            raise ResumeMismatchError(
                f"hesse compute: cannot resume {path}: the run differs from the interrupted "
                f"one in {', '.join(changed)}; remove the output to start again"
            )
        if self.fixed_blocks and old.config["per_block"] != config["per_block"]:
            raise ResumeMismatchError(
                f"hesse compute: {path} was computed in blocks of {old.config['per_block']}, "
                f"not {config['per_block']}"
            )
        config = old.config
        self.blocks = make_blocks(self.spec.layout, config["per_block"])
        sink = open_sink(
            path,
            self.spec.layout,
            self.blocks,
            create=False,
            per_block=config["per_block"],
            name=self.spec.quantity,
        )
        if old.complete:
            return {"config": config, "todo": [], "done": sorted(old.done)}, sink
        kept = {
            i: d
            for i, d in old.done.items()
            if i < len(self.blocks) and mf.digest(sink.read(self.blocks[i])) == d
        }
        merged = mf.Manifest(mf.manifest_path(path), config, kept)
        mf.consolidate(merged, path)
        todo = [b.id for b in self.blocks if b.id not in kept]
        return {"config": config, "todo": todo, "done": sorted(kept)}, sink

    def _complete(self, path: Path, sink: BlockSink) -> None:
        """Rank 0, at the end: check every block is recorded, finish the sink, merge."""
        merged = mf.read_all(path)
        assert merged is not None
        missing = [b.id for b in self.blocks if b.id not in merged.done]
        if missing:
            raise HesseError(f"hesse compute: blocks {missing[:5]} were not written")
        if not merged.complete:
            sink.finish()
            merged.complete = True
        mf.consolidate(merged, path)
