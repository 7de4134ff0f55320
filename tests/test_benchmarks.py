"""The benchmark suite end to end on tiny cases, and its verification gate."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the `benchmarks` package

from benchmarks import peers, protocol
from benchmarks.cases import SMOKE_CASES, build, head
from benchmarks.peers.torch_peers import reference
from benchmarks.run import main

OPTIONAL = {"jax_hessian": "jax", "jax_jvp_jvp": "jax", "hessquik_bwd": "hessQuik"}
FAST = ["seed_loop", "seed_sum_trick", "func_hessian", "func_jvp_jvp", "hesse[auto]"]


def _available(names: list[str]) -> list[str]:
    return [n for n in names if n not in OPTIONAL or importlib.util.find_spec(OPTIONAL[n])]


def _scaled_reference(inst):  # a deliberately wrong method: 1.01 * the right answer
    return lambda: 1.01 * reference(inst)


def _raises(inst):
    def run():
        raise RuntimeError("boom")

    return run


@pytest.fixture(autouse=True)
def _xla_flags(monkeypatch):
    """``main`` sets XLA_FLAGS for the process; put the test process's value back after."""
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))


@pytest.fixture
def bad_methods(monkeypatch):
    peers.methods()  # load the registry, then add two bad methods for this test only
    for name, prepare in {"scaled": _scaled_reference, "raises": _raises}.items():
        monkeypatch.setitem(peers._REGISTRY, name, peers.Method(name, name, "test", prepare))


def test_tiny_run_end_to_end(tmp_path, bad_methods):
    names = [*_available([*FAST, *OPTIONAL]), "scaled", "raises"]
    argv = ["--cases", ",".join(SMOKE_CASES), "--methods", ",".join(names), "--repeats", "2"]
    assert main([*argv, "--no-memory", "--out", str(tmp_path)]) == 0

    run = json.loads((tmp_path / "results.json").read_text())
    status = {(r["case"], r["method"], r["dtype"]): r for r in run["records"]}
    for dtype in ("float32", "float64"):
        ok = status["smoke_hess", "func_hessian", dtype]
        assert ok["status"] == "ok" and ok["median_ms"] > 0 and len(ok["times_ms"]) >= 1
        assert status["smoke_hess", "hesse[auto]", dtype]["status"] == "ok"
        assert status["smoke_lap", "seed_sum_trick", dtype]["status"] == "unsupported"
        for case in SMOKE_CASES:
            wrong = status[case, "scaled", dtype]
            assert wrong["status"] == "wrong" and wrong["times_ms"] == []
            assert wrong["median_ms"] is None and wrong["rel_error"] == pytest.approx(0.01)
            error = status[case, "raises", dtype]
            assert error["status"] == "error" and "boom" in error["reason"]
    assert run["env"]["torch_threads"] == torch.get_num_threads()
    assert set(run["gemm_gflops"]) == {"float32", "float64"}
    text = (tmp_path / "results.md").read_text()
    assert "## Time, float32" in text and "| scaled |" in text and "**wrong**" in text
    auto = status["smoke_hess", "hesse[auto]", "float32"]
    assert auto["note"].startswith("auto ran ")  # what auto settled on is recorded
    func = status["smoke_hess", "func_hessian", "float32"]
    row = next(line for line in text.splitlines() if line.startswith("| `smoke_hess` |"))
    assert row.split(" | ")[1] == f"{func['median_ms'] / auto['median_ms']:.2f}x"
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "results.png").stat().st_size > 0


def test_verification_rejects_a_wrong_method(bad_methods):
    inst = build(SMOKE_CASES["smoke_hess"], torch.float64)
    ref = reference(inst)
    check = protocol.verify(peers.get("scaled"), inst, ref, inst.case.samples)
    assert check.status == "wrong" and "relative error" in check.reason
    rec = protocol.evaluate(peers.get("scaled"), inst, ref, check, protocol.Settings())
    assert rec.status == "wrong" and rec.times_ms == [] and rec.median_ms is None


def test_subbatch_verification_and_the_time_cap():
    inst = build(SMOKE_CASES["smoke_hess"], torch.float64)
    ref = reference(inst)
    small = head(inst, 2)
    assert small.x.shape[0] == 2 and small.case.result_shape == (2, 3, 3)
    method = peers.get("seed_loop")
    check = protocol.verify(method, small, ref[:2], inst.case.samples)
    assert check.status == "ok" and check.rel_error <= 1e-12 and check.first is None
    rec = protocol.evaluate(method, inst, ref, check, protocol.Settings(cap_s=0.0))
    assert rec.status == "ok" and rec.capped and len(rec.times_ms) == 1
    rec = protocol.evaluate(method, inst, ref, check, protocol.Settings(), skip="too slow")
    assert rec.status == "slow" and rec.times_ms == [] and rec.reason == "too slow"


def test_memory_child_reports_an_rss_increase():
    rec = protocol.Record("smoke_hess", "func_hessian", "float32")
    protocol.measure_memory(rec, threads=1, settings=protocol.Settings())
    assert rec.memory_mb is not None and rec.memory_mb >= 0, rec.memory_note


def test_rounds_interleave_methods_and_keep_the_least_disturbed_round(monkeypatch):
    calls: list[str] = []
    clock = iter(range(1000))  # perf_counter: +1 s per reading, unless a call adds more
    slow = {"a": [0, 0, 5, 5, 0, 0]}  # a: its second round is disturbed

    def fake(name):
        def fn():
            calls.append(name)
            extra = slow.get(name, [])
            next_extra = extra.pop(0) if extra else 0
            for _ in range(next_extra):
                next(clock)

        return fn

    monkeypatch.setattr(protocol.time, "perf_counter", lambda: float(next(clock)))
    entries = [
        protocol.Timed(protocol.Record("c", name, "float32"), fake(name), first)
        for name, first in (("a", 2.0), ("b", 2.0), ("capped", 99.0))
    ]
    settings = protocol.Settings(repeats=6, rounds=3, budget_s=100.0, cap_s=10.0)
    protocol.time_rounds(entries, settings)
    # first calls over 1 s get no second warm-up; the capped one is never called again
    assert calls == ["a", "a", "b", "b"] * 3
    a, b, capped = (e.record for e in entries)
    assert a.round_medians_ms == [1000.0, 6000.0, 1000.0] and a.median_ms == 1000.0
    assert len(a.times_ms) == 6 and a.min_ms == 1000.0
    assert capped.capped and capped.times_ms == [99000.0] and capped.median_ms == 99000.0
    assert b.median_ms == 1000.0


def test_threads_one_limits_xla_too(monkeypatch):
    """``--threads 1`` gives XLA's CPU pool one thread as well (set before jax is imported,
    inherited by subprocess peers), keeping the user's other flags."""
    from benchmarks import machine

    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x --xla_cpu_multi_thread_eigen=true")
    flags = machine.peer_thread_env(1)["XLA_FLAGS"].split()
    assert "--xla_cpu_multi_thread_eigen=false" in flags
    assert "intra_op_parallelism_threads=1" in flags
    assert "--xla_dump_to=/tmp/x" in flags  # the user's other flags are kept
    assert "--xla_cpu_multi_thread_eigen=true" not in flags
    monkeypatch.delenv("XLA_FLAGS")
    two = machine.peer_thread_env(2)["XLA_FLAGS"].split()
    assert "intra_op_parallelism_threads=2" in two and "--xla_cpu_multi_thread_eigen=true" in two
