"""Figures for `hesse compute`: peak memory under a budget, 2 processes vs 1, resume time.

Run from the repository root: ``python -m benchmarks.scale [--quick]``. Writes
``benchmarks/results/scale/results.json`` (the numbers and the machine); the prose is in
``results.md`` next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

nn = torch.nn
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "scale"


def cnn64() -> nn.Module:
    """A small CNN on 3x64x64 images (logit Hessian: 12288 x 12288 = 604 MB in float32)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Softplus(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.AvgPool2d(4),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    ).eval()


def cnn8() -> nn.Module:
    """A small CNN on 1x8x8 digits: per-sample logit Hessians (64 x 64)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.Softplus(),
        nn.Flatten(),
        nn.Linear(16 * 64, 64),
        nn.Tanh(),
        nn.Linear(64, 10),
    ).eval()


def _env(threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _hesse(*args: object) -> list[str]:
    return [sys.executable, "-m", "hesse", "compute", *map(str, args), "--quiet"]


def _watch(argv: list[str], env: dict[str, str], kill_at: tuple[Path, float] | None = None) -> dict:
    """Run ``argv``; sample its RSS (anon / file) every 50 ms; optionally SIGKILL it."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    peak_anon = peak_file = 0
    killed = False
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            peak_anon = max(peak_anon, int(fields.get("RssAnon", "0 kB").split()[0]) * 1024)
            peak_file = max(peak_file, int(fields.get("RssFile", "0 kB").split()[0]) * 1024)
        except (OSError, ValueError):
            pass
        if kill_at is not None and not killed and _fraction_done(kill_at[0]) >= kill_at[1]:
            proc.send_signal(signal.SIGKILL)
            killed = True
        time.sleep(0.05)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "rc": proc.returncode,
        "wall_s": wall,
        "stdout": out.strip(),
        "stderr": err[-500:],
        "peak_rss_anon": peak_anon,
        "peak_rss_file": peak_file,
        "children_maxrss": usage.ru_maxrss * 1024,
        "killed": killed,
    }


def _fraction_done(out: Path) -> float:
    from hesse.io import manifest as mf

    try:
        merged = mf.read_all(out)
    except Exception:
        return 0.0
    if merged is None:
        return 0.0
    return len(merged.done) / merged.config["blocks"]


def _compute_seconds(stdout: str) -> float:
    """The compute time `hesse compute` prints: '(12.3 s' or '(12.3 s, 2 processes)'."""
    return float(stdout.rsplit("(", 1)[1].split(" s")[0])


_IMPORTS = "import torch, numpy, zarr, hesse, hesse.io, hesse.compute; torch.zeros(1)"


def _warm_up(strategy: str) -> str:
    """A process that imported hesse and ran one Hessian row of ``cnn64`` (one HVP).

    Its RSS is the fixed cost every run pays whatever its budget: torch._dynamo and the
    planner load on hesse's first call, the strategy's code paths on the first HVP.
    ``max_memory`` budgets what a run needs on top of it.
    """
    return (
        _IMPORTS + "; from benchmarks.scale import cnn64; from hesse.io import hessian_rows"
        f"; hessian_rows(cnn64(), torch.randn(3, 64, 64), slice(0, 1), output=3, batched=True,"
        f" strategy={strategy!r})"
    )


def peak_memory(work: Path, sink: str, strategy: str) -> dict:
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype("float32")
    np.save(work / "img.npy", x)
    out = work / f"H{sink}"
    r = _watch(
        _hesse(
            "benchmarks.scale:cnn64",
            work / "img.npy",
            "--quantity",
            "hessian",
            "--batched",
            "--flat",
            "--output",
            "3",
            "--out",
            out,
            "--max-memory",
            "100MB",
            "--strategy",
            strategy,
        ),
        _env(),
    )
    assert r["rc"] == 0, r["stderr"]
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())["config"]
    base = _watch([sys.executable, "-c", _IMPORTS], _env())
    warm = _watch([sys.executable, "-c", _warm_up(manifest["strategy"])], _env())
    return {
        **r,
        "sink": sink,
        "result_bytes": 12288 * 12288 * 4,
        "budget_bytes": 100_000_000,
        "blocks": manifest["blocks"],
        "rows_per_block": manifest["per_block"],
        "strategy": manifest["strategy"],
        "import_rss_anon": base["peak_rss_anon"],
        "warm_rss_anon": warm["peak_rss_anon"],
        "above_import": r["peak_rss_anon"] - base["peak_rss_anon"],
        "above_warm": r["peak_rss_anon"] - warm["peak_rss_anon"],
    }


def _cnn8_args(work: Path) -> tuple:
    """``hesse compute`` arguments of the per-sample workload (8x8 CNN, logit 3)."""
    return (
        "benchmarks.scale:cnn8",
        work / "digits.npy",
        "--quantity",
        "hessian",
        "--batched",
        "--output",
        "3",
        "--block-size",
        "32",
    )


def throughput(work: Path, samples: int) -> dict:
    x = np.random.default_rng(0).standard_normal((samples, 1, 8, 8)).astype("float32")
    np.save(work / "digits.npy", x)
    args = _cnn8_args(work)
    res = {}
    for name, argv, env in [
        ("1proc_2threads", _hesse(*args, "--out", work / "t1.npy"), _env()),
        ("1proc_1thread", _hesse(*args, "--out", work / "t1b.npy"), _env(1)),
        (
            "2procs",
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                "2",
                "-m",
                "hesse",
                "compute",
                *map(str, args),
                "--out",
                str(work / "t2.npy"),
                "--quiet",
            ],
            _env(1),
        ),
    ]:
        r = _watch(argv, env)
        assert r["rc"] == 0, r["stderr"]
        res[name] = {"wall_s": r["wall_s"], "compute_s": _compute_seconds(r["stdout"])}
    same = (work / "t1.npy").read_bytes() == (work / "t2.npy").read_bytes()
    res["speedup_compute"] = res["1proc_2threads"]["compute_s"] / res["2procs"]["compute_s"]
    res["speedup_wall"] = res["1proc_2threads"]["wall_s"] / res["2procs"]["wall_s"]
    res["bytes_equal_1_vs_2"] = same
    res["samples"] = samples
    return res


def resume(work: Path) -> dict:
    args = _cnn8_args(work)
    full = _watch(_hesse(*args, "--out", work / "r_full.npy"), _env())
    out = work / "r.npy"
    killed = _watch(_hesse(*args, "--out", out), _env(), kill_at=(out, 0.5))
    frac = _fraction_done(out)
    again = _watch(_hesse(*args, "--out", out, "--resume"), _env())
    same = (work / "r_full.npy").read_bytes() == out.read_bytes()
    return {
        "full_compute_s": _compute_seconds(full["stdout"]),
        "full_wall_s": full["wall_s"],
        "killed_at_fraction": frac,
        "killed": killed["killed"],
        "resume_compute_s": _compute_seconds(again["stdout"]),
        "resume_wall_s": again["wall_s"],
        "bytes_equal": same,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", choices=["memory", "throughput", "resume"], action="append")
    p.add_argument("--sink", choices=[".npy", ".zarr"], action="append", help="memory: sinks")
    p.add_argument("--strategy", default="timed", help="memory: the strategy of the row blocks")
    p.add_argument("--samples", type=int, default=None, help="throughput: samples")
    args = p.parse_args(argv)
    parts = args.only or ["memory", "throughput", "resume"]
    results: dict = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__}}
    path = OUT / "results.json"
    if path.exists():
        results = {**json.loads(path.read_text()), **results}
    samples = args.samples or (256 if args.quick else 16384)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "memory" in parts:
            results["memory"] = [
                {**peak_memory(work, s, args.strategy), **_load()}
                for s in args.sink or (".npy", ".zarr")
            ]
        if "throughput" in parts or "resume" in parts:
            tp = {**throughput(work, samples), **_load()}
            if "throughput" in parts:
                results["throughput"] = tp
        if "resume" in parts:
            results["resume"] = {**resume(work), **_load()}
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


def _load() -> dict:
    """The load average (1, 5, 15 min) after a part: how busy the shared machine was."""
    return {"load_after": os.getloadavg()}


if __name__ == "__main__":
    raise SystemExit(main())
