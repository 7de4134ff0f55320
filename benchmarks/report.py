"""The report of a run: JSON (everything), markdown tables and a PNG dot plot."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

STATUS_CELL: dict[str, str] = {
    "wrong": "wrong",
    "error": "error",
    "unsupported": "n/a",
    "skipped": "skipped",
    "slow": "slow",
}
QUICK_SKIP = "slow peer on a batched case: left out of --quick"


def _ms(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value >= 1 else f"{value:.3f}"


def _index(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str, str], Mapping[str, Any]]:
    return {(r["case"], r["method"], r["dtype"]): r for r in records}


def _present(run: Mapping[str, Any], dtype: str) -> tuple[list[str], list[str]]:
    """Cases and methods that have a record at ``dtype``, in run order."""
    recs = [r for r in run["records"] if r["dtype"] == dtype]
    cases = [c for c in run["cases"] if any(r["case"] == c for r in recs)]
    methods = [m for m in run["methods"] if any(r["method"] == m for r in recs)]
    return cases, methods


def time_table(run: Mapping[str, Any], dtype: str) -> str:
    """Markdown: median ms (ratio to the fastest in the case) per method and case.

    Args:
        run: The run dict (see :func:`benchmarks.run.main`).
        dtype: ``"float32"`` or ``"float64"``.
    """
    cases, methods = _present(run, dtype)
    index = _index(run["records"])
    best = {}
    for c in cases:
        times = [index[c, m, dtype]["median_ms"] for m in methods if (c, m, dtype) in index]
        times = [t for t in times if t is not None]
        best[c] = min(times) if times else None
    lines = [
        "| method | " + " | ".join(cases) + " |",
        "|---|" + "---:|" * len(cases),
    ]
    for m in methods:
        cells = []
        for c in cases:
            rec = index.get((c, m, dtype))
            if rec is None:
                cells.append("")
            elif rec["median_ms"] is None:
                cells.append(STATUS_CELL.get(rec["status"], rec["status"]))
            else:
                text = _ms(rec["median_ms"]) + ("†" if rec["capped"] else "")
                text += f" ({rec['median_ms'] / best[c]:.1f}x)"
                cells.append(f"**{text}**" if rec["median_ms"] == best[c] else text)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    extra = {
        "1 gradient (fwd+bwd)": lambda c: run["cases"][c]["gradient_ms"].get(dtype),
        "ideal: analytic MACs at GEMM ceiling": lambda c: run["cases"][c]["ideal_ms"].get(dtype),
    }
    for label, get in extra.items():
        lines.append(f"| *{label}* | " + " | ".join(_opt(get(c)) for c in cases) + " |")
    ratio = [
        _opt(best[c] / run["cases"][c]["ideal_ms"][dtype], "x") if best[c] else "" for c in cases
    ]
    lines.append("| *fastest / ideal* | " + " | ".join(ratio) + " |")
    return "\n".join(lines)


def standing_table(run: Mapping[str, Any], method: str = "hesse[auto]") -> str:
    """Markdown: ``method`` against torch.func, the fastest peer and hesse's own strategies.

    Every ratio is the other's median time (or peak memory) over ``method``'s: above 1 means
    ``method`` is faster (leaner). *vs best strategy* compares ``"auto"`` with the fastest
    explicit hesse strategy of the case (the planner check: 0.91 or more is within 10%).
    """
    index = _index(run["records"])
    peers = [m for m in run["methods"] if not m.startswith("hesse[")]
    own = [m for m in run["methods"] if m.startswith("hesse[") and "auto" not in m]
    head = ["case"]
    for dtype in run["dtypes"]:
        head += [
            f"vs torch.func, {dtype}",
            f"vs fastest peer, {dtype}",
            f"vs best strategy, {dtype}",
        ]
    head.append("memory vs torch.func, float32")
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]

    def median(case: str, m: str, dtype: str) -> float | None:
        rec = index.get((case, m, dtype))
        return None if rec is None else rec["median_ms"]

    def best(case: str, names: list[str], dtype: str) -> tuple[float, str] | None:
        timed = [(t, m) for m in names if (t := median(case, m, dtype)) is not None]
        return min(timed) if timed else None

    for case in run["cases"]:
        cells = [f"`{case}`"]
        for dtype in run["dtypes"]:
            mine = median(case, method, dtype)
            func, peer = median(case, reference_method(run, case), dtype), best(case, peers, dtype)
            strat = best(case, own, dtype)
            cells.append(f"{func / mine:.2f}x" if mine and func else "")
            cells.append(f"{peer[0] / mine:.2f}x ({peer[1]})" if mine and peer else "")
            cells.append(f"{strat[0] / mine:.2f}x ({strat[1][6:-1]})" if mine and strat else "")
        mem = [
            (index.get((case, m, "float32")) or {}).get("memory_mb")
            for m in (method, reference_method(run, case))
        ]
        cells.append(f"{mem[1] / mem[0]:.2f}x" if mem[0] and mem[1] else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reference_method(run: Mapping[str, Any], case: str) -> str:
    """The torch.func method a case is compared with (training steps have their own)."""
    train = run["cases"][case].get("quantity") == "laplacian_train"
    return "func_train" if train else "func_hessian"


def per_datum_table(run: Mapping[str, Any], dtype: str = "float32") -> str:
    """Markdown: peak memory per sample (KiB) of the training-step cases, per method."""
    cases = [c for c, v in run["cases"].items() if v.get("quantity") == "laplacian_train"]
    index = _index(run["records"])
    rows = []
    for m in run["methods"]:
        cells = []
        for c in cases:
            mb = (index.get((c, m, dtype)) or {}).get("memory_mb")
            cells.append(f"{1024 * mb / run['cases'][c]['batch']:.0f}" if mb else "")
        if any(cells):
            rows.append(f"| {m} | " + " | ".join(cells) + " |")
    if not rows:
        return ""
    head = "| method | " + " | ".join(f"`{c}`" for c in cases) + " |"
    return "\n".join([head, "|---|" + "---:|" * len(cases), *rows])


def _opt(value: float | None, suffix: str = "") -> str:
    return "" if value is None else _ms(value) + suffix


def memory_table(run: Mapping[str, Any], dtype: str) -> str:
    """Markdown: peak RSS increase (MB) of one call, per method and case."""
    cases, methods = _present(run, dtype)
    index = _index(run["records"])
    lines = ["| method | " + " | ".join(cases) + " |", "|---|" + "---:|" * len(cases)]
    rows = 0
    for m in methods:
        cells = []
        for c in cases:
            rec = index.get((c, m, dtype))
            mem = None if rec is None else rec.get("memory_mb")
            cells.append("" if mem is None else f"{mem:,.0f}")
        if any(cells):
            rows += 1
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if rows else ""


def notes(run: Mapping[str, Any]) -> str:
    """Markdown list: every failure with its reason, capped timings, warnings."""
    items = []
    for r in run["records"]:
        where = f"`{r['method']}` on `{r['case']}` ({r['dtype']})"
        if r["status"] not in ("ok", "unsupported") and r["reason"] != QUICK_SKIP:
            items.append(f"- {where}: **{r['status']}**: {r['reason']}")
        if r["capped"]:
            items.append(f"- {where}: one call took {r['first_ms'] / 1e3:.1f} s: single timing")
        if r.get("memory_note", "").startswith("memory child"):
            items.append(f"- {where}: {r['memory_note']}")
        items.extend(f"- {where}: {w}" for w in r["warnings"])
        if r.get("note"):
            items.append(f"- {where}: {r['note']}")
    return "\n".join(items)


def markdown(run: Mapping[str, Any]) -> str:
    """The whole markdown report of a run."""
    env = run["env"]
    quick = run["mode"] == "quick"
    gemm = ", ".join(f"{d} {g:.0f} GFLOP/s" for d, g in run["gemm_gflops"].items())
    out = [
        "# hesse benchmarks",
        "",
        f"{env['date']}, {env['cpu']}, {env['cores']} cores, torch threads "
        f"{env['torch_threads']} (XLA the same{'' if env.get('xla_flags') else ': not set'}), "
        f"torch {env['versions']['torch']}, jax "
        f"{env['versions']['jax']}, hessQuik {env['versions']['hessquik']}, hesse "
        f"{env['versions']['hesse']} ({env['git']}). Matrix-multiply ceiling: {gemm}."
        + (" Heap cache on for every method." if "heap cache" in env.get("note", "") else ""),
        "",
        "Median ms per call"
        + (
            f" in the least disturbed of {rounds} rounds (each round times every method in turn)"
            if (rounds := run["settings"].get("rounds", 1)) > 1
            else ""
        )
        + " (ratio to the fastest method of the case; fastest in bold). "
        "Every method was first checked in float64 against torch.func (relative error "
        f"<= {run['tolerance']['float64']:.0e}; float32 <= {run['tolerance']['float32']:.0e}); "
        "`wrong`: failed that check, not timed; `n/a`: the method cannot express the case; "
        "†: slower than the cap, a single call (`slow`: then not run in the other dtype). "
        "*ideal*: analytic multiply-adds of forward-over-reverse ((1+n)(1+m) forwards) at "
        "the measured GEMM rate."
        + (" Quick mode: peers marked slow are left out on batched cases." if quick else ""),
        "",
        "Cases:",
        "",
        *(f"- `{c}`: {v['title']}" for c, v in run["cases"].items()),
    ]
    loads = [env.get("load_average"), env.get("load_average_end")]
    if any(x is not None and x > (env["cores"] or 1) + 0.5 for x in loads):
        out[4:4] = [
            f"**Warning: the machine was busy (load average {loads[0]} at the start, "
            f"{loads[1]} at the end, {env['cores']} cores, this run included): timings are "
            "not reliable.**",
            "",
        ]
    for dtype in run["dtypes"]:
        table = time_table(run, dtype)
        if table.count("\n") > 4:
            out += ["", f"## Time, {dtype}", "", table]
    if any(r["method"] == "hesse[auto]" for r in run["records"]):
        out += ["", "## hesse[auto] against the others (their time / auto's: >1 is faster)", ""]
        out += [standing_table(run)]
    for dtype in run["dtypes"]:
        table = memory_table(run, dtype)
        if table:
            out += ["", f"## Peak memory, {dtype} (MB above the built case, own process)", ""]
            out += [table]
    if table := per_datum_table(run):
        out += ["", "## Training step: peak memory per sample, float32 (KiB)", "", table]
    if text := notes(run):
        out += ["", "## Failures and notes", "", text]
    return "\n".join(out) + "\n"


def plot(run: Mapping[str, Any], path: Path) -> bool:
    """Dot plot per case: time in gradient evaluations (log), methods on the y axis.

    Returns:
        False when matplotlib is missing (no file written).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    index = _index(run["records"])
    cases = list(run["cases"])
    methods = list(run["methods"])
    cols = min(4, len(cases))
    rows = -(-len(cases) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 0.22 * len(methods) * rows + 1.5))
    axes = [axes] if len(cases) == 1 else list(getattr(axes, "flat", axes))
    style = {"float32": ("o", "C0"), "float64": ("s", "C3")}
    for ax, c in zip(axes, cases, strict=False):
        for dtype in run["dtypes"]:
            grad = run["cases"][c]["gradient_ms"].get(dtype)
            pts = [
                (index[c, m, dtype]["median_ms"] / grad, i)
                for i, m in enumerate(methods)
                if (c, m, dtype) in index and index[c, m, dtype]["median_ms"] and grad
            ]
            if pts:
                marker, color = style[dtype]
                ax.scatter(*zip(*pts, strict=True), marker=marker, color=color, label=dtype, s=18)
            ideal = run["cases"][c]["ideal_ms"].get(dtype)
            if ideal and grad:
                ax.axvline(ideal / grad, color=style[dtype][1], ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_yticks(range(len(methods)), methods, fontsize=6)
        ax.invert_yaxis()
        ax.set_title(c, fontsize=8)
        ax.set_xlabel("time / one gradient (dashed: ideal)", fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(True, axis="x", alpha=0.3)
    for ax in axes[len(cases) :]:
        ax.set_visible(False)
    handles = [
        plt.Line2D([], [], marker=style[d][0], color=style[d][1], ls="", label=d)
        for d in run["dtypes"]
    ]
    fig.legend(handles=handles, loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(run: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Writes ``results.json``, ``results.md`` and ``results.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    paths["json"].write_text(json.dumps(run, indent=1) + "\n")
    paths["markdown"].write_text(markdown(run))
    if plot(run, out_dir / "results.png"):
        paths["plot"] = out_dir / "results.png"
    return paths
