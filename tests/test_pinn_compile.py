"""``hesse.settings(compile="auto")``: derivative programs compiled when that pays.

Float64, against torch.func. One test compiles for real (inductor, a few seconds, a tiny
model); the others replace ``torch.compile`` or never reach the threshold.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, vmap

import hesse
from hesse.engine import compiling
from hesse.engine.compiling import CompiledRunner
from hesse.planning.capture import capture
from hesse.strategies.structured import PROGRAM_AFTER

DT = torch.float64
KW = {"batched": True, "output": 0, "strategy": "structured", "create_graph": True}


def _model(seed: int = 0, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
    ).to(DT)


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The Laplacian ``(B,)`` by torch.func, differentiable to the weights."""
    params = dict(model.named_parameters())

    def u(z: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, (z[None],))[0, 0]

    return vmap(hessian(u))(x).diagonal(dim1=-2, dim2=-1).sum(-1)


def _at(call: int):
    return lambda message: f"call {call}: {message}"


def _check_step(model: nn.Module, x: torch.Tensor, call: int) -> None:
    """One training step's Laplacian and its gradient to the weights, against torch.func."""
    got = hesse.laplacian(model, x, **KW)
    want = _reference(model, x)
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12, msg=_at(call))
    params = list(model.parameters())
    kw = {"allow_unused": True, "materialize_grads": True}  # the last bias: no curvature
    grads = torch.autograd.grad((got**2).mean(), params, **kw)
    wants = torch.autograd.grad((want**2).mean(), params, **kw)
    for g, w in zip(grads, wants, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=_at(call))


def _runner(model: nn.Module, x: torch.Tensor) -> CompiledRunner:
    runners = [v for v in capture(model, x).capture.facts.values() if isinstance(v, CompiledRunner)]
    assert len(runners) == 1, runners
    return runners[0]


def _note(model: nn.Module, x: torch.Tensor) -> str:
    return hesse.plan(model, x, "laplacian", **KW).program


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing learned of compiling in this process; restored afterwards."""
    monkeypatch.setattr(compiling, "_LEARNED", compiling._Learned())


@pytest.fixture
def cheap(monkeypatch: pytest.MonkeyPatch, fresh: None) -> None:
    """Compiling looks free: the rule compiles after ``MIN_CALLS`` eager calls."""
    monkeypatch.setattr(compiling, "SECONDS_PER_OP", 0.0)
    monkeypatch.setattr(compiling, "MIN_CALLS", 2)
    monkeypatch.setattr(compiling, "TRIALS", 2)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inductor's own imports
def test_auto_compiles_when_it_pays_and_stays_right(cheap: None) -> None:
    """Eager, compiled, timed, decided: every call matches torch.func, gradients too."""
    model, x = _model(), torch.rand(6, 2, dtype=DT)
    for call in range(12):
        with warnings.catch_warnings():
            warnings.simplefilter("error", hesse.HesseWarning)  # compiling must not fail
            _check_step(model, x, call)
    runner = _runner(model, x)
    assert len(runner._eager) == compiling.MIN_CALLS and len(runner._trials) == compiling.TRIALS
    pattern = (
        r"derivative program of \d+ ATen ops, (compiled whole by torch\.compile|not compiled) "
        r"\(after 2 eager calls; compiled in [\d.e+-]+ s; [\d.e+-]+ ms compiled against "
        r"[\d.e+-]+ ms eager, each with one backward\)"
    )
    assert re.fullmatch(pattern, _note(model, x)), _note(model, x)
    assert runner.compiled == ("compiled whole" in _note(model, x))
    assert len(compiling._LEARNED.seconds_per_op) == len(compiling._LEARNED.saved) == 1
    with torch.no_grad():  # the compiled program reads the weights at every call
        model[0].weight.mul_(1.25)
    _check_step(model, x, 12)


def _broken(fn, **kwargs):
    def call(*args, **kw):
        raise RuntimeError("no C++ compiler found")

    return call


def test_a_failed_compile_warns_once_and_runs_eagerly_for_that_program_only(
    cheap: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = [_model(1), _model(2, width=5)]
    x = torch.rand(5, 2, dtype=DT)
    for model in models:  # captured before torch.compile is replaced
        hesse.laplacian(model, x, **KW)
    monkeypatch.setattr(torch, "compile", _broken)
    for model in models:  # each program warns once: the failure is its own
        with pytest.warns(hesse.HesseWarning, match="no C\\+\\+ compiler found.*eagerly") as got:
            for call in range(1, 12):
                _check_step(model, x, call)
        assert len([w for w in got if issubclass(w.category, hesse.HesseWarning)]) == 1
        note = _note(model, x)
        assert note.endswith(
            "not compiled (torch.compile failed (RuntimeError: no C++ compiler found))"
        )
        assert not _runner(model, x).compiled
    assert compiling._LEARNED.seconds_per_op == []  # a failure teaches nothing


def test_forced_compile_failure_warns_once(monkeypatch: pytest.MonkeyPatch, fresh: None) -> None:
    from hesse.engine import kernels

    model, x = _model(3), torch.rand(4, 2, dtype=DT)
    hesse.laplacian(model, x, **KW)
    monkeypatch.setattr(kernels, "_COMPILED", {})  # the kernels' failures stay in this test
    monkeypatch.setattr(kernels, "_FAILED", set())
    monkeypatch.setattr(torch, "compile", _broken)
    with hesse.settings(compile=True):
        with pytest.warns(hesse.HesseWarning, match="no C\\+\\+ compiler") as got:
            for call in range(1, 8):
                _check_step(model, x, call)
        programs = [w for w in got if "derivative program failed" in str(w.message)]
        assert len(programs) == 1  # (the engine's kernels warn on their own, once each)
        assert "torch.compile failed" in _note(model, x)


def test_auto_does_not_compile_a_plan_called_a_handful_of_times(fresh: None) -> None:
    """The default: a test suite (or a short loop) never pays for inductor."""
    model, x = _model(4), torch.rand(8, 2, dtype=DT)
    calls = 12
    for call in range(calls):
        _check_step(model, x, call)
    runner = _runner(model, x)
    assert not runner.compiled and runner._trials == []
    assert len(runner._eager) == calls - PROGRAM_AFTER
    note = _note(model, x)
    pays = r"not compiled yet \(10 calls of .* pays after ~(\d+) calls at 30% saved"
    match = re.search(pays, note)
    assert match is not None, note
    assert int(match.group(1)) > 1000  # a small program: compiling pays only in long loops
    with hesse.settings(compile=False):
        for _ in range(PROGRAM_AFTER + 1):
            hesse.laplacian(model, x, **KW)
        assert _note(model, x).endswith("not compiled (settings(compile=False))")


def test_what_the_process_learned_of_compiling(fresh: None) -> None:
    assert compiling.compile_seconds(10) == 10 * compiling.SECONDS_PER_OP
    assert compiling.expected_saving() == compiling.SAVED
    compiling._learn(100, 12.0, 0.6)
    compiling._learn(50, 3.0, -2.0)  # a slower compiled program: the median, clamped
    assert compiling.compile_seconds(10) == pytest.approx(1.2)  # the slowest rate seen
    assert compiling.expected_saving() == pytest.approx(0.05)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_settings_refuse_other_compile_values(value: object) -> None:
    refused = pytest.raises(hesse.UnsupportedInputError, match="compile=True/False/'auto'")
    with refused, hesse.settings(compile=value):  # type: ignore[arg-type]
        pass


def test_auto_keeps_a_program_eager_when_x_requires_grad(cheap: None) -> None:
    """A compiled backward cannot be differentiated again: d(lap)/dx must stay differentiable."""
    model = _model(5, width=7)  # its own capture: the failed compile above is kept on its own
    x = torch.rand(5, 2, dtype=DT, requires_grad=True)
    for call in range(8):  # past the point where the cheap rule would compile
        lap = hesse.laplacian(model, x, **KW)
        (gx,) = torch.autograd.grad(lap.sum(), x, create_graph=True)
        want = torch.autograd.grad(_reference(model, x).sum(), x, create_graph=True)[0]
        torch.testing.assert_close(gx, want, rtol=1e-10, atol=1e-12, msg=_at(call))
        (gw,) = torch.autograd.grad(gx.square().sum(), model[0].weight)  # twice differentiated
        (ww,) = torch.autograd.grad(want.square().sum(), model[0].weight)
        torch.testing.assert_close(gw, ww, rtol=1e-10, atol=1e-12, msg=_at(call))
    runner = _runner(model, x)
    assert not runner.compiled and runner._trials == []
    assert "not compiled (x requires grad" in _note(model, x)
