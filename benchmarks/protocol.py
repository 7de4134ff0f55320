"""The measurement protocol: verify first, then time, then memory in a fresh process.

1. Verification, float64: ``prepare`` and one call (batched cases: on the first
   ``verify_batch`` samples), compared with the ``torch.func`` reference of the same inputs
   (max-abs error relative to the reference's largest entry). Above :data:`TOLERANCE` the
   method is ``wrong`` and never timed; a method that raises is ``error`` (or
   ``unsupported`` / ``skipped``) with the reason.
2. Per dtype (the primary one first), on the full case: a first call, checked again
   (float32 against the float64 reference at its own tolerance), one more warm-up for fast
   methods, then ``repeats`` calls (fewer beyond the per-method budget). A first call
   slower than ``cap_s`` is the single timing (``capped``) and the method is not run in
   the other dtypes (``slow``).
3. Memory: ``python -m benchmarks.protocol CASE METHOD DTYPE`` builds the case, warms up,
   and reports the peak RSS of one call above the RSS just before it.

Run as a module, this file is that memory child process.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from . import machine
from .cases import Instance, build, get_case
from .peers import Method, MissingDependency, Unsupported, get

TOLERANCE: dict[str, float] = {"float64": 1e-8, "float32": 1e-4}
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Settings:
    """Timing knobs.

    Attributes:
        repeats: Timed calls per method (at most), spread over the rounds.
        rounds: Rounds of timing: each times every method of the case in turn, so a slow
            spell of the machine hits one round of every method, not all calls of one.
        budget_s: Time budget of the timed calls of one method; fewer repeats beyond it.
        cap_s: A first call slower than this is the only timing (no repeats).
        skip_slow_batched: Leave methods marked slow out on batched cases (``--quick``).
        verify_batch: Batched cases are verified in float64 on this many first samples.
        memory_timeout_s: Limit of one memory child process.
    """

    repeats: int = 7
    rounds: int = 3
    budget_s: float = 6.0
    cap_s: float = 20.0
    skip_slow_batched: bool = False
    verify_batch: int = 64
    memory_timeout_s: float = 600.0


@dataclass
class Record:
    """The outcome of one method on one case at one dtype.

    ``status`` is one of ``ok``, ``wrong``, ``error``, ``unsupported``, ``skipped`` (an
    optional package is missing) or ``slow`` (verified, predicted slower than the cap).
    """

    case: str
    method: str
    dtype: str
    status: str = "ok"
    reason: str = ""
    rel_error: float | None = None
    first_ms: float | None = None
    times_ms: list[float] = field(default_factory=list)
    round_medians_ms: list[float] = field(default_factory=list)
    median_ms: float | None = None
    min_ms: float | None = None
    capped: bool = False
    warnings: list[str] = field(default_factory=list)
    memory_mb: float | None = None
    memory_note: str = ""
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)


def as_tensor(result: Any) -> torch.Tensor:
    """A method's result (torch tensor, numpy or JAX array) as a float64 torch tensor."""
    if isinstance(result, torch.Tensor):
        return result.detach().to(torch.float64)
    return torch.from_numpy(np.array(result, dtype=np.float64))  # a writable copy


def relative_error(result: Any, reference: torch.Tensor) -> float:
    """``max |result - reference| / max |reference|`` after a shape check.

    Args:
        result: Any layout with ``reference.numel()`` entries in the common order.
        reference: float64 reference, shape ``case.result_shape``.

    Raises:
        ValueError: If the number of entries differs.
    """
    got = as_tensor(result)
    if got.numel() != reference.numel():
        raise ValueError(f"shape {tuple(got.shape)}, expected {tuple(reference.shape)}")
    diff = (got.reshape(reference.shape) - reference).abs().max()
    err = (diff / reference.abs().max().clamp_min(torch.finfo(torch.float64).tiny)).item()
    return err if np.isfinite(err) else float("inf")


def tolerance(method: Method, dtype: str) -> float:
    """Verification tolerance; randomized estimates are only checked for shape and NaN."""
    return 1e300 if method.randomized else TOLERANCE[dtype]


def _reason(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text[:300]


def _first_call(method: Method, inst: Instance, rec: Record) -> tuple[Any, Any] | None:
    """Prepares and calls once; records a failure and returns None on any exception."""
    try:
        quantity = inst.case.quantity
        if quantity not in method.quantities:
            raise Unsupported(f"computes {', '.join(method.quantities)}, not {quantity}")
        if method.randomized and not inst.case.randomized:
            raise Unsupported("a randomized estimate; this case asks for the exact value")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn = method.prepare(inst)
            t0 = time.perf_counter()
            out = fn()
            rec.first_ms = 1e3 * (time.perf_counter() - t0)
        rec.warnings = sorted({f"{w.category.__name__}: {w.message}"[:200] for w in caught})
        return fn, out
    except Unsupported as err:
        rec.status, rec.reason = "unsupported", str(err)[:300]
    except MissingDependency as err:
        rec.status, rec.reason = "skipped", str(err)
    except Exception as err:
        rec.status, rec.reason = "error", _reason(err)
        if os.environ.get("HESSE_BENCH_TRACEBACK"):
            traceback.print_exc()
    return None


@dataclass
class Timed:
    """A verified, warmed-up method waiting for its timed calls.

    Attributes:
        record: Its record (times are added to it).
        fn: Zero-argument callable.
        first_s: Duration of its first call, seconds.
    """

    record: Record
    fn: Any
    first_s: float


def time_rounds(entries: Sequence[Timed], settings: Settings) -> None:
    """Times the methods in interleaved rounds and fills in their records.

    A method whose first call took longer than the cap keeps that call as its only timing
    (``capped``). The others get one more warm-up call (if under a second), then
    ``settings.rounds`` rounds of up to ``ceil(repeats / rounds)`` calls each (fewer beyond
    the budget). ``median_ms`` is the median of the least disturbed round (the smallest
    round median), ``min_ms`` the fastest call.
    """
    live = []
    for entry in entries:
        rec = entry.record
        if entry.first_s > settings.cap_s:
            rec.times_ms, rec.capped = [1e3 * entry.first_s], True
        else:
            if entry.first_s < 1.0:
                entry.fn()  # second warm-up: caches, lazy initialisation
            live.append(entry)
    rounds = max(1, settings.rounds)
    for _ in range(rounds):
        for entry in live:
            budget = settings.budget_s / rounds / max(entry.first_s, 1e-6)
            n = max(1, min(-(-settings.repeats // rounds), int(budget)))
            gc.collect()
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                entry.fn()
                times.append(1e3 * (time.perf_counter() - t0))
            entry.record.times_ms += times
            entry.record.round_medians_ms.append(statistics.median(times))
    for entry in entries:
        rec = entry.record
        rec.median_ms = min(rec.round_medians_ms or rec.times_ms)
        rec.min_ms = min(rec.times_ms)
        describe = getattr(entry.fn, "describe", None)  # e.g. what hesse's "auto" settled on
        rec.note = describe() if callable(describe) else ""


@dataclass
class Check:
    """The float64 verification of one method on one case (possibly on a sub-batch).

    Attributes:
        status: ``ok`` or the failure status; ``reason`` says why.
        reason: Failure reason.
        rel_error: Relative error against the reference.
        seconds: Duration of the verification call.
        first: ``(fn, seconds)`` when the check ran on the full float64 case (reused).
        warnings: Warnings raised by the verification call.
    """

    status: str
    reason: str = ""
    rel_error: float | None = None
    seconds: float = 0.0
    first: tuple[Any, float] | None = None
    warnings: list[str] = field(default_factory=list)


def verify(method: Method, inst: Instance, reference: torch.Tensor, full: int) -> Check:
    """Checks a method in float64 against the reference (before any timing).

    Args:
        method: The method.
        inst: float64 instance, possibly the first samples of the case only.
        reference: The reference on ``inst``, shape ``inst.case.result_shape``.
        full: Samples of the full case (the check is reused when ``inst`` is all of it).
    """
    rec = Record(inst.case.id, method.name, "float64")
    first = _first_call(method, inst, rec)
    if first is None:
        return Check(rec.status, rec.reason)
    fn, out = first
    seconds = rec.first_ms / 1e3
    check = Check("ok", seconds=seconds, warnings=rec.warnings)
    if not inst.case.batched or inst.x.shape[0] == full:
        check.first = (fn, seconds)
    try:
        check.rel_error = relative_error(out, reference)
    except ValueError as err:
        check.status, check.reason = "wrong", str(err)
        return check
    if not check.rel_error <= tolerance(method, "float64"):
        check.status = "wrong"
        check.reason = f"relative error {check.rel_error:.2e} > {TOLERANCE['float64']:.0e}"
    return check


def start(
    method: Method,
    inst: Instance,
    reference: torch.Tensor,
    check: Check,
    skip: str | None = None,
) -> tuple[Record, Timed | None]:
    """Prepares one verified method for timing on one case instance (its first call).

    Args:
        method: The method.
        inst: Case instance at the dtype to time (full size).
        reference: float64 reference result, shape ``case.result_shape``.
        check: The method's float64 verification; a failed one is copied, not timed.
        skip: Reason not to run at all (the method was too slow in another dtype); the
            record is then ``slow``.

    Returns:
        The record and, when the method is to be timed, its :class:`Timed` entry.
    """
    dtype = str(inst.dtype).removeprefix("torch.")
    rec = Record(inst.case.id, method.name, dtype, rel_error=check.rel_error)
    if check.status != "ok":
        rec.status, rec.reason = check.status, check.reason
        return rec, None
    if skip is not None:
        rec.status, rec.reason = "slow", skip
        return rec, None
    if dtype == "float64" and check.first is not None:
        fn, first_s = check.first
        rec.first_ms, rec.warnings = 1e3 * first_s, check.warnings
        return rec, Timed(rec, fn, first_s)
    first = _first_call(method, inst, rec)
    if first is None:
        return rec, None
    fn, out = first
    rec.rel_error = relative_error(out, reference)
    del out
    if not rec.rel_error <= tolerance(method, dtype):
        rec.status = "wrong"
        rec.reason = f"relative error {rec.rel_error:.2e} > {TOLERANCE[dtype]:.0e}"
        return rec, None
    return rec, Timed(rec, fn, rec.first_ms / 1e3)


def evaluate(
    method: Method,
    inst: Instance,
    reference: torch.Tensor,
    check: Check,
    settings: Settings,
    skip: str | None = None,
) -> Record:
    """:func:`start` and :func:`time_rounds` for one method on its own.

    Returns:
        The record (memory not yet measured).
    """
    rec, timed = start(method, inst, reference, check, skip)
    if timed is not None:
        time_rounds([timed], settings)
    return rec


def gradient_ms(inst: Instance, repeats: int) -> float:
    """Median time of one forward + backward gradient of the selected outputs' sum, ms."""

    def grad() -> torch.Tensor:
        x = inst.x.detach().requires_grad_(True)
        y = inst.batched_outputs(x) if inst.case.batched else inst.per_sample()(x)
        return torch.autograd.grad(y.sum(), x)[0]

    grad()
    times = []
    for _ in range(max(3, repeats)):
        t0 = time.perf_counter()
        grad()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


# --------------------------------------------------------------------------------------
# Memory: one child process per (case, method, dtype)
# --------------------------------------------------------------------------------------


def measure_memory(rec: Record, threads: int, settings: Settings) -> None:
    """Runs the memory child for a timed record and stores its result in ``rec``."""
    cmd = [sys.executable, "-m", "benchmarks.protocol", rec.case, rec.method, rec.dtype]
    # a warm-up call (JIT compilation, caches) only where it is cheap; slow methods are warm
    cheap = rec.median_ms is not None and rec.median_ms < 2000 and not rec.capped
    cmd += ["--threads", str(threads)] + ([] if cheap else ["--no-warmup"])
    path = [str(machine.ROOT), str(machine.ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
    # glibc: a fixed mmap threshold (no dynamic growth) and trimming, so that what the
    # warm-up freed goes back to the system instead of hiding the measured call's peak
    env |= {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    try:
        proc = subprocess.run(
            cmd,
            cwd=machine.ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=settings.memory_timeout_s,
        )
    except subprocess.TimeoutExpired:
        rec.memory_note = f"memory child timed out after {settings.memory_timeout_s:.0f} s"
        return
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        rec.memory_note = f"memory child failed: {tail[:200]}"
        return
    result = json.loads(lines[-1])
    rec.memory_mb = result["delta_mb"]
    rec.memory_note = result["note"]


def memory_child(case_id: str, method_name: str, dtype: str, warmup: bool) -> dict[str, Any]:
    """In a fresh process: peak RSS increase of one call over the RSS after the build.

    Returns:
        ``{"baseline_mb", "peak_mb", "delta_mb", "note"}``.
    """
    inst = build(get_case(case_id), DTYPES[dtype])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn = get(method_name).prepare(inst)
        if warmup:
            fn()
        external = getattr(fn, "measure_memory", None)  # a peer in its own process
        if external is not None:
            delta = external()
            return {"baseline_mb": None, "peak_mb": None, "delta_mb": delta,
                    "note": "VmHWM of the peer's own subprocess"}  # fmt: skip
        gc.collect()
        baseline = machine.rss_mb()
        exact = machine.reset_peak()
        fn()
    peak = machine.peak_mb()
    note = "VmHWM after reset" if exact else "ru_maxrss (peak since start)"
    note += "" if warmup else ", no warm-up (a slow method)"
    return {
        "baseline_mb": baseline,
        "peak_mb": peak,
        "delta_mb": max(0.0, peak - baseline),
        "note": note,
    }


def _child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="memory child of the hesse benchmarks")
    parser.add_argument("case")
    parser.add_argument("method")
    parser.add_argument("dtype", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-warmup", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    machine.set_peer_threads(args.threads)
    print(json.dumps(memory_child(args.case, args.method, args.dtype, not args.no_warmup)))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
