"""The model zoo benchmark: ``python -m benchmarks.zoo`` (or ``hesse bench --zoo``).

For every zoo model (:mod:`benchmarks.zoo_models`), single and batched, the per-sample
Hessian of the selected output with ``strategy="auto"`` against ``torch.func``
(``vmap(hessian)`` over the samples; a loop over samples where vmap cannot run the model),
in float64:

1. **Verification.** Both agree to ``max|H - H_ref| / max|H_ref| <= 1e-8`` (the
   MobileNet's Hardsigmoid backward multiplies by a float32 ``1/6``: 1e-7 there), else
   ``wrong`` and not timed.
2. **Tuning, in a fresh process** (one per model and mode): the library is warmed on an
   unrelated small model (imports, TorchDynamo), then a fresh model object is called
   until ``auto``'s tuning is over (:func:`hesse.planning.tuning.settle`). Every call is
   timed, warnings are counted, and the peak RSS above the RSS before the first call
   (``VmHWM`` reset through ``/proc/self/clear_refs``) is the *tuning peak*. Five more
   calls give the settled time in that process; *tuning time* is the sum of the calls
   until settled minus that many settled calls. ``torch.func`` gets the same fresh
   process: its first call and its peak over three calls.
3. **Settled timing**, in this process: ``auto`` settled, then interleaved rounds of
   ``auto`` and ``torch.func`` (the median of each method's least disturbed round).

Writes ``results.json`` (with the git commit) and ``results.md`` to ``--out``
(default ``benchmarks/results/zoo``). MACE (:mod:`benchmarks.zoo_mace`) runs when
``mace-torch`` is installed.
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
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.func import hessian, vmap

import hesse
from hesse.planning.tuning import settle

from . import machine
from .zoo_models import ZOO, ZooCase, math_attention

BATCH = 16
MODES = ("single", "batched")
TOLERANCE = 1e-8
SETTLED_CALLS = 5
QUICK_MODELS = ("resnet_silu", "vit", "coupling", "pair_potential")
DEFAULT_OUT = machine.ROOT / "benchmarks" / "results" / "zoo"


@dataclass
class Instance:
    """One model of the zoo in one mode: a fresh model object and its input.

    Attributes:
        case: The zoo entry.
        mode: ``"single"`` (``x`` of shape ``S``, or ``(1, *S)`` for BatchNorm models)
            or ``"batched"`` (``(BATCH, *S)``).
        model: The model (float64, eval mode).
        x: The input.
    """

    case: ZooCase
    mode: str
    model: torch.nn.Module
    x: torch.Tensor

    @property
    def batched(self) -> bool:
        return self.mode == "batched"

    def options(self) -> dict[str, Any]:
        """The keyword arguments of the ``hesse.hessian`` call."""
        c = self.case
        return {"batched": self.batched, "output": c.output, "flat": True, "args": c.extra_args()}

    def auto(self) -> torch.Tensor:
        """One ``strategy="auto"`` call: ``(B, m, n, n)`` or ``(m, n, n)`` (``m`` dropped if 1)."""
        return hesse.hessian(self.model, self.x, **self.options())

    def pending(self) -> bool:
        """Whether ``auto``'s tuning of this request is still going on."""
        tuning = hesse.plan(self.model, self.x, "hessian", **self.options()).tuning
        return tuning is not None and tuning.pending


def instance(name: str, mode: str) -> Instance:
    """A fresh model object and the input of ``name`` in ``mode`` (float64)."""
    case = ZOO[name]
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = case.model()  # seeded, the caller's RNG state kept
        x = case.input(BATCH if mode == "batched" else None)
    finally:
        torch.set_default_dtype(dtype)
    return Instance(case, mode, model, x)


def func_peer(inst: Instance) -> tuple[Callable[[], torch.Tensor], str]:
    """``torch.func``'s per-sample Hessians of ``inst`` and how they are computed.

    Returns:
        ``(call, label)``: ``call()`` gives ``(B, m, n, n)`` (batched) or ``(m, n, n)``
        with the flat layout of ``hesse.hessian(..., flat=True)``.
    """
    case = inst.case
    ref = case.reference_model(inst.model)
    samples = inst.x.reshape(-1 if inst.batched else 1, *case.shape)

    def f(z: torch.Tensor) -> torch.Tensor:
        y = ref(z.reshape(1, *case.shape)).reshape(-1)
        return y if case.output is None else y[case.output]

    flat = samples.reshape(samples.shape[0], -1)
    vmapped = vmap(hessian(f))
    label = "vmap(hessian)" + (" of the clamp twin" if case.twin is not None else "")

    def run_vmap() -> torch.Tensor:
        with math_attention():
            out = vmapped(flat)
        return out if inst.batched else out[0]

    def run_loop() -> torch.Tensor:
        with math_attention():
            out = torch.stack([hessian(f)(z) for z in flat])
        return out if inst.batched else out[0]

    try:
        run_vmap()
    except Exception:
        return run_loop, label.replace("vmap(hessian)", "loop of hessian")
    return run_vmap, label


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max|got - want| / max|want|`` (absolute where ``want`` is zero)."""
    diff = float((got.detach().reshape(want.shape) - want).abs().max())
    scale = float(want.abs().max())
    return diff / scale if scale > 0 else diff


def warm_library() -> None:
    """Imports and first-use costs (TorchDynamo, torch.func) on an unrelated small model."""
    with torch.random.fork_rng(devices=[]):
        net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        x = torch.randn(2, 3, dtype=torch.float64)
    net = net.double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hesse.hessian(net, x, batched=True)
        vmap(hessian(lambda z: net(z).sum()))(x)


def _clocked(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return 1e3 * (time.perf_counter() - t0), out


def child_auto(name: str, mode: str) -> dict[str, Any]:
    """In a fresh process: ``auto``'s calls until settled, their warnings and peak RSS."""
    warm_library()
    inst = instance(name, mode)
    calls: list[dict[str, Any]] = []

    def call() -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ms, _ = _clocked(inst.auto)
        calls.append({"ms": ms, "warnings": sorted({type(w.message).__name__ for w in caught})})

    gc.collect()
    baseline = machine.rss_mb()
    exact = machine.reset_peak()
    settle(call, inst.pending)
    peak = machine.peak_mb() - baseline
    settled = statistics.median(_clocked(inst.auto)[0] for _ in range(SETTLED_CALLS))
    plan = hesse.plan(inst.model, inst.x, "hessian", **inst.options())
    total = sum(c["ms"] for c in calls)
    return {
        "first_ms": calls[0]["ms"],
        "calls": calls,
        "settled": not inst.pending(),
        "settled_ms": settled,
        "tuning_ms": max(0.0, total - len(calls) * settled),
        "peak_mb": max(0.0, peak),
        "memory_note": "VmHWM after reset" if exact else "ru_maxrss (peak since start)",
        "strategy": plan.ran or plan.strategy,
        "tuning": str(plan.tuning) if plan.tuning is not None else "",
        "captured": plan.captured,
    }


def child_func(name: str, mode: str) -> dict[str, Any]:
    """In a fresh process: ``torch.func``'s first call and its peak RSS over three calls."""
    warm_library()
    inst = instance(name, mode)
    gc.collect()
    baseline = machine.rss_mb()
    exact = machine.reset_peak()
    fn, label = func_peer(inst)  # its probe call counts as the first
    first = _clocked(fn)[0]
    fn()
    peak = machine.peak_mb() - baseline
    note = "VmHWM after reset" if exact else "ru_maxrss (peak since start)"
    return {"first_ms": first, "peak_mb": max(0.0, peak), "label": label, "memory_note": note}


CHILDREN = {"auto": child_auto, "func": child_func}


def run_child(name: str, mode: str, method: str, threads: int) -> dict[str, Any]:
    """Runs :data:`CHILDREN` ``[method]`` in a fresh Python process; ``{"error"}`` if it fails."""
    cmd = [sys.executable, "-m", "benchmarks.zoo", "--child", name, mode, method]
    cmd += ["--threads", str(threads)]
    path = [str(machine.ROOT), str(machine.ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
    # glibc gives freed memory back at once, so that the warm-up does not hide the peak
    env |= {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    try:
        proc = subprocess.run(
            cmd, cwd=machine.ROOT, env=env, capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired:
        return {"error": "child timed out after 600 s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, repeats: int) -> dict:
    """Times the callables in interleaved rounds: per name, the median of its best round."""
    medians: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            gc.collect()
            medians[name].append(statistics.median(_clocked(fn)[0] for _ in range(repeats)))
    return {k: min(v) for k, v in medians.items()}


def run_case(name: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Verifies, tunes (child processes) and times one zoo model in one mode."""
    inst = instance(name, mode)
    rec: dict[str, Any] = {"model": name, "mode": mode, "status": "ok", "error": ""}
    rec["input_shape"], rec["output"] = list(inst.x.shape), inst.case.output
    try:
        func, rec["func_label"] = func_peer(inst)
        want = func().detach()
    except Exception as exc:
        rec.update(status="no reference", error=f"torch.func: {type(exc).__name__}: {exc}"[:300])
        return rec
    rec["result_shape"] = list(want.shape)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            settle(inst.auto, inst.pending)
            got = inst.auto()
    except Exception as exc:
        rec.update(status="error", error=f"{type(exc).__name__}: {exc}"[:300])
        return rec
    rec["rel_error"] = relative_error(got, want)
    if rec["rel_error"] > max(TOLERANCE, inst.case.rtol):
        rec.update(status="wrong", error=f"relative error {rec['rel_error']:.1e}")
        return rec
    plan = hesse.plan(inst.model, inst.x, "hessian", **inst.options())
    rec["strategy"] = plan.ran or plan.strategy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = interleaved({"auto": inst.auto, "func": func}, args.rounds, args.repeats)
    rec["settled_ms"], rec["func_ms"] = times["auto"], times["func"]
    rec["speedup"] = times["func"] / times["auto"]
    if not args.no_memory:
        rec["auto_child"] = run_child(name, mode, "auto", args.threads)
        rec["func_child"] = run_child(name, mode, "func", args.threads)
    return rec


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.zoo", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_MODELS)}")
    p.add_argument("--models", help=f"comma list of: {', '.join(ZOO)}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, help="interleaved timing rounds (quick 2, full 3)")
    p.add_argument("--repeats", type=int, default=5, help="calls per method and round")
    p.add_argument("--no-memory", action="store_true", help="no child processes (no tuning)")
    p.add_argument("--no-mace", action="store_true", help="leave out the MACE case")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--child", nargs=3, metavar=("MODEL", "MODE", "METHOD"), help=argparse.SUPPRESS)
    return p.parse_args(list(argv) if argv is not None else None)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the zoo benchmark, writes JSON and markdown, prints the markdown.

    Args:
        argv: Command-line arguments; ``None``: ``sys.argv[1:]``.

    Returns:
        Exit status (0).
    """
    from . import zoo_report

    args = parse(argv)
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    if args.child:
        name, mode, method = args.child
        print(json.dumps(CHILDREN[method](name, mode)))
        return 0
    names = args.models.split(",") if args.models else list(QUICK_MODELS if args.quick else ZOO)
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        raise SystemExit(f"python -m benchmarks.zoo: unknown models {unknown}; known: {list(ZOO)}")
    args.rounds = args.rounds or (2 if args.quick else 3)
    start = time.perf_counter()
    run: dict[str, Any] = {"env": machine.environment(args.threads), "batch": BATCH}
    run["settings"] = {"rounds": args.rounds, "repeats": args.repeats, "quick": args.quick}
    run["records"] = []
    for name in names:
        for mode in MODES:
            rec = run_case(name, mode, args)
            print(zoo_report.line(rec), file=sys.stderr, flush=True)
            run["records"].append(rec)
    if not args.no_mace:
        from . import zoo_mace

        run["mace"] = zoo_mace.run(args)
    run["wall_s"] = time.perf_counter() - start
    run["env"]["load_average_end"] = machine.load_average()
    paths = zoo_report.write(run, args.out)
    print(zoo_report.markdown(run))
    print(f"wall {run['wall_s']:.0f} s; wrote {', '.join(map(str, paths))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
