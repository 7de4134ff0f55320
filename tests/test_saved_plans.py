"""Saved tuned plans: Plan.save and hesse.load_plan round trip, mismatches and bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import hessian, vmap

import hesse
import hesse.driver as driver

DT = torch.float64


def _model(width: int = 12) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2)).to(DT)


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return vmap(hessian(lambda z: model(z[None])[0]))(x)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, nn.Module, torch.Tensor, hesse.Plan]:
    model, x = _model(), torch.randn(5, 3, dtype=DT)
    tuned = hesse.plan(model, x, "hessian", batched=True).tune(x, rounds=2)
    path = tmp_path / "plan.json"
    tuned.save(path)
    return path, model, x, tuned


def test_round_trip_runs_the_saved_strategy_without_tuning(saved, monkeypatch) -> None:
    path, _, x, tuned = saved
    record = json.loads(path.read_text())
    assert record["strategy"] == tuned.strategy and set(record["tuning"]["times"])
    assert {"fingerprint", "parts", "chunking", "mode"} <= set(record)
    assert record["parts"]["torch"] == torch.__version__
    fresh = _model()  # another process: same structure, its own objects
    with torch.no_grad():
        fresh[0].weight.add_(0.5)  # values may differ: the computation is the real one
    runs: list[str] = []
    real = driver.run_plan

    def counting(problem, plan, *args):
        runs.append(plan.strategy)
        return real(problem, plan, *args)

    monkeypatch.setattr(driver, "run_plan", counting)
    loaded = hesse.load_plan(path, fresh, x, "hessian", batched=True)
    assert loaded.pinned and loaded.strategy == tuned.strategy
    assert loaded.tuning is not None and loaded.tuning.state == "settled"
    assert "loaded from" in str(loaded)
    x2 = torch.randn(5, 3, dtype=DT)
    for z in (x, x2, x, x2, x):
        torch.testing.assert_close(loaded(z), _reference(fresh, z), rtol=1e-10, atol=1e-12)
    assert runs == [tuned.strategy] * 5  # no other candidate was timed


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("width", "model structure"),
        ("dtype", "input shape and dtype"),
        ("shape", "input shape and dtype"),
        ("quantity", "quantity and options"),
        ("output", "quantity and options"),
    ],
)
def test_mismatch_names_what_differs(saved, change: str, named: str) -> None:
    path, model, x, _ = saved
    quantity, options = "hessian", {"batched": True}
    if change == "width":
        model = _model(13)
    elif change == "dtype":
        model, x = model.float(), x.float()
    elif change == "shape":
        x = torch.randn(7, 3, dtype=DT)
    elif change == "quantity":
        quantity = "hessian_diag"
    else:
        options["output"] = 0
    with pytest.raises(hesse.PlanMismatchError, match=named) as info:
        hesse.load_plan(path, model, x, quantity, **options)
    text = str(info.value)
    assert "hesse.load_plan" in text and "saved " in text and "now " in text
    assert "tune" in text  # the fix
    others = {"model structure", "input shape and dtype", "quantity and options"} - {named}
    if change != "dtype":  # a float32 model also changes the parameters' dtypes
        assert not any(other in text for other in others)


def test_a_version_mismatch_is_named(saved) -> None:
    path, model, x, _ = saved
    record = json.loads(path.read_text())
    record["parts"]["torch"] = "1.0.0"
    path.write_text(json.dumps(record))
    with pytest.raises(hesse.PlanMismatchError, match=r"torch version: saved '1\.0\.0'"):
        hesse.load_plan(path, model, x, "hessian", batched=True)


@pytest.mark.parametrize(
    "content",
    ["{not json", "[]", '{"format": "hesse.plan", "version": 1}', "\x00\x01", ""],
)
def test_corrupt_files_raise_a_typed_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    model, x = _model(), torch.randn(5, 3, dtype=DT)
    with pytest.raises(hesse.HesseError, match=r"hesse\.load_plan") as info:
        hesse.load_plan(path, model, x, "hessian", batched=True)
    assert isinstance(info.value, hesse.errors.FileFormatError)


def test_missing_file_and_unknown_option(tmp_path: Path, saved) -> None:
    model, x = _model(), torch.randn(5, 3, dtype=DT)
    with pytest.raises(hesse.errors.FileFormatError, match="cannot read"):
        hesse.load_plan(tmp_path / "none.json", model, x)
    with pytest.raises(TypeError, match="unknown option"):
        hesse.load_plan(saved[0], model, x, "hessian", batchd=True)


def test_a_plan_without_its_input_cannot_be_saved(saved, tmp_path: Path) -> None:
    from dataclasses import replace

    plan = replace(saved[3], input=None)
    with pytest.raises(hesse.PlanMismatchError, match=r"Plan\.save"):
        plan.save(tmp_path / "p.json")


def test_an_online_tuned_plan_round_trips(tmp_path: Path) -> None:
    model, x = _model(14), torch.randn(5, 3, dtype=DT)
    for _ in range(4):
        hesse.hessian(model, x, batched=True)
    plan = hesse.plan(model, x, "hessian", batched=True)
    assert plan.tuning is not None and plan.tuning.times  # timed on the calls
    plan.save(tmp_path / "online.json")
    loaded = hesse.load_plan(tmp_path / "online.json", model, x, "hessian", batched=True)
    assert loaded.pinned and loaded.strategy == plan.strategy
    assert dict(loaded.tuning.times) == dict(plan.tuning.times)  # type: ignore[union-attr]
    torch.testing.assert_close(loaded(x), _reference(model, x), rtol=1e-10, atol=1e-12)


def test_functions_are_fingerprinted_by_their_code(tmp_path: Path) -> None:
    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z).pow(3).sum(-1)

    def g(z: torch.Tensor) -> torch.Tensor:
        return torch.sin(z).pow(3).sum(-1)

    g.__qualname__ = f.__qualname__  # the same name: only the code tells them apart
    x = torch.randn(4, 3, dtype=DT)
    hesse.plan(f, x, "laplacian", batched=True).save(tmp_path / "f.json")
    got = hesse.load_plan(tmp_path / "f.json", f, x, "laplacian", batched=True)
    want = vmap(lambda z: torch.diagonal(hessian(f)(z)).sum())(x)
    torch.testing.assert_close(got(x), want, rtol=1e-10, atol=1e-12)
    with pytest.raises(hesse.PlanMismatchError, match="model structure"):
        hesse.load_plan(tmp_path / "f.json", g, x, "laplacian", batched=True)
