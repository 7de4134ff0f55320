"""Review stop 9: regressions found by adversarial review (float64, against torch.func)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, vmap

import hesse
from hesse.engine import compiling

DT = torch.float64
KW = {"batched": True, "output": 0, "strategy": "structured", "create_graph": True}


def _model() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1)]
    return nn.Sequential(*layers).to(DT)


def _laplacian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    params = dict(model.named_parameters())

    def u(z: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, (z[None],))[0, 0]

    return vmap(hessian(u))(x).diagonal(dim1=-2, dim2=-1).sum(-1)


@pytest.fixture
def cheap_aot_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """compile="auto" compiles after two eager calls (AOTAutograd, no inductor) and keeps
    running the compiled program (still timing it)."""
    monkeypatch.setattr(compiling, "_LEARNED", compiling._Learned())
    monkeypatch.setattr(compiling, "SECONDS_PER_OP", 0.0)
    monkeypatch.setattr(compiling, "MIN_CALLS", 2)
    monkeypatch.setattr(compiling, "TRIALS", 1000)  # timing: every call runs compiled
    real = torch.compile

    def aot_eager(fn, **kwargs):  # hesse's own captures pass a backend: leave them be
        return real(fn, **{"backend": "aot_eager", **kwargs})

    monkeypatch.setattr(torch, "compile", aot_eager)


@pytest.mark.filterwarnings("ignore::UserWarning")  # dynamo on a non-leaf x (unfixed: reached)
def test_auto_compiled_program_then_x_requiring_grad_stays_twice_differentiable(
    cheap_aot_eager: None,
) -> None:
    """A create_graph program compiled while x did not require grad must not be used (under
    compile="auto") once x requires grad: d(lap)/dx, then d/dw of it, as torch.func."""
    model, x0 = _model(), torch.rand(5, 2, dtype=DT)
    for _ in range(10):  # x does not require grad: auto compiles the training program
        lap = hesse.laplacian(model, x0, **KW)
        torch.autograd.grad(lap.sum(), model[0].weight)
    note = hesse.plan(model, x0, "laplacian", **KW).program
    assert "compiling whole" in note, note
    x = x0.clone().requires_grad_(True)
    lap = hesse.laplacian(model, x, **KW)
    (gx,) = torch.autograd.grad(lap.sum(), x, create_graph=True)
    want = torch.autograd.grad(_laplacian(model, x).sum(), x, create_graph=True)[0]
    torch.testing.assert_close(gx, want, rtol=1e-10, atol=1e-12)
    (gw,) = torch.autograd.grad(gx.square().sum(), model[0].weight)
    (ww,) = torch.autograd.grad(want.square().sum(), model[0].weight)
    torch.testing.assert_close(gw, ww, rtol=1e-10, atol=1e-12)


class NoGradScale(nn.Module):
    """A tanh layer whose output is scaled by a function of it computed under no_grad."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(nn.Linear(3, 8), nn.Tanh())
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        with torch.no_grad():
            c = (h**2).sum(-1, keepdim=True)
        return self.head(h) * (1 + c)


def _hessians(model: nn.Module, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """``(B, m, n, n)`` by nested autograd (which respects the model's no_grad region)."""
    jac = torch.autograd.functional.jacobian

    def one(xb: torch.Tensor) -> torch.Tensor:
        def grad(z: torch.Tensor) -> torch.Tensor:
            return jac(lambda w: model(w[None])[0], z, create_graph=True)

        return jac(grad, xb, create_graph=create_graph)

    return torch.stack([one(xb) for xb in x])


@pytest.mark.parametrize("mode", ["gram", "sweep", "taylor"])
def test_no_grad_region_is_a_constant_in_every_engine_mode(mode, monkeypatch) -> None:
    from hesse.engine.cost import GraphCost

    best = GraphCost.best
    monkeypatch.setattr(GraphCost, "best", lambda self, q, m: (mode, best(self, q, m)[1]))
    model, x = NoGradScale().to(DT), torch.randn(4, 3, dtype=DT)
    want = _hessians(model, x)
    got = hesse.hessian(model, x, batched=True, strategy="structured")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if mode != "sweep":
        lap = hesse.laplacian(model, x, batched=True, strategy="structured")
        torch.testing.assert_close(lap, want.diagonal(dim1=-2, dim2=-1).sum(-1))


@pytest.mark.parametrize("mode", ["gram", "taylor"])
def test_no_grad_region_in_per_direction_values(mode, monkeypatch) -> None:
    from hesse.curvature import _directional
    from hesse.planning.problem import build_problem

    monkeypatch.setattr(_directional, "mode", lambda *args: mode)
    model, x = NoGradScale().to(DT), torch.randn(4, 3, dtype=DT)
    engine = _directional.engine_second(build_problem("test", model, x, None, True), False)
    assert engine is not None
    V = torch.randint(0, 2, (5, 4, 3), generator=torch.Generator().manual_seed(0)) * 2.0 - 1
    want = torch.einsum("kbi,bmij,kbj->bkm", V.to(DT), _hessians(model, x), V.to(DT))
    torch.testing.assert_close(engine[0](V.to(DT)), want, rtol=1e-10, atol=1e-12)


def test_no_grad_region_create_graph_gradients_to_the_weights() -> None:
    """Interpreted calls, then the derivative program's (from the third call)."""
    model = NoGradScale().to(DT)
    params = list(model.parameters())
    for call in range(5):
        x = torch.randn(4, 3, dtype=DT)
        got = hesse.laplacian(model, x, batched=True, strategy="structured", create_graph=True)
        want = _hessians(model, x, create_graph=True).diagonal(dim1=-2, dim2=-1).sum(-1)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        kw = {"allow_unused": True, "materialize_grads": True}
        grads = torch.autograd.grad(got.square().sum(), params, **kw)
        wants = torch.autograd.grad(want.square().sum(), params, **kw)
        for g, w in zip(grads, wants, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=f"call {call}")


def test_compile_timing_does_not_fire_the_callers_gradient_hooks() -> None:
    """compile="auto" times one backward of a create_graph program: a parameter's hook
    must only see the caller's own backward."""
    model, x = _model(), torch.rand(5, 2, dtype=DT)
    seen: list[torch.Tensor] = []
    model[0].weight.register_hook(seen.append)
    for _ in range(6):
        lap = hesse.laplacian(model, x, **KW)
    assert seen == []
    lap.sum().backward()
    assert len(seen) == 1


def _closure_over(model: nn.Module):
    return lambda x: model(x)


@pytest.mark.parametrize("kind", ["closure", "global", "partial"])
def test_resume_refuses_a_function_over_other_weights(kind, tmp_path) -> None:
    """A resumed run must not trust blocks computed with other weights behind a function."""
    import functools

    import hesse.io
    from hesse import errors

    first, second = _model(), _model()
    with torch.no_grad():
        second[0].weight.add_(1.0)
    x = torch.rand(4, 2, dtype=DT)
    path = tmp_path / "H.npy"

    def f_of(model: nn.Module):
        if kind == "closure":
            return _closure_over(model)
        if kind == "partial":
            return functools.partial(_apply, model)
        global _GLOBAL_MODEL
        _GLOBAL_MODEL = model
        return _through_global

    kw = {"batched": True, "progress": False}
    hesse.io.compute_to("hessian", f_of(first), x, out=path, **kw)
    with pytest.raises(errors.ResumeMismatchError, match="model"):
        hesse.io.compute_to("hessian", f_of(second), x, out=path, resume=True, **kw)
    again = hesse.io.compute_to("hessian", f_of(first), x, out=path, resume=True, **kw)
    want = vmap(hessian(lambda z: first(z[None])[0]))(x)
    torch.testing.assert_close(torch.from_numpy(np.array(again)), want, rtol=1e-10, atol=1e-12)


def _apply(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


_GLOBAL_MODEL: nn.Module | None = None


def _through_global(x: torch.Tensor) -> torch.Tensor:
    return _GLOBAL_MODEL(x)  # type: ignore[misc]


class Shifted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _model()
        self.register_buffer("shift", torch.zeros(2, dtype=DT), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x + self.shift) ** 2


def test_resume_refuses_other_non_persistent_buffers(tmp_path) -> None:
    import hesse.io
    from hesse import errors

    model, x, path = Shifted(), torch.rand(4, 2, dtype=DT), tmp_path / "H.npy"
    kw = {"batched": True, "progress": False}
    hesse.io.compute_to("hessian", model, x, out=path, **kw)
    model.shift.fill_(0.5)
    with pytest.raises(errors.ResumeMismatchError, match="model"):
        hesse.io.compute_to("hessian", model, x, out=path, resume=True, **kw)
