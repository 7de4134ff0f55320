"""The machine: environment description, matrix-multiply ceiling, memory readings."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "numpy", "jax", "jaxlib", "hessquik", "matplotlib", "hesse")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (or ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return None
    return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None


def load_average() -> float | None:
    """The 1-minute load average (other processes competing for the cores), if known."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# XLA's CPU client has no thread-count option; these are the flags it honours (jax#743,
# jax#1539): Eigen's intra-op pool off for one thread, and the intra-op thread count.
XLA_THREAD_FLAGS = ("--xla_cpu_multi_thread_eigen", "intra_op_parallelism_threads")
_XLA_LATE = False


def xla_flags(threads: int, existing: str = "") -> str:
    """``XLA_FLAGS`` giving XLA's CPU pool ``threads`` threads, other flags kept.

    One thread: ``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``; more:
    Eigen's pool stays on, with ``intra_op_parallelism_threads=N``.
    """
    kept = [f for f in existing.split() if f.split("=", 1)[0] not in XLA_THREAD_FLAGS]
    eigen = "false" if threads <= 1 else "true"
    threads_flag = f"intra_op_parallelism_threads={max(1, threads)}"
    return " ".join([*kept, f"--xla_cpu_multi_thread_eigen={eigen}", threads_flag])


def configure_threads(threads: int) -> str:
    """Gives torch and JAX/XLA ``threads`` threads each; returns the ``XLA_FLAGS`` set.

    XLA reads ``XLA_FLAGS`` when jax initialises its CPU backend, so this runs before jax is
    imported (the peers import it lazily); memory children inherit the environment.
    """
    global _XLA_LATE
    torch.set_num_threads(threads)
    flags = xla_flags(threads, os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = flags
    _XLA_LATE = "jax" in sys.modules  # too late: its backend may have read the old flags
    return flags


def environment(threads: int) -> dict[str, Any]:
    """Versions, CPU, threads and time of the run.

    Args:
        threads: The value given to ``torch.set_num_threads`` (and XLA, see
            :func:`configure_threads`).
    """
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "torch_mkl": torch.backends.mkl.is_available(),
        "versions": {p: _version(p) for p in PACKAGES},
        "git": _git_commit(),
        "load_average": load_average(),
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "note": (
            "JAX/XLA's CPU pool gets the same threads through XLA_FLAGS"
            if not _XLA_LATE
            else "jax was imported before XLA_FLAGS was set: its thread pool is not limited"
        ),
    }


def gemm_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 3) -> float:
    """Measured matrix-multiply rate: ``2 size^3 / t`` of a square matmul, best of repeats.

    Args:
        dtype: Floating dtype.
        size: Matrix side.
        repeats: Timed repeats (after one warm-up).

    Returns:
        GFLOP/s (one multiply-add = 2 FLOP).
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen, dtype=dtype)
    b = torch.randn(size, size, generator=gen, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


# --------------------------------------------------------------------------------------
# Resident memory (Linux /proc, with a getrusage fallback)
# --------------------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Current resident set size (``VmRSS``), MB; the peak so far where unavailable."""
    kb = _status_kb("VmRSS")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def reset_peak() -> bool:
    """Resets the kernel's peak-RSS counter (``VmHWM``); ``False`` where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def peak_mb() -> float:
    """Peak resident set size since the last :func:`reset_peak` (else since start), MB."""
    kb = _status_kb("VmHWM")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
