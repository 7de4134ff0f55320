"""Calibrates hesse's cost model: measured times of every strategy against its estimates.

Runs each case through every strategy ``auto`` considers (interleaved rounds, after
warm-up calls, one thread by default), records the cost model's multiply-adds and bytes
moved (``Plan.work``), fits the two rates of

    seconds = MACs / mac_rate + bytes / byte_rate

on a grid over both rates, two ways: to log time (least squares: the best prediction of
time) and to the picks (the least mean slowdown of the first pick, ties broken by the log
error: what ``auto`` needs, and what ``hesse.engine.cost.RATES`` holds). It reports how
often the cost model's first pick is the measured fastest, and the mean and worst
slowdown of its pick against the fastest: *before* (multiply-adds only), with the
*shipped* rates, and with both fits. ``--refit results.json`` fits earlier records again.

    python -m benchmarks.calibrate --threads 1 --out benchmarks/results/calibration

Strategies whose multiply-add estimate says a call takes more than ``--skip-over``
seconds (at 1e10 MAC/s) are not run; they count as slower than the fastest.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

import hesse
from benchmarks.cases import CASES, build

DEFAULT_CASES = (
    "pinn_d2_hess",
    "pinn_d8_hess",
    "pinn_d32_hess",
    "pinn_d8_lap",
    "pinn_d32_lap",
    "pinn_d8_diag",
    "pinn_d32_diag",
    "pinn_d3_lap_3out",
    "mnist_single",
    "mnist_b16",
    "cnn_single",
    "atoms32",
)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(DEFAULT_CASES))
    p.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3, help="calls before timing (programs)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--slow", type=float, default=2.0, help="one timed call when slower (s)")
    p.add_argument("--skip-over", type=float, default=30.0)
    p.add_argument("--out", default="benchmarks/results/calibration")
    p.add_argument("--refit", default="", help="fit the records of this results.json again")
    return p.parse_args(argv)


def _plan(inst, strategy: str) -> hesse.Plan:
    case = inst.case
    return hesse.plan(
        inst.model, inst.x, case.quantity, output=case.output, batched=case.batched,
        strategy=strategy,
    )  # fmt: skip


def _timed(plan: hesse.Plan, x: torch.Tensor) -> float:
    start = time.perf_counter()
    plan(x)
    return time.perf_counter() - start


def measure(case_id: str, args: argparse.Namespace) -> dict:
    """Times every candidate strategy of one case; returns its records."""
    inst = build(CASES[case_id], getattr(torch, args.dtype))
    auto = _plan(inst, "auto")
    work = {name: (macs, moved) for name, macs, moved in auto.work}
    plans, times, skipped = {}, {}, {}
    for name, (macs, _) in work.items():
        if macs / 1e10 > args.skip_over:
            skipped[name] = f"estimated {macs / 1e10:.0f} s at 1e10 MAC/s"
            continue
        try:
            plans[name] = _plan(inst, name)
            first = [_timed(plans[name], inst.x)]
            while len(first) < args.warmup and first[-1] < args.slow:
                first.append(_timed(plans[name], inst.x))
        except hesse.HesseError as exc:
            skipped[name] = f"{type(exc).__name__}: {str(exc)[:100]}"
            plans.pop(name, None)
            continue
        times[name] = [first[-1]] if first[-1] >= args.slow else []
    for _ in range(args.rounds):  # interleaved rounds
        for name, plan in plans.items():
            if not times[name] or times[name][-1] < args.slow:
                times[name].append(_timed(plan, inst.x))
    return {
        "case": case_id,
        "title": inst.case.title,
        "strategies": {
            name: {"macs": work[name][0], "bytes": work[name][1], "seconds": min(ts)}
            for name, ts in times.items()
        },
        "skipped": skipped,
    }


def _predict(macs: np.ndarray, moved: np.ndarray, mac_rate, byte_rate) -> np.ndarray:
    return macs / mac_rate + moved / byte_rate


def _slowdowns(records: list[dict], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean slowdown of the first pick against the fastest, for every pair of rates."""
    total, cases = np.zeros(np.broadcast_shapes(a.shape[:-1], b.shape[:-1])), 0
    for r in records:
        st = list(r["strategies"].values())
        if len(st) < 2:
            continue
        macs, moved = (np.array([s[k] for s in st]) for k in ("macs", "bytes"))
        t = np.array([s["seconds"] for s in st])
        pick = np.argmin(_predict(macs, moved, a, b), axis=-1)
        total, cases = total + t[pick] / t.min(), cases + 1
    return total / max(cases, 1)


def fit(records: list[dict]) -> dict:
    """Fits ``mac_rate`` and ``byte_rate`` on a grid, two ways.

    To log time: least squares of log time (the best time prediction). To the picks: the
    rates whose first picks are slower than the fastest by the least on average, ties
    broken by the log error (what ``auto`` needs; the shipped constants).
    """
    rows = [s for r in records for s in r["strategies"].values()]
    macs = np.array([s["macs"] for s in rows])
    moved = np.array([s["bytes"] for s in rows])
    logt = np.log(np.array([s["seconds"] for s in rows]))
    grid = 10.0 ** np.arange(7.0, 13.01, 0.025)
    a, b = grid[:, None, None], grid[None, :, None]
    loss = ((np.log(_predict(macs, moved, a, b)) - logt) ** 2).sum(-1)
    i, j = np.unravel_index(np.argmin(loss), loss.shape)
    slow = _slowdowns(records, a, b)
    best = np.where(slow <= slow.min() + 1e-9, loss, np.inf)
    pi, pj = np.unravel_index(np.argmin(best), best.shape)
    only = ((np.log(macs[None, :] / grid[:, None]) - logt) ** 2).sum(-1)
    return {
        "mac_rate": float(grid[i]),
        "byte_rate": float(grid[j]),
        "rms_log_error": float(math.sqrt(loss[i, j] / len(rows))),
        "pick_mac_rate": float(grid[pi]),
        "pick_byte_rate": float(grid[pj]),
        "pick_rms_log_error": float(math.sqrt(loss[pi, pj] / len(rows))),
        "mac_only_rate": float(grid[np.argmin(only)]),
        "mac_only_rms_log_error": float(math.sqrt(only.min() / len(rows))),
    }


def picks(records: list[dict], score) -> dict:
    """How often ``score``'s cheapest strategy is the measured fastest, and its slowdown."""
    hits, slowdowns, per_case = 0, [], {}
    for r in records:
        st = r["strategies"]
        if len(st) < 2:
            continue
        pick = min(st, key=lambda n: score(st[n]))
        fastest = min(st, key=lambda n: st[n]["seconds"])
        hits += pick == fastest
        slowdowns.append(st[pick]["seconds"] / st[fastest]["seconds"])
        per_case[r["case"]] = pick
    n = len(slowdowns)
    return {
        "cases": n,
        "first_pick_fastest": hits,
        "accuracy": hits / n if n else float("nan"),
        "mean_slowdown": float(np.mean(slowdowns)) if n else float("nan"),
        "max_slowdown": float(np.max(slowdowns)) if n else float("nan"),
        "picks": per_case,
    }


def simulate(records: list[dict], calls: int, rates: tuple[float, float]) -> dict:
    """Tuning's extra time over ``calls`` calls, replayed on the measured times.

    Each call of a strategy takes its measured time (warm-up costs are not replayed).
    *Before*: the candidates whose multiply-adds are within 6x of the fewest (at most 4),
    three calls each, then the fastest. *After*: :class:`hesse.planning.tuning.Tuner`
    with the time estimates (the 20% rule, drops, skips). Extra time: the calls' total
    minus ``calls`` times the fastest strategy.
    """
    from hesse.planning import tuning

    out = {}
    for r in records:
        st = r["strategies"]
        if len(st) < 2:
            continue
        t = {n: s["seconds"] for n, s in st.items()}
        fastest = min(t.values())
        by_macs = sorted(st, key=lambda n: st[n]["macs"])
        close = [n for n in by_macs if st[n]["macs"] <= 6 * st[by_macs[0]]["macs"]][:4]
        old = [n for n in close for _ in range(3)]
        old = (old + [min(close, key=t.__getitem__)] * calls)[:calls]
        est = {n: _predict(s["macs"], s["bytes"], *rates) for n, s in st.items()}
        ordered = sorted(st, key=est.__getitem__)
        near = [n for n in ordered if est[n] <= tuning.FACTOR * est[ordered[0]]]
        tuner = tuning.Tuner(near[: tuning.MAX_CANDIDATES], est)
        new = []
        for _ in range(calls):
            name = tuner.order(ordered)[0]
            tuner.record(name, t[name])
            new.append(name)
        out[r["case"]] = {
            "fastest_s": fastest,
            "before_extra_s": sum(t[n] for n in old) - calls * fastest,
            "after_extra_s": sum(t[n] for n in new) - calls * fastest,
            "after_skipped": dict(tuner.skipped),
        }
    return out


def report(result: dict) -> str:
    """The markdown report."""
    fitted, s = result["fit"], result["summary"]
    lines = [
        "# Cost model calibration",
        "",
        f"{result['environment']['dtype']}, {result['environment']['threads']} thread(s), "
        f"torch {result['environment']['torch']}, {result['environment']['machine']}.",
        "",
        f"Fitted to log time: mac_rate = {fitted['mac_rate']:.3g} MAC/s, byte_rate = "
        f"{fitted['byte_rate']:.3g} B/s (rms log error {fitted['rms_log_error']:.2f}; "
        f"MAC-only fit {fitted['mac_only_rate']:.3g} MAC/s, rms log error "
        f"{fitted['mac_only_rms_log_error']:.2f}). Fitted to the picks: mac_rate = "
        f"{fitted['pick_mac_rate']:.3g} MAC/s, byte_rate = {fitted['pick_byte_rate']:.3g} "
        f"B/s (rms log error {fitted['pick_rms_log_error']:.2f}).",
        "",
        "| cost model | first pick fastest | mean slowdown of the pick | worst |",
        "|---|---|---|---|",
    ]
    for label, key in (
        ("MACs only (before)", "mac_only"),
        ("MACs + bytes, shipped rates", "shipped"),
        ("MACs + bytes, fitted to log time", "fitted"),
        ("MACs + bytes, fitted to the picks", "fitted_picks"),
    ):
        p = s[key]
        lines.append(
            f"| {label} | {p['first_pick_fastest']}/{p['cases']} ({p['accuracy']:.0%}) | "
            f"{p['mean_slowdown']:.2f}x | {p['max_slowdown']:.2f}x |"
        )
    sim = result.get("tuning_cost", {})
    if sim:
        lines += [
            "",
            f"Tuning's extra time over {result['tuning_calls']} calls against running the "
            "fastest from the start, replayed on the measured times (before: 3 calls of "
            "every candidate within 6x of the fewest MACs; after: the budgeted tuner):",
            "",
            "| case | fastest ms | before: extra s | after: extra s |",
            "|---|---|---|---|",
        ]
        for case, v in sim.items():
            lines.append(
                f"| {case} | {1e3 * v['fastest_s']:.3g} | {v['before_extra_s']:.3g} | "
                f"{v['after_extra_s']:.3g} |"
            )
        before = sum(v["before_extra_s"] for v in sim.values())
        after = sum(v["after_extra_s"] for v in sim.values())
        lines.append(f"| all | | {before:.3g} | {after:.3g} |")
    lines += ["", "| case | strategy | measured ms | MACs | bytes | pick (MAC / +bytes) |"]
    lines.append("|---|---|---|---|---|---|")
    for r in result["records"]:
        before, after = (s[k]["picks"].get(r["case"], "-") for k in ("mac_only", "fitted"))
        tags = f"{before} / {after}"
        for name, st in r["strategies"].items():
            lines.append(
                f"| {r['case']} | {name} | {1e3 * st['seconds']:.3g} | {st['macs']:.3g} | "
                f"{st['bytes']:.3g} | {tags} |"
            )
        for name, why in r["skipped"].items():
            lines.append(f"| {r['case']} | {name} | not run: {why} | | | |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args.refit:  # the records of an earlier run, fitted again (no timing)
        records = json.loads(Path(args.refit).read_text())["records"]
    else:
        records = []
        for case_id in args.cases.split(","):
            start = time.perf_counter()
            records.append(measure(case_id, args))
            print(f"{case_id}: {time.perf_counter() - start:.1f} s", flush=True)
    from hesse.engine.cost import RATES

    itemsize = getattr(torch, args.dtype).itemsize
    shipped = RATES[("cpu", itemsize)]
    fitted = fit(records)
    summary = {
        "mac_only": picks(records, lambda s: s["macs"]),
        "shipped": picks(records, lambda s: _predict(s["macs"], s["bytes"], *shipped)),
        "fitted": picks(
            records,
            lambda s: _predict(s["macs"], s["bytes"], fitted["mac_rate"], fitted["byte_rate"]),
        ),
        "fitted_picks": picks(
            records,
            lambda s: _predict(
                s["macs"], s["bytes"], fitted["pick_mac_rate"], fitted["pick_byte_rate"]
            ),
        ),
    }
    calls = 20
    result = {
        "tuning_calls": calls,
        "tuning_cost": simulate(records, calls, shipped),
        "environment": {
            "dtype": args.dtype,
            "threads": args.threads,
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "shipped_rates": shipped,
        },
        "fit": fitted,
        "summary": summary,
        "records": records,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "results.md").write_text(report(result))
    print(report(result).split("\n| case")[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
