"""The zoo benchmark's report: one log line per record, JSON and a markdown table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLUMNS = (
    "model",
    "mode",
    "works",
    "auto ran (here)",
    "rel. error",
    "first call auto / func (ms)",
    "settled auto / func (ms)",
    "func / auto",
    "calls to settle",
    "tuning + capture (ms)",
    "peak auto tuning / func (MB)",
    "warnings after call 1",
)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def line(rec: dict[str, Any]) -> str:
    """One progress line for the log."""
    head = f"  {rec['model']:16s} {rec['mode']:8s} {rec['status']:7s}"
    if rec["status"] != "ok":
        return f"{head} {rec['error'][:120]}"
    auto = rec.get("auto_child", {})
    return (
        f"{head} {rec['strategy']:10s} err {rec['rel_error']:.0e} settled "
        f"{_ms(rec['settled_ms'])} ms, func {_ms(rec['func_ms'])} ms "
        f"(x{rec['speedup']:.2f}); first {_ms(auto.get('first_ms'))} ms, "
        f"tuning {_ms(auto.get('tuning_ms'))} ms over {len(auto.get('calls', []))} calls"
    )


def _late_warnings(auto: dict[str, Any]) -> str:
    names = sorted({w for c in auto.get("calls", [])[1:] for w in c["warnings"]})
    return ", ".join(names) if names else "none"


def row(rec: dict[str, Any]) -> list[str]:
    """The table row of one record."""
    if rec["status"] != "ok":
        return [rec["model"], rec["mode"], f"{rec['status']}: {rec['error'][:80]}"] + ["-"] * 9
    auto, func = rec.get("auto_child", {}), rec.get("func_child", {})
    calls = len(auto.get("calls", []))
    settle = "-" if not calls else f"{calls}" + ("" if auto.get("settled") else " (not settled)")
    return [
        rec["model"],
        rec["mode"],
        "yes",
        rec["strategy"],
        f"{rec['rel_error']:.0e}",
        f"{_ms(auto.get('first_ms'))} / {_ms(func.get('first_ms'))}",
        f"{_ms(rec['settled_ms'])} / {_ms(rec['func_ms'])}",
        f"{rec['speedup']:.2f}",
        settle,
        _ms(auto.get("tuning_ms")),
        f"{_mb(auto.get('peak_mb'))} / {_mb(func.get('peak_mb'))}",
        _late_warnings(auto) if calls else "-",
    ]


def _table(header: list[str] | tuple[str, ...], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(run: dict[str, Any]) -> str:
    """The report: environment, the zoo table, the tuning records, MACE."""
    env = run["env"]
    lines = [
        "# hesse model zoo: auto against torch.func (float64)",
        "",
        f"git {env['git']}, {env['date']}, torch {env['versions']['torch']}, "
        f"{env['cpu']} ({env['cores']} cores), torch threads {env['torch_threads']}, "
        f"load average {env['load_average']} -> {env.get('load_average_end')}; "
        f"batch {run['batch']}; wall {run.get('wall_s', 0):.0f} s.",
        "",
        "First calls and peaks: a fresh process per model and mode, the library warmed on an "
        "unrelated model; peaks are above the RSS before the first call (auto: over every "
        "call until tuning is over; func: over three calls). Settled: interleaved rounds in "
        "one process, median of the best round. Tuning + capture: the calls until settled "
        "(the first included) minus as many settled calls.",
        "",
    ]
    lines += _table(COLUMNS, [row(r) for r in run["records"]])
    lines += ["", "## What auto timed (in the fresh process)", ""]
    for rec in run["records"]:
        auto = rec.get("auto_child", {})
        if auto.get("tuning") or auto.get("error"):
            text = auto.get("tuning") or f"child failed: {auto['error']}"
            lines.append(f"- {rec['model']} {rec['mode']}: {text}")
        elif rec["status"] == "ok" and auto:
            why = "not captured (planned per call)" if not auto.get("captured") else "one candidate"
            lines.append(f"- {rec['model']} {rec['mode']}: not tuned ({why})")
    refs = sorted({f"{r['model']}: {r['func_label']}" for r in run["records"] if "func_label" in r})
    lines += ["", "torch.func peers: " + "; ".join(refs) + "."]
    mace = run.get("mace")
    if mace is not None:
        lines += ["", "## MACE", ""]
        if mace.get("status") != "ok":
            lines.append(f"Not run: {mace.get('note', mace.get('error', ''))}")
        else:
            lines += _table(mace["columns"], mace["rows"])
            lines += ["", mace["note"]]
    return "\n".join(lines) + "\n"


def write(run: dict[str, Any], out: Path) -> list[Path]:
    """Writes ``results.json`` and ``results.md`` into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md"]
    paths[0].write_text(json.dumps(run, indent=1, default=str))
    paths[1].write_text(markdown(run))
    return paths
