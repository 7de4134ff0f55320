"""Budgeted tuning: timing stops while it costs more than 20% of the work, slow or
over-budget candidates are never (or once) run, and every call stays exact.

The clock is fake (``hesse.driver.clock`` reads a counter that the wrapped
``run_plan`` advances by a fixed time per strategy), so the tests are deterministic.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import hessian, vmap

import hesse
import hesse.driver as driver
import hesse.front as front
from hesse.planning import tuning as _tuning

DT = torch.float64


def _tuner(**kwargs) -> _tuning.Tuner:
    tuner = _tuning.Tuner(**kwargs)
    assert (_tuning.WARMUP, _tuning.TRIALS, _tuning.SLOW) == (1, 2, 3.0)  # assumed below
    assert _tuning.OVERHEAD_FRACTION == 0.2
    return tuner


def _run(tuner: _tuning.Tuner, name: str, seconds: float) -> None:
    assert tuner.order(tuner.names)[0] == name
    tuner.record(name, seconds)


def test_a_slow_candidate_is_dropped_after_one_call() -> None:
    tuner = _tuner(names=["a", "b", "c"], costs={"a": 1.0, "b": 1.0, "c": 1.0})
    for t in (1.0, 1.0, 1.0):
        _run(tuner, "a", t)
    _run(tuner, "b", 3.5)  # > 3x the fastest (1.0): dropped at once
    assert "dropped" in tuner.skipped["b"] and tuner.times["b"] == [3.5]
    for _ in range(40):  # b never runs again, c is timed once the budget allows
        tuner.record(tuner.order(tuner.names)[0], 1.0)
    assert tuner.times["b"] == [3.5] and tuner.settled and tuner.best() != "b"
    assert "skipped b: first call 3.5 s" in str(tuner.record_of())


def test_the_twenty_percent_rule_pauses_timing_until_the_work_pays_for_it() -> None:
    tuner = _tuner(names=["a", "b"], costs={"a": 1.0, "b": 1.0})
    for t in (1.0, 1.0, 1.0):
        _run(tuner, "a", t)
    _run(tuner, "b", 2.5)  # overhead 1.5 s of 5.5 s work: over 20%
    assert tuner.overhead == pytest.approx(1.5) and tuner.work == pytest.approx(5.5)
    assert tuner.record_of().state == "paused" and "paused" in str(tuner.record_of())
    _run(tuner, "a", 1.0)  # 1.5 > 0.2 * 6.5: still paused
    assert tuner.record_of().state == "paused"
    _run(tuner, "a", 1.0)  # 1.5 <= 0.2 * 7.5: timing resumes
    _run(tuner, "b", 0.5)  # faster than a: no overhead (b is the fastest from now on)
    assert tuner.overhead == pytest.approx(1.5)
    _run(tuner, "b", 0.6)
    assert tuner.settled and tuner.best() == "b"
    assert tuner.overhead <= _tuning.OVERHEAD_FRACTION * tuner.work


def test_an_over_budget_candidate_is_never_timed() -> None:
    tuner = _tuner(names=["a", "b"], peaks={"a": 1e8, "b": 2e9}, budget=1e9)
    assert "over the budget" in tuner.skipped["b"]
    for _ in range(10):
        tuner.record(tuner.order(tuner.names)[0], 1.0)
    assert "b" not in tuner.times and tuner.best() == "a" and tuner.settled


def test_a_candidate_estimated_far_slower_is_not_timed() -> None:
    tuner = _tuner(names=["a", "b", "c"], costs={"a": 1.0, "b": 4.0, "c": 2.0})
    for t in (2.0, 1.0, 1.0):
        _run(tuner, "a", t)
    _run(tuner, "c", 1.5)  # b (estimated 4 s > 3 x 1 s) is skipped, c is timed
    assert "estimated 4 s" in tuner.skipped["b"]
    assert "b" not in tuner.times


class FakeClock:
    """A clock that advances only while ``run_plan`` runs, by a time per strategy."""

    def __init__(self, seconds: dict[str, float], default: float) -> None:
        self.now, self.seconds, self.default = 0.0, seconds, default
        self.runs: dict[str, int] = {}

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = driver.run_plan

        def run_plan(problem, plan, *args):
            self.runs[plan.strategy] = self.runs.get(plan.strategy, 0) + 1
            self.now += self.seconds.get(plan.strategy, self.default)
            return real(problem, plan, *args)

        monkeypatch.setattr(driver, "run_plan", run_plan)
        monkeypatch.setattr(driver, "clock", lambda device: self.now)


def _model(width: int) -> nn.Module:
    """A model of its own structure (tuning is kept per capture, shared by equal structures)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2)).to(DT)


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return vmap(hessian(lambda z: model(z[None])[0]))(x)


def _calls(model: nn.Module, x: torch.Tensor, count: int) -> hesse.Plan:
    want = _reference(model, x)
    for _ in range(count):  # every call exact, whichever strategy it ran
        got = hesse.hessian(model, x, batched=True)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    return hesse.plan(model, x, "hessian", batched=True)


def test_slow_candidates_run_once_and_results_stay_exact(monkeypatch) -> None:
    model, x = _model(17), torch.randn(6, 3, dtype=DT)
    first = hesse.plan(model, x, "hessian", batched=True).strategy
    clock = FakeClock({first: 1.0}, default=10.0)  # every other candidate 10x slower
    clock.install(monkeypatch)
    plan = _calls(model, x, 10)
    tuning = plan.tuning
    assert tuning is not None and plan.strategy == first
    assert sum(clock.runs.values()) == 10
    others = {name: runs for name, runs in clock.runs.items() if name != first}
    assert len(others) == 1 and set(others.values()) == {1}  # one dropped, the rest waits
    assert tuning.state == "paused"  # 9 s overhead of 19 s work
    assert tuning.overhead == pytest.approx(9.0) and tuning.work == pytest.approx(19.0)
    assert any("dropped" in why for _, why in tuning.skipped)
    assert "overhead 9 s of 19 s work" in str(plan)


def test_over_budget_candidates_never_run(monkeypatch) -> None:
    model, x = _model(19), torch.randn(6, 3, dtype=DT)
    monkeypatch.setattr(front, "_peak", lambda problem, request, name: float("inf"))
    first = hesse.plan(model, x, "hessian", batched=True).strategy  # creates the tuner
    clock = FakeClock({}, default=1.0)
    clock.install(monkeypatch)
    plan = _calls(model, x, 10)
    assert clock.runs == {first: 10}
    assert plan.tuning is not None and plan.tuning.state != "timing"
    skipped = dict(plan.tuning.skipped)
    assert skipped and all("over the budget" in why for why in skipped.values())
    assert len(skipped) == len(plan.tuning.skipped)  # named once each


def test_the_cost_model_counts_bytes_moved_as_well_as_multiply_adds() -> None:
    from hesse.engine.cost import RATES

    model, x = _model(23), torch.randn(6, 3, dtype=DT)
    plan = hesse.plan(model, x, "hessian", batched=True)
    mac_rate, byte_rate = RATES[("cpu", 8)]
    costs = dict(plan.costs)
    assert {name for name, _, _ in plan.work} == set(costs)
    for name, macs, moved in plan.work:
        assert macs > 0 and moved > 0
        assert costs[name] == pytest.approx(macs / mac_rate + moved / byte_rate)
    assert list(plan.candidates) == sorted(costs, key=costs.__getitem__)
    assert "moved" in dict(plan.estimates)[plan.strategy]


def test_calibration_fit_recovers_known_rates_and_counts_first_picks() -> None:
    from benchmarks.calibrate import fit, picks

    rng = torch.Generator().manual_seed(0)
    records = []
    for case in range(12):  # times made from known rates: the fit must find them again
        strategies = {}
        for name in ("a", "b", "c"):
            macs = float(10 ** (6 + 3 * torch.rand((), generator=rng)))
            moved = float(10 ** (6 + 3 * torch.rand((), generator=rng)))
            strategies[name] = {"macs": macs, "bytes": moved, "seconds": macs / 3e9 + moved / 2e8}
        records.append({"case": f"c{case}", "strategies": strategies, "skipped": {}})
    fitted = fit(records)
    assert fitted["mac_rate"] == pytest.approx(3e9, rel=0.07)
    assert fitted["byte_rate"] == pytest.approx(2e8, rel=0.07)
    assert fitted["rms_log_error"] < 0.05 < fitted["mac_only_rms_log_error"]
    exact = picks(records, lambda s: s["macs"] / 3e9 + s["bytes"] / 2e8)
    assert exact["accuracy"] == 1.0 and exact["mean_slowdown"] == 1.0
    by_macs = picks(records, lambda s: s["macs"])
    assert by_macs["cases"] == 12 and by_macs["mean_slowdown"] >= 1.0


def test_plan_tune_drops_slow_candidates_after_one_call(monkeypatch) -> None:
    model, x = _model(29), torch.randn(6, 3, dtype=DT)
    plan = hesse.plan(model, x, "hessian", batched=True)
    clock = FakeClock({plan.strategy: 1.0}, default=10.0)
    clock.install(monkeypatch)
    tuned = plan.tune(x, rounds=3)
    assert tuned.strategy == plan.strategy and tuned.tuning is not None
    others = [name for name in plan.candidates if name != plan.strategy]
    assert clock.runs == {plan.strategy: 3, **dict.fromkeys(others, 1)}
    assert {name for name, _ in tuned.tuning.skipped} == set(others)
    assert all("dropped" in why for _, why in tuned.tuning.skipped)
    torch.testing.assert_close(tuned(x), _reference(model, x), rtol=1e-10, atol=1e-12)


def test_the_replayed_tuning_cost_drops_slow_candidates() -> None:
    from benchmarks.calibrate import simulate

    def s(macs: float, seconds: float) -> dict:
        return {"macs": macs, "bytes": 0.0, "seconds": seconds}

    record = {"case": "c", "strategies": {"a": s(1e6, 1.0), "b": s(2e6, 10.0)}, "skipped": {}}
    out = simulate([record], calls=10, rates=(1e6, 1e9))["c"]
    assert out["before_extra_s"] == pytest.approx(27.0)  # b: three calls of 10 s
    assert out["after_extra_s"] == pytest.approx(9.0)  # b: one call, then dropped
    assert "dropped" in out["after_skipped"]["b"]
