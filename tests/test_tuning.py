"""Online tuning of strategy="auto": close candidates timed on the caller's calls."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import hessian, vmap

import hesse
from hesse.planning import tuning as _tuning

DT = torch.float64


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).to(DT)


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return vmap(hessian(lambda z: model(z[None])[0, 0]))(x)


def test_repeated_calls_settle_on_a_timed_candidate(model: nn.Module, monkeypatch) -> None:
    monkeypatch.setattr(_tuning, "OVERHEAD_FRACTION", 1e9)  # the budget: test_tuning_budget
    x = torch.randn(32, 3, dtype=DT)
    want = _reference(model, x)
    for _ in range(64):  # room for one re-timing, and for pauses of the 20% rule
        got = hesse.hessian(model, x, batched=True, output=0)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)  # every call is exact
        plan = hesse.plan(model, x, "hessian", batched=True, output=0)
        if plan.tuning is not None and not plan.tuning.pending:
            break
    assert plan.tuning is not None and plan.tuning.state == "settled"
    assert str(plan.tuning).startswith("settled on ")
    assert plan.strategy == plan.tuning.best
    counted, dropped = _tuning.TRIALS, dict(plan.tuning.skipped)  # dropped: one call
    assert all(len(t) == counted for name, t in plan.tuning.times if name not in dropped)


def test_tuner_rotates_then_keeps_the_fastest() -> None:
    tuner = _tuning.Tuner(["a", "b"])
    assert (_tuning.WARMUP, _tuning.TRIALS) == (1, 2)  # the sequence below assumes these
    assert tuner.order(["a", "b", "c"])[0] == "a"
    tuner.record("a", 9.0)  # warm-up call: not counted
    assert tuner.order(["a", "b", "c"])[0] == "a"  # one candidate after the other
    tuner.record("a", 2.0)
    tuner.record("a", 3.0)
    assert tuner.order(["a", "b", "c"])[0] == "b"
    tuner.record("b", 0.5)
    tuner.record("b", 1.0)
    assert not tuner.settled
    tuner.record("b", 5.0)
    assert tuner.settled and tuner.best() == "b"  # the shortest counted call: 1.0 < 2.0
    assert tuner.order(["a", "b", "c"]) == ("b", "a", "c")
    tuner.record("a", 0.1)  # settled: no more timings
    assert tuner.best() == "b"
    tuner.drop("b")
    assert tuner.names == ["a"]


def _settled(times: dict[str, list[float]]) -> _tuning.Tuner:
    tuner = _tuning.Tuner(list(times))
    for name, ts in times.items():
        for t in ts:
            tuner.record(name, t)
    assert tuner.settled
    return tuner


def test_a_choice_as_fast_as_timed_is_kept() -> None:
    tuner = _settled({"a": [9.0, 2.0, 3.0], "b": [5.0, 1.0, 1.2]})
    for t in (1.2, 1.4, 1.1):  # median 1.2 <= RETUNE x 1.0
        tuner.record("b", t)
    assert tuner.settled and not tuner.watching() and tuner.retunes == 0
    assert tuner.best() == "b" and len(tuner.times["b"]) == 3
    tuner.record("b", 50.0)  # the watch is over: drift after it changes nothing
    assert tuner.settled and tuner.best() == "b"


def test_a_choice_slower_than_timed_is_timed_again_once() -> None:
    tuner = _settled({"a": [9.0, 2.0, 3.0], "b": [5.0, 1.0, 1.2]})
    tuner.record("a", 0.1)  # not the choice: ignored
    for t in (2.0, 1.0, 2.5):  # median 2.0 > RETUNE x 1.0
        tuner.record("b", t)
    assert not tuner.settled and tuner.retunes == 1 and tuner.times == {}
    assert tuner.order(["a", "b"])[0] == "a"  # candidates timed again from the first
    assert str(tuner.record_of()).startswith("timing (timed again 1x: the choice ran slower)")
    for name, ts in {"a": [3.0, 2.0, 2.0], "b": [1.0, 1.5, 1.6]}.items():
        for t in ts:
            tuner.record(name, t)
    assert tuner.settled and tuner.best() == "b"
    for t in (9.0, 9.0, 9.0):  # MAX_RETUNES reached: kept
        tuner.record("b", t)
    assert tuner.settled and tuner.retunes == _tuning.MAX_RETUNES == 1


def test_compile_setting_is_tuned_apart(model: nn.Module) -> None:
    x = torch.randn(4, 3, dtype=DT)
    for _ in range(2):
        hesse.hessian(model, x, batched=True, output=0)
    before = hesse.plan(model, x, "hessian", batched=True, output=0).tuning
    with hesse.settings(compile=True):
        fresh = hesse.plan(model, x, "hessian", batched=True, output=0).tuning
    assert before is not None and fresh is not None
    assert sum(len(t) for _, t in before.times) > 0 or before.state == "timing"
    assert fresh.times == ()  # a tuner of its own, nothing timed yet


def test_uncaptured_models_and_disabled_tuning_are_not_tuned(model: nn.Module) -> None:
    x = torch.randn(8, 3, dtype=DT)

    def f(z: torch.Tensor) -> torch.Tensor:
        return model(z) * (1.0 if float(z.detach().sum()) > -1e9 else 2.0)  # a graph break

    for _ in range(3):
        hesse.hessian(f, x, batched=True, output=0)
    plan = hesse.plan(f, x, "hessian", batched=True, output=0)
    assert plan.tuning is None and not plan.captured
    with hesse.settings(autotune=False):
        fresh = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
        for _ in range(3):
            hesse.hessian(fresh, x, batched=True, output=0)
        assert hesse.plan(fresh, x, "hessian", batched=True).tuning is None


def test_settle_runs_until_timing_and_watch_are_over(model: nn.Module) -> None:
    x = torch.randn(16, 3, dtype=DT)

    def record() -> hesse.Tuning | None:
        return hesse.plan(model, x, "hessian", batched=True).tuning

    def pending() -> bool:
        current = record()
        return current is not None and current.pending

    seen: list[str] = []

    def call() -> None:
        hesse.hessian(model, x, batched=True)
        seen.append(record().state)  # type: ignore[union-attr]

    calls = _tuning.settle(call, pending)
    assert not pending() and record().state == "settled"  # type: ignore[union-attr]
    assert "watching" in seen  # the watch was part of the warm-up
    names = len(record().times)  # type: ignore[union-attr]
    expected = names * (_tuning.WARMUP + _tuning.TRIALS) + _tuning.WATCH
    # the 20% rule may pause timing for a few calls of the fastest: bounded by the limit
    assert expected <= calls < 64
    assert _tuning.settle(call, lambda: False, limit=5) == 1  # nothing to tune: one call
    assert _tuning.settle(call, lambda: True, limit=3) == 3  # bounded


def test_plan_tune_pins_the_fastest(model: nn.Module) -> None:
    x = torch.randn(8, 3, dtype=DT)
    plan = hesse.plan(model, x, "hessian", batched=True, output=0, strategy="auto")
    tuned = plan.tune(x, rounds=2)
    assert tuned.pinned and tuned.tuning is not None and tuned.tuning.state == "settled"
    assert tuned.strategy == tuned.tuning.best
    assert {name for name, _ in tuned.tuning.times} <= set(plan.candidates)
    torch.testing.assert_close(tuned(x), _reference(model, x), rtol=1e-10, atol=1e-12)
    # the model changes: the pinned plan plans again and stays right
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    torch.testing.assert_close(tuned(x), _reference(model, x), rtol=1e-10, atol=1e-12)
    model[1] = nn.Sigmoid()
    torch.testing.assert_close(tuned(x), _reference(model, x), rtol=1e-10, atol=1e-12)
