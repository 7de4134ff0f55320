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
    for _ in range(2 * _tuning.MAX_CANDIDATES * (_tuning.WARMUP + _tuning.TRIALS)):
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
