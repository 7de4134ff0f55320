"""The resumable, distributed run of :func:`hesse.io.compute_to` into a sink with a path.

Rank 0 checks or creates the output and its manifest (:mod:`hesse.io.manifest`) and fixes
the strategy on the first block; every rank then computes its share of the remaining
blocks (round-robin), writes each into the sink and records it in its own manifest part,
block data first, so a block recorded as done is always in the output. Rank 0 merges the
parts and finishes the sink at the end.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from hesse import errors
from hesse.errors import HesseError, OutputExistsError, ResumeMismatchError

from . import manifest as mf
from ._atomic import os_errors, sink_errors
from ._dist import barrier, broadcast_json
from ._progress import _advance, _bar
from .schedule import make_blocks
from .sinks import Sink

if TYPE_CHECKING:
    from .run import _Runner

# config entries a resume takes from the manifest rather than from the new call
_IDENTITY_KEYS = ("strategy", "per_block", "blocks")


def run_resumable(
    runner: _Runner,
    sink: Sink,
    config: dict[str, Any],
    resume: bool,
    progress: bool,
    rank: int,
    world: int,
) -> Any:
    """The streamed, resumable, distributed run (see :func:`hesse.io.compute_to`)."""
    path = sink.path
    assert path is not None  # callers pass sinks with a path
    state: dict[str, Any]
    if rank == 0:
        try:
            state = _prepare(runner, sink, config, resume)
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
    runner.blocks = make_blocks(runner.spec.layout, config["per_block"])
    if rank != 0:
        with sink_errors(sink, "open"):
            sink.open(runner.spec.layout, runner.blocks, False)
    todo = [runner.blocks[i] for i in state["todo"]]
    part = mf.Manifest(mf.manifest_path(path, rank), config)
    done_before = sum(runner.blocks[i].size for i in state["done"])
    bar = _bar(progress and rank == 0, runner.blocks, done_before) if todo else None
    try:
        for block in todo[rank::world]:
            data = runner.compute(block, config["strategy"])
            with sink_errors(sink, f"write block {block.id}"):
                sink.write(block, data)
            part.mark(block.id, mf.digest(data))
            if bar is not None:
                _advance(bar, path, runner.blocks, set(state["done"]))
        if bar is not None:
            bar.close()
        barrier(world)
        if rank == 0:
            _complete(runner, sink)
        barrier(world)
    finally:  # the manifest lists only the blocks written so far
        with sink_errors(sink, "close"):
            sink.close()
    with sink_errors(sink, "return its result"):
        return sink.result()


def _prepare(runner: _Runner, sink: Sink, config: dict[str, Any], resume: bool) -> dict:
    """Rank 0: check or create the output; return the config and the blocks still to do."""
    path = sink.path
    assert path is not None
    with sink_errors(sink, "say whether it exists"):
        present = sink.exists()
    old = mf.read_all(path)
    if (present or old is not None) and not resume:
        raise OutputExistsError(
            f"hesse compute: {path} already exists; pass --resume (resume=True) to "
            "continue an interrupted run, or remove it"
        )
    if old is not None and present:
        return _reopen(runner, sink, config, old)
    if present:
        raise OutputExistsError(
            f"hesse compute: {path} exists but has no manifest, so it is not a resumable "
            "hesse output; remove it or choose another path"
        )
    mf.remove_all(path)
    with os_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    strategy, first = runner.resolve(runner.blocks[0])
    config = {**config, "strategy": strategy}
    try:
        with sink_errors(sink, "create the output"):
            sink.open(runner.spec.layout, runner.blocks, True)
        start = mf.Manifest(mf.manifest_path(path), config)
        start.save()
        with sink_errors(sink, "write block 0"):
            sink.write(runner.blocks[0], first)
        start.mark(0, mf.digest(first))
    except BaseException:  # e.g. a full disk at the start: leave nothing behind
        with contextlib.suppress(Exception):
            sink.close()
        _remove_output(sink)
        raise
    todo = [b.id for b in runner.blocks[1:]]
    return {"config": config, "todo": todo, "done": [0]}


def _reopen(runner: _Runner, sink: Sink, config: dict[str, Any], old: mf.Manifest) -> dict:
    """Rank 0, resuming: check the configuration, keep the blocks whose bytes match."""
    path = sink.path
    assert path is not None
    if runner.strategy not in ("auto", "timed") and old.config["strategy"] != runner.strategy:
        raise ResumeMismatchError(
            f"hesse compute: {path} was computed with strategy "
            f"{old.config.get('strategy')!r}, not {runner.strategy!r}"
        )
    mine = {k: v for k, v in config.items() if k not in _IDENTITY_KEYS}
    theirs = {k: v for k, v in old.config.items() if k not in _IDENTITY_KEYS}
    if mine != theirs:
        changed = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        raise ResumeMismatchError(
            f"hesse compute: cannot resume {path}: the run differs from the interrupted "
            f"one in {', '.join(changed)}; remove the output to start again"
        )
    if runner.fixed_blocks and old.config["per_block"] != config["per_block"]:
        raise ResumeMismatchError(
            f"hesse compute: {path} was computed in blocks of {old.config['per_block']}, "
            f"not {config['per_block']}"
        )
    config = old.config
    runner.blocks = make_blocks(runner.spec.layout, config["per_block"])
    with sink_errors(sink, "reopen the output"):
        sink.open(runner.spec.layout, runner.blocks, False)
    if old.complete:
        return {"config": config, "todo": [], "done": sorted(old.done)}
    kept = {}
    for i, d in old.done.items():
        if i < len(runner.blocks):
            with sink_errors(sink, f"read block {i}"):
                stored = sink.read(runner.blocks[i])
            if stored is not None and mf.digest(stored) == d:
                kept[i] = d
    merged = mf.Manifest(mf.manifest_path(path), config, kept)
    mf.consolidate(merged, path)
    todo = [b.id for b in runner.blocks if b.id not in kept]
    return {"config": config, "todo": todo, "done": sorted(kept)}


def _complete(runner: _Runner, sink: Sink) -> None:
    """Rank 0, at the end: check every block is recorded, finish the sink, merge."""
    path = sink.path
    assert path is not None
    merged = mf.read_all(path)
    assert merged is not None
    missing = [b.id for b in runner.blocks if b.id not in merged.done]
    if missing:
        raise HesseError(f"hesse compute: blocks {missing[:5]} were not written")
    if not merged.complete:
        with sink_errors(sink, "finish"):
            sink.finish()
        merged.complete = True
    mf.consolidate(merged, path)


def _remove_output(sink: Sink) -> None:
    """Delete what a run created and could not start: the sink's files, the manifests."""
    with contextlib.suppress(Exception):
        sink.discard()
    assert sink.path is not None
    mf.remove_all(sink.path)
