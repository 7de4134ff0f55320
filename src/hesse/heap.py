"""Keeping freed memory in the process heap (glibc), so large temporaries stop page-faulting.

The structured engine's temporaries are a few MB each. With glibc's defaults, blocks that
size are given back to the OS when freed (``munmap``, or trimming the top of the heap) and
page-faulted in again on the next call: on the 2-core benchmark VM that made the engine's
time per call swing between 14 and 31 ms on a PINN Hessian diagonal (median 22.5 ms)
against a steady 13.3-14.1 ms (median 13.5 ms) with freed memory kept. hesse does not
change the allocator by itself (it is a process-wide setting); :func:`set_heap_cache`
does it on request, like ``GLIBC_TUNABLES`` before the process starts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import warnings

from .errors import HesseWarning
from .planning.memory import parse_bytes

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MMAP_MAX_THRESHOLD = 32 * 2**20  # glibc's upper bound for blocks served from the heap
_LIMIT: int | None = None
_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 2**10, _M_TOP_PAD: 0, _M_MMAP_THRESHOLD: 128 * 2**10}


def _mallopt():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return libc.mallopt
    except (OSError, AttributeError, TypeError):
        return None


def set_heap_cache(limit: int | str | None = "256MiB") -> bool:
    """Keeps up to ``limit`` bytes of freed memory in the heap for reuse (glibc only).

    Blocks up to 32 MiB are then served from the heap instead of fresh ``mmap`` pages, and
    up to ``limit`` bytes of freed memory stay mapped: repeated calls stop page-faulting
    their temporaries in. It affects the whole process (every library in it), and the
    process's resident memory stays up to ``limit`` above what it uses.

    Args:
        limit: Bytes or a string like ``"256MiB"``; ``None`` restores glibc's static
            defaults (128 KiB thresholds).

    Returns:
        Whether the setting was applied (False, with a warning, where the C library has
        no ``mallopt``, e.g. macOS or Windows).

    Raises:
        UnsupportedInputError: ``limit`` is not a positive size.
    """
    size = parse_bytes(limit, "hesse.set_heap_cache")
    mallopt = _mallopt()
    if mallopt is None:
        warnings.warn(
            "hesse.set_heap_cache: this C library has no mallopt (glibc only); nothing "
            "changed. Use the allocator's own settings (e.g. jemalloc's) instead.",
            HesseWarning,
            stacklevel=2,
        )
        return False
    if size is None:
        settings = _DEFAULTS
    else:
        settings = {
            _M_MMAP_THRESHOLD: _MMAP_MAX_THRESHOLD,
            _M_TRIM_THRESHOLD: min(size, 2**31 - 1),
            _M_TOP_PAD: min(size, 64 * 2**20),
        }
    global _LIMIT
    applied = all(mallopt(ctypes.c_int(k), ctypes.c_int(v)) == 1 for k, v in settings.items())
    _LIMIT = size if applied else _LIMIT
    return applied


def heap_cache() -> int | None:
    """The limit last applied by :func:`set_heap_cache` (None: glibc's defaults)."""
    return _LIMIT
