"""Online tuning of strategy="auto": close candidates timed on the caller's calls."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import hessian, vmap

import hesse
from hesse import _tuning

DT = torch.float64


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).to(DT)


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return vmap(hessian(lambda z: model(z[None])[0, 0]))(x)


def test_repeated_calls_settle_on_a_timed_candidate(model: nn.Module) -> None:
    x = torch.randn(32, 3, dtype=DT)
    want = _reference(model, x)
    rounds = _tuning.MAX_CANDIDATES * (_tuning.WARMUP + _tuning.TRIALS) + _tuning.WATCH
    for _ in range(rounds * (1 + _tuning.MAX_RETUNES)):  # room for one re-timing
        got = hesse.hessian(model, x, batched=True, output=0)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)  # every call is exact
    plan = hesse.plan(model, x, "hessian", batched=True, output=0)
    notes = dict(plan.estimates)
    assert notes["tuning"].startswith("settled on ")
    tuner = next(v for k, v in model_cache(model).items() if k[0] == "tune")
    assert tuner.settled and plan.strategy == tuner.best()
    rounds = _tuning.WARMUP + _tuning.TRIALS
    assert all(len(t) == rounds for t in tuner.times.values())  # no growth


def model_cache(model: nn.Module) -> dict:
    from hesse._problem import _ANALYSES

    (cache,) = _ANALYSES[model].values()
    return cache


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
    assert tuner.summary() == "timing (timed again 1x: the choice ran slower)"
    for name, ts in {"a": [3.0, 2.0, 2.0], "b": [1.0, 1.5, 1.6]}.items():
        for t in ts:
            tuner.record(name, t)
    assert tuner.settled and tuner.best() == "b"
    for t in (9.0, 9.0, 9.0):  # MAX_RETUNES reached: kept
        tuner.record("b", t)
    assert tuner.settled and tuner.retunes == _tuning.MAX_RETUNES == 1


def test_compile_and_heap_settings_are_tuned_apart(model: nn.Module) -> None:
    from hesse._problem import build_problem

    problem = build_problem("hesse.hessian", model, torch.randn(4, 3, dtype=DT), 0, True)
    key = _tuning.request_key(problem, "hessian", None, None, False)
    hesse.set_compile(True)
    try:
        assert _tuning.request_key(problem, "hessian", None, None, False) != key
    finally:
        hesse.set_compile(False)
    assert _tuning.request_key(problem, "hessian", None, None, False) == key
    if hesse.set_heap_cache("64MiB"):
        try:
            assert _tuning.request_key(problem, "hessian", None, None, False) != key
        finally:
            hesse.set_heap_cache(None)
        assert _tuning.request_key(problem, "hessian", None, None, False) == key


def test_functions_and_disabled_tuning_are_not_tuned(model: nn.Module) -> None:
    x = torch.randn(8, 3, dtype=DT)
    f = lambda z: model(z)  # noqa: E731  (plain functions are analysed afresh every call)
    for _ in range(3):
        hesse.hessian(f, x, batched=True, output=0)
    assert "tuning" not in dict(hesse.plan(f, x, "hessian", batched=True, output=0).estimates)
    hesse.set_autotune(False)
    try:
        fresh = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
        for _ in range(3):
            hesse.hessian(fresh, x, batched=True, output=0)
        assert "tuning" not in dict(hesse.plan(fresh, x, "hessian", batched=True).estimates)
    finally:
        hesse.set_autotune(True)


def test_settle_runs_until_timing_and_watch_are_over(model: nn.Module) -> None:
    x = torch.randn(16, 3, dtype=DT)

    def note() -> str:
        return dict(hesse.plan(model, x, "hessian", batched=True).estimates).get("tuning", "")

    seen: list[str] = []

    def call() -> None:
        hesse.hessian(model, x, batched=True)
        seen.append(note())

    calls = _tuning.settle(call, note)
    assert not _tuning.pending(note()) and note().startswith("settled on ")
    assert any(_tuning.WATCHING in s for s in seen)  # the watch was part of the warm-up
    rounds = _tuning.MAX_CANDIDATES * (_tuning.WARMUP + _tuning.TRIALS) + _tuning.WATCH
    tuner = next(v for k, v in model_cache(model).items() if k[0] == "tune")
    expected = len(tuner.names) * (_tuning.WARMUP + _tuning.TRIALS) + _tuning.WATCH
    assert expected <= calls <= rounds * (1 + _tuning.MAX_RETUNES)
    assert _tuning.settle(call, lambda: "", limit=5) == 1  # nothing to tune: one call
    assert _tuning.settle(call, lambda: "timing: a 1 ms", limit=3) == 3  # bounded
