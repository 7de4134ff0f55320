"""Entry point of the benchmarks: ``python -m benchmarks.run`` or ``hesse bench``.

``main(argv)`` takes the arguments after ``bench``. Per case: the float64 ``torch.func``
reference, then per dtype (float64 first: it is the verification) the gradient time and
every method (:func:`benchmarks.protocol.evaluate`); a method that failed in float64 is not
timed in float32. Memory children run at the end of each case.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import machine, protocol, report
from .cases import (
    CASES,
    PINN_SMOKE_CASES,
    QUICK_CASES,
    SMOKE_CASES,
    build,
    forward_macs,
    get_case,
    head,
    hessian_macs,
)
from .peers import methods
from .peers.torch_peers import reference

QUICK = {"repeats": 3, "rounds": 1, "budget_s": 1.5, "cap_s": 5.0, "skip_slow": True}
FULL = {"repeats": 9, "rounds": 3, "budget_s": 6.0, "cap_s": 20.0, "skip_slow": False}
# quick runs measure memory for these methods only (a child process costs ~3 s)
QUICK_MEMORY = ("func_hessian", "jax_hessian", "hesse[auto]")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (the arguments after ``hesse bench``)."""
    p = argparse.ArgumentParser(
        prog="hesse bench", description="Benchmark hesse against its peers (see benchmarks/)."
    )
    p.add_argument("--quick", action="store_true", help="a few cases and methods, minutes")
    p.add_argument("--cases", type=_csv, help=f"comma list of: {', '.join(CASES)}")
    p.add_argument("--methods", type=_csv, help="comma list of method names (--list)")
    p.add_argument("--dtypes", type=_csv, default=["float32", "float64"])
    p.add_argument(
        "--repeats", type=int, help="timed calls per method, over all rounds (quick 3, full 9)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        help="timing rounds, each over every method of a case in turn (quick 1, full 3)",
    )
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, help="output folder (full runs: benchmarks/results/<ts>)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory child processes")
    p.add_argument("--cap", type=float, help="seconds: a slower first call is the only timing")
    p.add_argument("--list", action="store_true", help="list cases and methods, then exit")
    p.add_argument(
        "--zoo", action="store_true", help="the model zoo instead (python -m benchmarks.zoo)"
    )
    p.add_argument(
        "--heap-cache",
        action="store_true",
        help="hesse.set_heap_cache() for the whole run (every method; implies --no-memory)",
    )
    return p.parse_args(list(argv) if argv is not None else None)


def _select(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    table = methods()
    cases = args.cases or (list(QUICK_CASES) if args.quick else list(CASES))
    names = args.methods or list(table)
    known = set(CASES) | set(SMOKE_CASES) | set(PINN_SMOKE_CASES)
    unknown = [c for c in cases if c not in known] + [m for m in names if m not in table]
    unknown += [d for d in args.dtypes if d not in protocol.DTYPES]
    if unknown:
        raise SystemExit(f"hesse bench: unknown case/method/dtype {unknown}; see --list")
    return cases, names


def _case_info(case_id: str, gemm: dict[str, float]) -> dict[str, Any]:
    case = get_case(case_id)
    macs = hessian_macs(case)
    return {
        "title": case.title,
        "quantity": case.quantity,
        "n": case.n,
        "batch": case.batch,
        "output": case.output,
        "result_shape": case.result_shape,
        "forward_macs": forward_macs(case),
        "hessian_macs": macs,
        "ideal_ms": {d: 2e3 * macs / (g * 1e9) for d, g in gemm.items()},
        "gradient_ms": {},
    }


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_case(
    case_id: str, names: list[str], dtypes: list[str], settings: protocol.Settings, info: dict
) -> list[protocol.Record]:
    """Verifies (float64) and times (every dtype) every method on one case."""
    case = get_case(case_id)
    full64 = build(case, torch.float64)
    ref = reference(full64).detach()
    check_inst = head(full64, settings.verify_batch)
    check_ref = ref[: settings.verify_batch] if check_inst is not full64 else ref
    if check_inst is not full64 and case.quantity == "laplacian_train":  # not per sample
        check_ref = reference(check_inst).detach()
    insts = {d: full64 if d == "float64" else build(case, protocol.DTYPES[d]) for d in dtypes}
    for dtype, inst in insts.items():
        info["gradient_ms"][dtype] = protocol.gradient_ms(inst, settings.repeats)
    table = methods()
    checks = {}
    for name in names:
        if settings.skip_slow_batched and table[name].slow and case.batched:
            checks[name] = protocol.Check("slow", report.QUICK_SKIP)
        else:
            checks[name] = protocol.verify(table[name], check_inst, check_ref, case.samples)
    records: list[protocol.Record] = []
    skips: dict[str, str] = {}
    for dtype in dtypes:  # every method's first call, then the timing rounds of all
        timed = []
        for name in names:
            rec, entry = protocol.start(
                table[name], insts[dtype], ref, checks[name], skips.get(name)
            )
            records.append(rec)
            if entry is not None:
                timed.append(entry)
        protocol.time_rounds(timed, settings)
        for rec in records[-len(names) :]:
            if rec.capped:
                skips[rec.method] = (
                    f"{dtype} call took {rec.first_ms / 1e3:.0f} s > cap {settings.cap_s:.0f} s"
                )
            shown = f"{rec.median_ms:.2f} ms" if rec.median_ms is not None else rec.reason[:90]
            _log(f"  {case_id:16s} {dtype:7s} {rec.method:24s} {rec.status:11s} {shown}")
    order = {name: i for i, name in enumerate(names)}
    return sorted(records, key=lambda r: order[r.method])  # per method, dtypes in order


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmarks and writes JSON, markdown and PNG; prints the markdown.

    Args:
        argv: Command-line arguments (after ``bench``); ``None``: ``sys.argv[1:]``.

    Returns:
        Exit status (0).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--zoo" in argv:  # the zoo benchmark has its own options (benchmarks/zoo.py)
        from .zoo import main as zoo_main

        return zoo_main([a for a in argv if a != "--zoo"])
    args = parse(argv)
    if args.list:
        print("cases:\n" + "\n".join(f"  {k}: {c.title}" for k, c in CASES.items()))
        print("methods:\n" + "\n".join(f"  {k}: {m.label}" for k, m in methods().items()))
        return 0
    cases, names = _select(args)
    knobs = QUICK if args.quick else FULL
    settings = protocol.Settings(
        repeats=args.repeats or knobs["repeats"],
        rounds=args.rounds or knobs["rounds"],
        budget_s=knobs["budget_s"],
        cap_s=args.cap or knobs["cap_s"],
        skip_slow_batched=knobs["skip_slow"],
    )
    torch.set_num_threads(args.threads)
    os.environ["HESSE_BENCH_THREAD_NOTE"] = machine.set_peer_threads(args.threads)
    if args.heap_cache:  # process-wide: peers benefit as much as hesse
        import hesse

        hesse.set_heap_cache()
        args.no_memory = True  # kept freed memory would hide the measured call's peak
    start = time.perf_counter()
    gemm = {d: machine.gemm_gflops(protocol.DTYPES[d]) for d in args.dtypes}
    _log(f"threads {args.threads}; GEMM GFLOP/s {gemm}")
    env = machine.environment(args.threads)
    if args.heap_cache:
        env["note"] += "; glibc heap cache on for every method (hesse.set_heap_cache)"
    run: dict[str, Any] = {
        "env": env,
        "mode": "quick" if args.quick else "full",
        "dtypes": args.dtypes,
        "settings": vars(settings),
        "tolerance": protocol.TOLERANCE,
        "gemm_gflops": gemm,
        "cases": {c: _case_info(c, gemm) for c in cases},
        "methods": {m: methods()[m].label for m in names},
        "records": [],
    }
    mem_dtype = "float32" if "float32" in args.dtypes else args.dtypes[0]
    for case_id in cases:
        _log(f"{case_id}: {get_case(case_id).title}")
        records = run_case(case_id, names, args.dtypes, settings, run["cases"][case_id])
        for rec in records:
            if args.no_memory or rec.dtype != mem_dtype or rec.status != "ok":
                continue
            if args.quick and rec.method not in QUICK_MEMORY:
                continue
            if rec.capped:
                rec.memory_note = "not measured (slower than the cap)"
            else:
                protocol.measure_memory(rec, args.threads, settings)
        run["records"] += [r.to_json() for r in records]
    run["wall_s"] = time.perf_counter() - start
    run["env"]["load_average_end"] = machine.load_average()
    out = args.out
    if out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = (
            Path(tempfile.gettempdir()) if args.quick else machine.ROOT / "benchmarks" / "results"
        )
        out = base / (f"hesse-bench-quick-{stamp}" if args.quick else stamp)
    paths = report.write(run, out)
    print(report.markdown(run))
    _log(f"wall {run['wall_s']:.0f} s; wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
