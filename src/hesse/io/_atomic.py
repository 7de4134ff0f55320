"""Atomic file writes: a temp file in the same folder, fsync, then ``os.replace``."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from hesse.errors import HesseError, OutputWriteError


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file so that readers see either the old file or the complete new one.

    Args:
        path: Destination.
        write: Writes the content into the open temp file.

    Raises:
        OutputWriteError: The folder is not writable or the disk is full.
    """
    with os_errors(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def os_errors(path: Path) -> Iterator[None]:
    """Turn ``OSError`` on an output path into :class:`OutputWriteError` (one line)."""
    try:
        yield
    except OutputWriteError:
        raise
    except OSError as exc:
        raise OutputWriteError(f"hesse compute: cannot write {path}: {_why(exc)}") from exc


@contextlib.contextmanager
def sink_errors(sink: object, what: str) -> Iterator[None]:
    """Turn anything a sink raises into :class:`OutputWriteError` (one line).

    Args:
        sink: The sink (its ``path``, or its class, names it in the message).
        what: What the run asked of it, e.g. ``"write block 3"``.
    """
    try:
        yield
    except HesseError:
        raise
    except Exception as exc:
        name = getattr(sink, "path", None) or type(sink).__name__
        text = _why(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        tail = (
            "; the manifest lists only the blocks written before, so resume=True (--resume) "
            "continues from there"
            if getattr(sink, "path", None) is not None
            else ""
        )
        message = f"hesse.io: the sink {name} failed to {what}: {first}{tail}"
        raise OutputWriteError(message) from exc


def _why(exc: OSError) -> str:
    """A short reason for an ``OSError``."""
    return {
        errno.ENOSPC: "the disk is full",
        errno.EFBIG: "the file would exceed the largest file this process may write "
        "(EFBIG: ulimit -f, or the file system's limit)",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EACCES: "permission denied",
        errno.EROFS: "the file system is read-only",
        errno.ENOTDIR: "a parent of the path is not a folder",
        errno.ENOENT: "the folder does not exist",
    }.get(exc.errno or 0, exc.strerror or str(exc))
