"""Adversarial suite of issue 9, part 4 (category 12): ``max_memory`` is a bound.

Each measurement runs in a fresh Python process (one per strategy), so that other tests'
memory plays no part: it builds a small CNN, makes one warm-up hesse call on a tiny input
(imports, lazy initialisation and caches are not the budget's), runs a forward pass on
the measured input, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``) and
reads ``VmHWM`` after the call. The call passes if it raises ``MemoryBudgetError`` having
allocated (almost) nothing, or if its result is right (diagonal entries spot-checked by
double backward, the Laplacian against the trace of the diagonal) and the peak rose by at
most the budget plus ``SLACK_MB``.

The second test asks for a Laplacian of a 3x224x224 image in 200 MB. Forming ``H`` would
need 180 GB in float64; the child runs under an address-space limit so that an attempt fails
instead of swapping the machine, and the parent watches the child's RSS and stops it after
``DEADLINE_S``. Passing: ``MemoryBudgetError``, or a run (finished or still going at the
deadline) whose peak stayed within budget plus slack.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trust_cases import ALL

SLACK_MB = 150
DEADLINE_S = 15.0
SRC = str(Path(__file__).resolve().parents[1] / "src")

PRELUDE = r"""
import gc, json, resource, sys, time, warnings
import torch
from torch import nn
import hesse

warnings.simplefilter("ignore")
torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)
torch.manual_seed(0)

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return None

def reset_peak():
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")

cnn = nn.Sequential(
    nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1), nn.Tanh(),
    nn.AdaptiveAvgPool2d(4), nn.Flatten(-3), nn.Linear(64, 10),
)
"""

MEASURE = (
    PRELUDE
    + r"""
side, budget, strategies = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
for strategy in strategies:  # warm-up on a tiny image
    for q in ("hessian_diag", "laplacian"):
        getattr(hesse, q)(cnn, torch.randn(3, 6, 6), output=0, strategy=strategy)
x = torch.randn(3, side, side)
z = x.clone().requires_grad_(True)
(g,) = torch.autograd.grad(cnn(z).reshape(-1)[0], z, create_graph=True)
spots = torch.randperm(x.numel())[:6].tolist()
want = [float(torch.autograd.grad(g.reshape(-1)[i], z, retain_graph=True)[0].reshape(-1)[i])
        for i in spots]
del z, g
reports = {}
for strategy in strategies:
    report = reports[strategy] = {}
    for q in ("hessian_diag", "laplacian"):
        with torch.no_grad():
            cnn(x)
        gc.collect()
        base = status("VmRSS")
        reset_peak()
        t0 = time.perf_counter()
        try:
            got = getattr(hesse, q)(cnn, x, output=0, strategy=strategy, max_memory=budget)
            outcome = "result"
        except hesse.MemoryBudgetError as err:
            got, outcome = None, "MemoryBudgetError"
        except Exception as err:
            got, outcome = None, f"{type(err).__name__}: {str(err)[:200]}"
        peak = status("VmHWM")
        report[q] = {"outcome": outcome, "rise_mb": peak - base, "s": time.perf_counter() - t0}
        if got is None:
            continue
        report[q]["shape"] = list(got.shape)
        flat = got.detach().reshape(-1)
        if q == "laplacian":
            report[q]["value"] = flat.tolist()
        else:
            report[q]["spot"] = [(float(flat[i]), w) for i, w in zip(spots, want)]
            report[q]["trace"] = float(flat.sum())
        del got, flat
print(json.dumps(reports))
"""
)


def _run(code: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )


SIDE, BUDGET_MB = 32, 50


@pytest.fixture(scope="module")
def cnn_reports() -> dict:
    """One child measures every strategy (one import of torch, not five)."""
    proc = _run(MEASURE, str(SIDE), f"{BUDGET_MB}MB", *ALL, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ALL)
def test_budget_holds_on_a_cnn(cnn_reports: dict, strategy: str) -> None:
    """hessian_diag and laplacian of a CNN logit over a 3x32x32 image (n=3072; H alone is
    75 MB) with max_memory="50MB": right and within 50 MB + SLACK_MB, or
    MemoryBudgetError before allocating."""
    report = cnn_reports[strategy]
    for q, r in report.items():
        label = f"{q} ({strategy}): {r['outcome']}, peak rise {r['rise_mb']:.0f} MB"
        if r["outcome"] == "MemoryBudgetError":
            assert r["rise_mb"] <= SLACK_MB, f"{label}: allocated before refusing"
            continue
        assert r["outcome"] == "result", label
        assert r["rise_mb"] <= BUDGET_MB + SLACK_MB, f"{label} > budget {BUDGET_MB} + slack"
    diag, lap = report["hessian_diag"], report["laplacian"]
    if diag["outcome"] == "result":
        assert diag["shape"] == [3, SIDE, SIDE]
        for got, want in diag["spot"]:
            assert abs(got - want) <= 1e-9 * max(1.0, abs(want)), diag["spot"]
    if lap["outcome"] == "result":
        assert lap["shape"] == []
        if diag["outcome"] == "result":
            (value,) = lap["value"]
            assert abs(value - diag["trace"]) <= 1e-9 * max(1.0, abs(value)), (value, diag)


HUGE = (
    PRELUDE
    + r"""
strategy = sys.argv[1]
getattr(hesse, "laplacian")(cnn, torch.randn(3, 6, 6), output=0, strategy=strategy)
x = torch.randn(3, 224, 224)
with torch.no_grad():
    cnn(x)
gc.collect()
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
limit = int((status("VmSize") + 2048) * 2**20)  # 2 GB of address space above now
resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
print(json.dumps({"base_mb": status("VmRSS")}), flush=True)
t0 = time.perf_counter()
try:
    hesse.laplacian(cnn, x, output=0, strategy=strategy, max_memory="200MB")
    outcome = "result"
except hesse.MemoryBudgetError:
    outcome = "MemoryBudgetError"
except Exception as err:
    outcome = f"{type(err).__name__}: {str(err)[:200]}"
print(json.dumps({"outcome": outcome, "s": time.perf_counter() - t0}), flush=True)
"""
)


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@pytest.mark.slow
def test_laplacian_of_a_large_image_never_forms_h() -> None:
    """``laplacian(cnn, 3x224x224, max_memory="200MB")``: MemoryBudgetError, or a run that
    stays within 200 MB + SLACK_MB (stopped at DEADLINE_S if still going) - never an
    attempt to allocate H (RuntimeError from the allocator, or RSS past the bound)."""
    budget_mb = 200
    proc = subprocess.Popen(
        [sys.executable, "-c", HUGE, "auto"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    try:
        first = proc.stdout.readline()
        assert first, proc.stderr.read()[-2000:]
        base = json.loads(first)["base_mb"]
        peak, start = base, time.perf_counter()
        while proc.poll() is None and time.perf_counter() - start < DEADLINE_S:
            peak = max(peak, _rss_mb(proc.pid) or peak)
            assert peak - base <= budget_mb + SLACK_MB, f"RSS rose by {peak - base:.0f} MB"
            time.sleep(0.02)
        running = proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate()
    if running:
        return  # still computing within the bound after DEADLINE_S: chunked, H not formed
    assert proc.returncode == 0, err[-2000:]
    outcome = json.loads(out.strip().splitlines()[-1])["outcome"]
    assert outcome in ("MemoryBudgetError", "result"), outcome
