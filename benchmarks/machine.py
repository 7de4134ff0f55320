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
PACKAGES = ("torch", "numpy", "jax", "jaxlib", "folx", "hessquik", "matplotlib", "hesse")
XLA_THREADS = "--xla_cpu_multi_thread_eigen={eigen} intra_op_parallelism_threads={n}"


def peer_thread_env(threads: int) -> dict[str, str]:
    """The environment that gives every peer the thread count torch gets (the one place).

    XLA (JAX, folx) reads ``XLA_FLAGS`` once, when JAX starts; subprocess peers (the
    Python 3.12 runner of torch-jet) get ``OMP_NUM_THREADS`` and set torch's threads too.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "intra_op_parallelism_threads" not in flags:
        kept = [f for f in flags.split() if not f.startswith("--xla_cpu_multi_thread_eigen")]
        eigen = "false" if threads == 1 else "true"  # false leaves XLA one thread
        flags = " ".join([*kept, XLA_THREADS.format(eigen=eigen, n=threads)])
    return {"XLA_FLAGS": flags, "OMP_NUM_THREADS": str(threads)}


def set_peer_threads(threads: int) -> str:
    """Applies :func:`peer_thread_env` to this process; returns a note for the report."""
    late = "jax" in sys.modules
    os.environ.update(peer_thread_env(threads))
    if late:
        return "JAX was imported before the thread count was set: XLA may use all cores"
    return f"XLA (JAX, folx) and subprocess peers get {threads} thread(s), as torch does"


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


def environment(threads: int) -> dict[str, Any]:
    """Versions, CPU, threads and time of the run.

    Args:
        threads: The value given to ``torch.set_num_threads``.
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
        "note": os.environ.get("HESSE_BENCH_THREAD_NOTE", "peer threads not set"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
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
