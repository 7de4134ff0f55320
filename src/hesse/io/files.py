"""File sinks: ``.npy`` (memory-mapped), ``.zarr`` (chunked) and ``.safetensors``.

All three accept blocks in any order and from several processes at once, as long as one
process creates the file first (:func:`open_sink` with ``create=True``) and the others open
it after a barrier:

- :class:`NpySink` writes each block, a contiguous byte range of the ``.npy`` file, with
  ``pwrite``. The file's space is reserved up front, so a full disk is an error at
  creation. Good on one machine; for many machines on a shared file system use zarr.
- :class:`ZarrSink` is a zarr v3 array whose chunks are the blocks, so no two blocks (no
  two processes) ever write the same chunk file.
- :class:`SafetensorsSink` is for results that fit in memory: each block goes to its own
  shard file (written atomically), and :meth:`SafetensorsSink.finish` assembles them into
  the ``.safetensors`` file (temp file, then rename) and deletes the shards.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hesse.errors import FileFormatError, ResumeMismatchError, UnsupportedInputError

from ._atomic import os_errors, write_atomic
from ._deps import require
from .schedule import Block, Layout
from .sinks import Sink

SUFFIXES = {".npy": "npy", ".zarr": "zarr", ".safetensors": "safetensors"}


def sink_kind(path: Path) -> str:
    """The sink a path's suffix asks for.

    Raises:
        UnsupportedInputError: An unknown suffix.
    """
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UnsupportedInputError(
            f"hesse compute: cannot write {path.name!r}; the output must end in "
            f"{', '.join(SUFFIXES)}"
        )
    return kind


def sink_paths(path: Path) -> list[Path]:
    """Every file or folder a sink at ``path`` may leave (the result and its shards)."""
    return [path, _shard_dir(path)]


def _shard_dir(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


class _PathSink(Sink):
    """A sink writing one file or folder at :attr:`path`."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def exists(self) -> bool:
        """Whether the file or folder exists."""
        return self.path.exists()

    def discard(self) -> None:
        """Delete what :meth:`open` created."""
        _discard(self.path)


class NpySink(_PathSink):
    """A ``.npy`` file holding the result in its public shape.

    The file is created with :func:`numpy.lib.format.open_memmap` (header and size), and
    every block, a contiguous byte range of the C-ordered array, is written with
    ``os.pwrite``: the written pages are not mapped into the process (its
    memory stays at one block), and a full disk is an ``OSError``, never a ``SIGBUS``.

    Args:
        path: The ``.npy`` file.
    """

    kind = "npy"  # type: ignore[assignment]

    def open(self, layout: Layout, blocks: Sequence[Block], create: bool) -> None:
        """Create the file (header, size reserved on disk) or check an existing one."""
        path, self.layout = self.path, layout
        with os_errors(path):
            if create:
                mm = np.lib.format.open_memmap(
                    path, mode="w+", dtype=np.dtype(layout.dtype), shape=layout.shape
                )
                offset = mm.offset
                mm.flush()
                del mm
                _reserve(path)
            else:
                offset = _open_npy(path, layout)
            self._fd = os.open(path, os.O_RDWR)
        self._offset = offset

    def _start(self, region: Block) -> int:
        lay = self.layout
        return self._offset + ((region.s0 * lay.rows + region.r0) * lay.cols) * lay.itemsize

    def write(self, region: Block, block: np.ndarray) -> None:
        """Write the block's byte range.

        No ``fsync`` per block: the page cache outlives a killed process, and a resume
        checks every recorded block's checksum, so a block lost in a power cut is redone.
        """
        view = memoryview(np.ascontiguousarray(block, dtype=self.layout.dtype)).cast("B")
        pos = self._start(region)
        with os_errors(self.path):
            while view:
                written = os.pwrite(self._fd, view, pos)
                view, pos = view[written:], pos + written

    def read(self, region: Block) -> np.ndarray:
        """The stored values of ``region``."""
        shape = (region.s1 - region.s0, region.r1 - region.r0, self.layout.cols)
        size = int(np.prod(shape)) * self.layout.itemsize
        data = os.pread(self._fd, size, self._start(region))
        if len(data) != size:
            return np.empty(0, dtype=self.layout.dtype)
        return np.frombuffer(data, dtype=self.layout.dtype).reshape(shape)

    def finish(self) -> None:
        """Flush the file."""
        os.fsync(self._fd)

    def result(self) -> np.memmap:
        """A read-only map of the result, in its public shape."""
        return np.load(self.path, mmap_mode="r", allow_pickle=False)

    def close(self) -> None:
        """Close the file (the data written so far stays)."""
        with contextlib.suppress(OSError):
            os.close(self._fd)


def _discard(*paths: Path) -> None:
    """Delete files or folders a sink created."""
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


def _reserve(path: Path) -> None:
    """Allocate the file's blocks now, so a full disk fails here and not as SIGBUS later."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDWR)
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


def _open_npy(path: Path, layout: Layout) -> int:
    """Check an existing ``.npy`` file against the layout; return its header length."""
    try:
        mm = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError) as exc:
        raise FileFormatError(f"hesse compute: {path} is not a readable .npy file ({exc})") from exc
    if tuple(mm.shape) != layout.shape or mm.dtype != np.dtype(layout.dtype):
        raise ResumeMismatchError(
            f"hesse compute: {path} holds {mm.dtype}{list(mm.shape)}, the run needs "
            f"{layout.dtype}{list(layout.shape)}"
        )
    return int(mm.offset)


class ZarrSink(_PathSink):
    """A zarr v3 array, one chunk per block (one block per chunk file).

    Sample blocks are stored in the result's public shape. Row blocks of a Hessian are
    stored as ``(B, n, n)`` (``(n, n)`` without a batch), with the public shape in the
    array's attribute ``"hesse_shape"``. The sample axis can grow (iterables of batches).

    Args:
        path: The ``.zarr`` folder.
    """

    growable = True

    kind = "zarr"  # type: ignore[assignment]

    def __init__(self, path: Path):
        require("zarr", "hesse compute")
        super().__init__(path)

    def open(self, layout: Layout, blocks: Sequence[Block], create: bool) -> None:
        """Create the array (chunks of one block) or open an existing one."""
        zarr = require("zarr", "hesse compute")
        path, self.layout = self.path, layout
        first = blocks[0] if blocks else None
        per_block = 1 if first is None else max(first.s1 - first.s0, first.r1 - first.r0)
        self._per_sample = layout.shape[1:] if layout.batched else layout.shape
        with os_errors(path):
            if create:
                shape, chunks = self._disk_shape(per_block)
                arr = zarr.create_array(
                    store=str(path),
                    shape=shape,
                    chunks=chunks,
                    dtype=layout.dtype,
                    fill_value=0,
                    zarr_format=3,
                    overwrite=False,
                )
                arr.attrs["hesse_shape"] = list(layout.shape)
            else:
                try:
                    arr = zarr.open_array(str(path), mode="r+")
                except Exception as exc:
                    raise FileFormatError(
                        f"hesse compute: {path} is not a readable zarr array ({exc})"
                    ) from exc
                stored = list(arr.attrs.get("hesse_shape", []))
                growing = layout.batched and not layout.row_mode  # may have grown
                if stored[growing:] != list(layout.shape)[growing:]:
                    raise ResumeMismatchError(
                        f"hesse compute: {path} holds a result of another shape"
                    )
        self._arr = arr
        if layout.batched and not layout.row_mode and arr.shape[0] != layout.samples:
            self.layout = layout.with_samples(int(arr.shape[0]))

    def _disk_shape(self, per_block: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        lay = self.layout
        if lay.row_mode:
            if lay.batched:
                return (lay.samples, lay.rows, lay.cols), (1, per_block, lay.cols)
            return (lay.rows, lay.cols), (per_block, lay.cols)
        if lay.batched:
            return lay.shape, (per_block, *self._per_sample)
        return lay.shape, lay.shape if lay.shape else ()

    def _index(self, region: Block) -> tuple[Any, ...]:
        lay = self.layout
        if lay.row_mode:
            rows = slice(region.r0, region.r1)
            return (region.s0, rows) if lay.batched else (rows,)
        return (slice(region.s0, region.s1),) if lay.batched else (Ellipsis,)

    def _disk_block(self, region: Block, block: np.ndarray) -> np.ndarray:
        lay = self.layout
        if lay.row_mode:
            return block[0]
        if lay.batched:
            return block.reshape(region.s1 - region.s0, *self._per_sample)
        return block.reshape(lay.shape)

    def write(self, region: Block, block: np.ndarray) -> None:
        """Write the block's chunk."""
        with os_errors(self.path):
            self._arr[self._index(region)] = self._disk_block(region, block)

    def read(self, region: Block) -> np.ndarray:
        """The stored values of ``region``."""
        data = np.asarray(self._arr[self._index(region)])
        return data.reshape(region.s1 - region.s0, region.r1 - region.r0, self.layout.cols)

    def grow(self, samples: int) -> None:
        """Resize the sample axis (sample blocks of a batched result)."""
        with os_errors(self.path):
            self._arr.resize((samples, *self._arr.shape[1:]))
            self.layout = self.layout.with_samples(samples)
            self._arr.attrs["hesse_shape"] = list(self.layout.shape)

    def result(self) -> Any:
        """The zarr array, opened read-only."""
        return require("zarr").open_array(str(self.path), mode="r")


class SafetensorsSink(Sink):
    """A ``.safetensors`` file assembled at the end from per-block shard files.

    Args:
        path: The ``.safetensors`` file.
        name: The tensor's name in the file (the quantity, e.g. ``"hessian"``).
    """

    growable = True

    kind = "safetensors"  # type: ignore[assignment]

    def __init__(self, path: Path, name: str = "result"):
        require("safetensors", "hesse compute")
        self.path, self.name = Path(path), name
        self._shards = _shard_dir(self.path)

    def exists(self) -> bool:
        """Whether the file or its shard folder exists."""
        return self.path.exists() or self._shards.exists()

    def discard(self) -> None:
        """Delete what :meth:`open` created."""
        _discard(self.path, self._shards)

    def open(self, layout: Layout, blocks: Sequence[Block], create: bool) -> None:
        """Make the shard folder (``create``)."""
        self.layout, self._blocks = layout, blocks  # a run over batches adds blocks
        if create:
            with os_errors(self.path):
                self._shards.mkdir(exist_ok=True)

    def grow(self, samples: int) -> None:
        """The file is assembled at the end: only the layout changes."""
        self.layout = self.layout.with_samples(samples)

    def _shard(self, region: Block) -> Path:
        return self._shards / f"block{region.id}.npy"

    def write(self, region: Block, block: np.ndarray) -> None:
        """Write the block's shard atomically."""
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(block), allow_pickle=False)
        write_atomic(self._shard(region), lambda fh: fh.write(buf.getbuffer()))

    def read(self, region: Block) -> np.ndarray:
        """The stored values of ``region`` (empty when its shard is missing or corrupt)."""
        try:
            return np.load(self._shard(region), allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return np.empty(0, dtype=self.layout.dtype)

    def finish(self) -> None:
        """Assemble the shards into the ``.safetensors`` file (atomic), drop the shards."""
        st = require("safetensors.numpy", "hesse compute")
        work = np.zeros(self.layout.work_shape, dtype=self.layout.dtype)
        for shard in self._shards.glob("block*.npy"):
            block = np.load(shard, allow_pickle=False)
            region = self._blocks[int(shard.stem[5:])]
            work[region.s0 : region.s1, region.r0 : region.r1] = block
        data = st.save({self.name: work.reshape(self.layout.shape)})
        write_atomic(self.path, lambda fh: fh.write(data))
        shutil.rmtree(self._shards, ignore_errors=True)

    def result(self) -> Path:
        """The path of the ``.safetensors`` file."""
        return self.path


def open_sink(path: Path, name: str) -> Sink:
    """The (unopened) file sink for ``path``; its suffix picks the format.

    Args:
        path: The output.
        name: The quantity, used as the tensor name in ``.safetensors``.

    Raises:
        UnsupportedInputError: An unknown suffix.
    """
    kind = sink_kind(path)
    if kind == "npy":
        return NpySink(path)
    if kind == "zarr":
        return ZarrSink(path)
    return SafetensorsSink(path, name)
