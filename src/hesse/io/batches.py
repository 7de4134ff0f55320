"""Dataset mode over an iterable of batches: a generator, a list, a ``DataLoader``.

The batches are read once, in order; each is cut into blocks of at most ``per_block``
samples (from the budget), computed by one public call and written into the sink, so the
data never has to fit in memory and its length need not be known. Each item is a tensor
or array of shape ``(b, *S)``, or a tuple / list whose **first element** is that tensor
(``(x, y)`` from a ``DataLoader``: ``x`` is differentiated, the rest is ignored).

The result's sample axis grows as batches come (``.zarr``, ``.safetensors``, memory and
callback sinks), or is fixed by ``num_samples`` (required for ``.npy``). The manifest
records, per block, the SHA-256 of its inputs next to that of its result; a resumed run
iterates the batches again, checks that each finished block sees the same inputs
(:class:`~hesse.ResumeMismatchError` if not) and computes only the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hesse.errors import OutputExistsError, ResumeMismatchError, UnsupportedInputError

from . import manifest as mf
from ._atomic import os_errors, sink_errors
from ._progress import _bar
from ._sizing import _per_block
from ._spec import build_spec, fingerprint_model, output_json
from .schedule import Block
from .sinks import Sink

if TYPE_CHECKING:
    from .run import _Runner

_API = "hesse.io.compute_to"


def is_batches(x: Any) -> bool:
    """Whether ``x`` is an iterable of batches rather than one array (tensor, NumPy, zarr)."""
    if isinstance(x, torch.Tensor | np.ndarray | str | bytes) or hasattr(x, "shape"):
        return False
    return isinstance(x, Iterable)


def _tensor(item: Any, index: int) -> torch.Tensor:
    """The differentiated tensor of one item: the item, or its first element."""
    if isinstance(item, tuple | list) and item:
        item = item[0]
    if isinstance(item, np.ndarray):
        item = torch.from_numpy(np.array(item, copy=True))
    if not isinstance(item, torch.Tensor) or item.dim() == 0:
        raise UnsupportedInputError(
            f"{_API}: batch {index} of the iterable is a {type(item).__name__}; expected a "
            "tensor or array of shape (b, *S), or a tuple (x, ...) whose first element is one"
        )
    return item.detach()


def input_digest(block: Block, x: torch.Tensor) -> str:
    """SHA-256 of a block's samples (its range, shape, dtype and bytes)."""
    arr = np.ascontiguousarray(x.cpu().numpy())
    h = hashlib.sha256(f"{block.s0}:{block.s1}{arr.shape}{arr.dtype}".encode())
    h.update(memoryview(arr).cast("B"))
    return "sha256:" + h.hexdigest()


class _Blocks:
    """Cuts the stream of batches into numbered blocks of at most ``per_block`` samples."""

    def __init__(self, batches: Iterator[Any], first: torch.Tensor, per_block: int):
        self.batches, self.first, self.per_block = batches, first, per_block
        self.sample_shape = tuple(first.shape[1:])
        self.blocks: list[Block] = []  # every block so far; sinks keep this list

    def __iter__(self) -> Iterator[tuple[Block, torch.Tensor]]:
        s0, index = 0, 0
        item: torch.Tensor | None = self.first
        while item is not None:
            if tuple(item.shape[1:]) != self.sample_shape:
                raise UnsupportedInputError(
                    f"{_API}: batch {index} has samples of shape {tuple(item.shape[1:])}, "
                    f"the first batch {self.sample_shape}; every batch must be (b, *S)"
                )
            for a in range(0, item.shape[0], self.per_block):
                part = item[a : a + self.per_block]
                block = Block(len(self.blocks), s0, s0 + part.shape[0], 0, 1)
                self.blocks.append(block)
                s0 = block.s1
                yield block, part
            index += 1
            nxt = next(self.batches, None)
            item = None if nxt is None else _tensor(nxt, index)


def compute_batches(
    quantity: str,
    f: Any,
    batches: Iterable[Any],
    sink: Sink,
    *,
    output: Any,
    flat: bool,
    budget: int,
    device: torch.device | None,
    num_samples: int | None,
    resume: bool,
    progress: bool,
    strategy: str,
    block_size: int | None,
) -> Any:
    """The streamed run of :func:`hesse.io.compute_to` over an iterable (one process)."""
    from .run import _Runner

    source = iter(batches)
    head = next(source, None)
    if head is None:
        raise UnsupportedInputError(f"{_API}: the iterable of batches is empty")
    first = _tensor(head, 0)
    dev = device if device is not None else first.device
    spec = build_spec(quantity, f, first, output, True, flat, dev, budget, False)
    if num_samples is None and not sink.growable:
        raise UnsupportedInputError(
            f"{_API}: the number of samples of an iterable is not known in advance and "
            f"{type(sink).__name__} cannot grow; pass num_samples=, or write .zarr or "
            ".safetensors"
        )
    config = {
        "quantity": quantity,
        "output": output_json(output),
        "batched": True,
        "flat": flat,
        "sample_shape": list(spec.layout.shape[1:]),
        "dtype": spec.layout.dtype,
        "num_samples": num_samples,
        "sink": sink.kind,
        "input": "iterable",
        "model": fingerprint_model(f),
        "torch": torch.__version__,
    }
    old = _interrupted(sink, config, resume)
    per_block = block_size or _per_block(spec, budget)
    if old is not None:
        if block_size is not None and block_size != old.config["per_block"]:
            raise ResumeMismatchError(
                f"hesse compute: {sink.path} was computed in blocks of "
                f"{old.config['per_block']}, not {block_size}"
            )
        per_block = old.config["per_block"]
    stream = _Blocks(source, first, per_block)
    spec.layout = spec.layout.with_samples(num_samples or 0)
    runner = _Runner(spec, stream.blocks, budget, strategy, True)
    config["per_block"] = per_block
    return _Run(runner, sink, config, num_samples, old).go(stream, progress)


def _interrupted(sink: Sink, config: dict, resume: bool) -> mf.Manifest | None:
    """The interrupted run's manifest (resume), after checking nothing is in the way."""
    if sink.path is None:
        if resume:
            raise UnsupportedInputError(
                f"{_API}: resume=True needs an output with a path to keep the manifest in"
            )
        return None
    with sink_errors(sink, "say whether it exists"):
        present = sink.exists()
    old = mf.read_all(sink.path)
    if (present or old is not None) and not resume:
        raise OutputExistsError(
            f"hesse compute: {sink.path} already exists; pass resume=True to continue an "
            "interrupted run, or remove it"
        )
    if old is None:
        if present:
            raise OutputExistsError(
                f"hesse compute: {sink.path} exists but has no manifest, so it is not a "
                "resumable hesse output; remove it or choose another path"
            )
        with os_errors(sink.path):
            sink.path.parent.mkdir(parents=True, exist_ok=True)
        return None
    mine = {k: v for k, v in config.items() if k not in ("per_block", "strategy")}
    theirs = {k: v for k, v in old.config.items() if k not in ("per_block", "strategy")}
    if mine != theirs:
        changed = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        raise ResumeMismatchError(
            f"hesse compute: cannot resume {sink.path}: the run differs from the "
            f"interrupted one in {', '.join(changed)}; remove the output to start again"
        )
    return old


class _Run:
    """One pass over the batches into the sink, recorded in the manifest."""

    def __init__(
        self,
        runner: _Runner,
        sink: Sink,
        config: dict,
        num_samples: int | None,
        old: mf.Manifest | None,
    ):
        self.runner, self.sink, self.config, self.old = runner, sink, config, old
        self.num_samples = num_samples
        self.capacity = num_samples or 0
        path = sink.path
        self.book = old or (mf.Manifest(mf.manifest_path(path), config) if path else None)

    def go(self, stream: _Blocks, progress: bool) -> Any:
        """Compute, write and record every block; return the sink's result."""
        runner, sink, book = self.runner, self.sink, self.book
        strategy = self.old.config["strategy"] if self.old else None
        bar = _bar(progress, [], 0)
        bar.total = self.num_samples
        opened = False
        try:
            for block, x in stream:
                runner.spec.data = x
                local = Block(block.id, 0, x.shape[0], 0, 1)  # the block within x
                data = None
                if strategy is None:  # the first block fixes the strategy (as in compute_to)
                    strategy, data = runner.resolve(local)
                    self.config["strategy"] = strategy
                if not opened:
                    self._open(stream.blocks)
                    opened = True
                if self._finished(block, x):
                    bar.update(block.size)
                    continue
                if data is None:
                    data = runner.compute(local, strategy)
                self._write(block, data)
                if book is not None:
                    book.mark(block.id, mf.digest(data), input_digest(block, x))
                bar.update(block.size)
            bar.close()
            self._end(stream.blocks[-1].s1)
        finally:
            if opened:
                with sink_errors(sink, "close"):
                    sink.close()
        with sink_errors(sink, "return its result"):
            return sink.result()

    def _end(self, total: int) -> None:
        """Check the count, fit the sample axis, finish the sink, close the manifest."""
        sink, book = self.sink, self.book
        if self.num_samples is not None and total != self.num_samples:
            raise UnsupportedInputError(
                f"{_API}: the iterable gave {total} samples, not num_samples="
                f"{self.num_samples}; pass the right num_samples (or none, with a sink "
                "that grows)"
            )
        if self.capacity != total:
            with sink_errors(sink, f"resize to {total} samples"):
                sink.grow(total)
        with sink_errors(sink, "finish"):
            sink.finish()
        if book is not None and sink.path is not None:
            book.complete = True
            mf.consolidate(book, sink.path)

    def _open(self, blocks: list[Block]) -> None:
        """Create the output (a fresh run; nothing is left if that fails) or reopen it."""
        sink, create = self.sink, self.old is None
        try:
            with sink_errors(sink, "create the output" if create else "reopen the output"):
                sink.open(self.runner.spec.layout, blocks, create)
            if create and self.book is not None:
                self.book.config = self.config
                self.book.save()
        except BaseException:
            if create and sink.path is not None:  # e.g. a full disk: leave nothing behind
                with contextlib.suppress(Exception):
                    sink.discard()
                mf.remove_all(sink.path)
            raise

    def _finished(self, block: Block, x: torch.Tensor) -> bool:
        """Whether a resumed run can skip ``block``: recorded, same inputs, same bytes."""
        book = self.book
        if self.old is None or book is None or block.id not in book.done:
            return False
        if book.inputs.get(block.id) != input_digest(block, x):
            raise ResumeMismatchError(
                f"hesse compute: cannot resume {self.sink.path}: the batches differ from the "
                f"interrupted run's at samples {block.s0}:{block.s1} (block {block.id}); "
                "iterate the same data in the same order, or remove the output"
            )
        self.capacity = max(self.capacity, block.s1)  # a recorded block was written there
        with sink_errors(self.sink, f"read block {block.id}"):
            stored = self.sink.read(block)
        return stored is not None and mf.digest(stored) == book.done[block.id]

    def _write(self, block: Block, data: np.ndarray) -> None:
        if block.s1 > self.capacity:
            if self.num_samples is not None:
                raise UnsupportedInputError(
                    f"{_API}: the iterable gave more than num_samples={self.num_samples} "
                    "samples; pass the right num_samples (or none, with a sink that grows)"
                )
            with sink_errors(self.sink, f"grow to {block.s1} samples"):
                self.sink.grow(block.s1)
            self.capacity = block.s1
        with sink_errors(self.sink, f"write block {block.id}"):
            self.sink.write(block, data)
