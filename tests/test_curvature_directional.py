"""laplacian_estimate on the engine's Taylor mode from random directions, and its fallback.

Every engine result is compared with ``jvp`` of ``jvp`` (the path taken without the
engine) on the same draws, and with ``v^T H v`` from ``torch.func.hessian``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, vmap

import hesse
from hesse.curvature import _directional, estimators
from hesse.planning.problem import build_problem


def mlp(d: int = 24, out: int = 2, norm: str | None = None) -> nn.Module:
    torch.manual_seed(3)
    mid = {None: [], "layernorm": [nn.LayerNorm(16)], "softmax": [nn.Softmax(-1)]}[norm]
    layers = [nn.Linear(d, 16), *mid, nn.Tanh(), nn.Linear(16, 16), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(16, out)).double()


@pytest.fixture
def paths(monkeypatch):
    """Runs ``laplacian_estimate`` on the engine (asserted) and on ``jvp`` of ``jvp``."""
    used: list[bool] = []

    def spy(*args):
        second = _directional.engine_second(*args)
        used.append(second is not None)
        return second

    def run(f, x, engine: bool, seed: int = 0, **kw):
        used.clear()
        if engine:
            monkeypatch.setattr(estimators, "engine_second", spy)
        else:
            monkeypatch.setattr(estimators, "engine_second", lambda *a: None)
        g = torch.Generator().manual_seed(seed)
        est = hesse.laplacian_estimate(f, x, generator=g, **kw)
        return est, used[:]

    return run


def _vhv(f, x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``v_k^T H_bm v_k`` from torch.func: ``(B, m, K)`` for ``V`` ``(K, B, n)``."""
    jac = torch.autograd.functional.jacobian

    def hess(xb):  # (m, n, n), reverse over reverse (no vmap: a GRU has no batching rule)
        return jac(lambda z: jac(f, z, create_graph=True), xb)

    H = torch.stack([hess(xb) for xb in x])
    return torch.einsum("kbi,bmij,kbj->bmk", V, H, V)


class Product(nn.Module):
    """Two branches multiplied (the bilinear rule's Taylor coefficients)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = mlp(out=3), nn.Linear(24, 3).double()

    def forward(self, x):
        return self.a(x) * torch.sin(self.b(x))


@pytest.fixture(params=["taylor", "gram"])
def engine_mode(request, monkeypatch):
    """Forces the engine's mode (each is chosen by the cost of the call otherwise)."""
    monkeypatch.setattr(_directional, "mode", lambda *args: request.param)
    return request.param


MODES = [
    (model, mode)
    for model in ("mlp", "product", "layernorm", "softmax")
    for mode in ("taylor", "gram")
    if mode == "gram" or model not in ("layernorm", "softmax")  # no closed Taylor rule
]


def build_model(model: str) -> nn.Module:
    return Product() if model == "product" else mlp(norm=None if model == "mlp" else model)


@pytest.mark.parametrize("model", ["layernorm", "softmax"])
def test_ops_without_a_taylor_rule_choose_the_gram_form(model):
    problem = build_problem("test", build_model(model), torch.randn(5, 24), None, True)
    engine = _directional.engine_second(problem, False)
    assert engine is not None
    assert not _directional.cost(problem).taylor
    assert _directional.mode(_directional.cost(problem), problem.m, 7) == "gram"


@pytest.mark.parametrize("output", [None, 1, [1, 0]])
@pytest.mark.parametrize(("model", "forced"), MODES)
def test_per_direction_values_are_v_h_v(output, model, forced, monkeypatch):
    monkeypatch.setattr(_directional, "mode", lambda *args: forced)
    f = build_model(model)
    x = torch.randn(5, 24)
    problem = build_problem("test", f, x, output, True)
    engine = _directional.engine_second(problem, False)
    assert engine is not None
    second = engine[0]
    V = torch.randint(0, 2, (7, 5, 24), generator=torch.Generator().manual_seed(1)) * 2.0 - 1
    got = second(V)  # (B, K, m)
    want = _vhv(f, x, V)
    if output is not None:
        want = want[:, torch.as_tensor(output).reshape(-1)]
    torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "kw",
    [
        dict(batched=True, num_samples=13),
        dict(batched=True, num_samples=9, output=1),
        dict(batched=True, rtol=0.3, atol=0.02),
        dict(batched=True, num_samples=11, sigma="shared"),
        dict(batched=True, atol=0.3, sigma="per-sample"),
        dict(batched=False, num_samples=12, output=0),
    ],
    ids=["fixed", "output", "rtol", "sigma", "sigma-adaptive", "one-sample"],
)
def test_engine_estimate_equals_the_jvp_estimate(paths, kw, engine_mode):
    f = mlp(60)
    x = torch.randn(6, 60)
    if not kw["batched"]:
        x = x[0]
    if kw.get("sigma") == "shared":
        kw["sigma"] = torch.randn(60, 40)
    elif kw.get("sigma") == "per-sample":
        kw["sigma"] = torch.randn(6, 60, 40)
    new, used = paths(f, x, True, **kw)
    old, _ = paths(f, x, False, **kw)
    assert used == [True] and not new.exact and new.method == "hutchinson"
    torch.testing.assert_close(new.value, old.value, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(new.stderr, old.stderr, rtol=1e-10, atol=1e-10)
    assert torch.equal(torch.as_tensor(new.matvecs), torch.as_tensor(old.matvecs))
    assert torch.equal(torch.as_tensor(new.samples), torch.as_tensor(old.samples))


@pytest.mark.parametrize("kw", [dict(num_samples=33), dict(atol=0.3)], ids=["fixed", "atol"])
def test_passes_in_chunks_of_directions(paths, monkeypatch, kw):
    """More directions than fit in a pass: several passes, the same draws and estimate."""
    f = mlp(60)
    x = torch.randn(6, 60)
    problem = build_problem("test", f, x, None, True)
    facts = _directional.cost(problem)
    monkeypatch.setattr(_directional, "PASS_BYTES", 7 * 6 * max(facts.total_size, 60) * 8)
    assert _directional.engine_second(problem, False)[1] == 7
    new, used = paths(f, x, True, batched=True, **kw)
    old, _ = paths(f, x, False, batched=True, **kw)
    assert used == [True] and not new.exact
    torch.testing.assert_close(new.value, old.value, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(new.stderr, old.stderr, rtol=1e-10, atol=1e-10)


def test_estimate_is_the_mean_of_v_h_v(paths):
    f = mlp(out=1)
    x = torch.randn(4, 24)
    est, used = paths(f, x, True, batched=True, num_samples=23, seed=5)
    assert used == [True] and est.matvecs == 23 and est.samples == 23
    g = torch.Generator().manual_seed(5)
    V = torch.cat([torch.randint(0, 2, (k, 4, 24), generator=g) for k in (10, 10, 3)]) * 2.0 - 1
    vals = _vhv(f, x, V)  # (4, 1, 23)
    torch.testing.assert_close(est.value, vals.mean(-1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(est.stderr, vals.std(-1) / 23**0.5, rtol=1e-10, atol=1e-10)


def test_exact_switch_does_not_use_the_engine(paths):
    f = mlp(6)
    x = torch.randn(3, 6)
    est, used = paths(f, x, True, batched=True, num_samples=8)
    assert used == [] and est.exact
    torch.testing.assert_close(est.value, hesse.laplacian(f, x, batched=True))


def test_modes_by_cost():
    """Few outputs of a wide model: the Gram form; many: Taylor mode; no Taylor rule: Gram."""
    wide = nn.Sequential(nn.Linear(200, 128), nn.Tanh(), nn.Linear(128, 60)).double()
    facts = _directional.cost(build_problem("test", wide, torch.randn(3, 200), None, True))
    assert _directional.mode(facts, 1, 64) == "gram"
    assert _directional.mode(facts, 60, 64) == "taylor"
    ln = build_problem("test", mlp(norm="layernorm"), torch.randn(3, 24), None, True)
    assert _directional.mode(_directional.cost(ln), 200, 64) == "gram"


def test_layer_norm_through_the_engine(paths):
    """jvp of jvp through layer_norm is wrong in torch 2.13 (pytorch#196700); the engine's
    Gram form is right."""
    f = mlp(norm="layernorm")
    x = torch.randn(4, 24)
    est, used = paths(f, x, True, batched=True, num_samples=12)
    assert used == [True]
    g = torch.Generator().manual_seed(0)
    V = torch.cat([torch.randint(0, 2, (k, 4, 24), generator=g) for k in (10, 2)]) * 2.0 - 1
    torch.testing.assert_close(est.value, _vhv(f, x, V).mean(-1), rtol=1e-9, atol=1e-9)


def test_fallback_where_the_engine_cannot_run(paths):
    """A model the engine does not capture (a GRU): jvp of jvp, as before."""
    torch.manual_seed(0)
    gru = nn.GRU(4, 8, batch_first=True).double()

    def f(x):
        return gru(x.reshape(-1, 6, 4))[0][:, -1, :2].reshape(*x.shape[:-1], 2)

    x = torch.randn(4, 24)
    new, used = paths(f, x, True, batched=True, num_samples=12)
    old, _ = paths(f, x, False, batched=True, num_samples=12)
    assert used == [False]
    torch.testing.assert_close(new.value, old.value, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(new.stderr, old.stderr, rtol=1e-10, atol=1e-10)
    g = torch.Generator().manual_seed(0)
    V = torch.cat([torch.randint(0, 2, (k, 4, 24), generator=g) for k in (10, 2)]) * 2.0 - 1
    torch.testing.assert_close(new.value, _vhv(f, x, V).mean(-1), rtol=1e-9, atol=1e-9)


def test_fallback_when_the_engine_cannot_analyse_the_model(paths, monkeypatch):
    def broken(problem):
        raise RuntimeError("cost pass failed")

    monkeypatch.setattr(_directional, "cost", broken)
    f = mlp()
    x = torch.randn(4, 24)
    new, used = paths(f, x, True, batched=True, num_samples=12)
    monkeypatch.undo()
    old, _ = paths(f, x, False, batched=True, num_samples=12)
    assert used == [False]
    torch.testing.assert_close(new.value, old.value, rtol=1e-10, atol=1e-10)


def test_fallback_when_the_engine_fails_mid_pass(paths, monkeypatch):
    """A failure inside the pass: jvp of jvp on the same draws (the generator rewound)."""

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(_directional, "directional_pass", broken)
    f = mlp()
    x = torch.randn(4, 24)
    new, used = paths(f, x, True, batched=True, num_samples=12)
    monkeypatch.undo()
    old, _ = paths(f, x, False, batched=True, num_samples=12)
    assert used == [True]
    torch.testing.assert_close(new.value, old.value, rtol=1e-10, atol=1e-10)


def test_create_graph_gradients_match_the_jvp_path(paths, engine_mode):
    f = mlp(out=1)
    x = torch.randn(4, 24, requires_grad=True)
    params = list(f.parameters())
    grads = []
    for engine in (True, False):
        est, used = paths(f, x, engine, batched=True, num_samples=14, create_graph=True)
        assert est.value.requires_grad and used == ([True] if engine else [])
        loss = (est.value**2).mean() + est.stderr.sum()
        grads.append(
            torch.autograd.grad(loss, [x, *params], allow_unused=True, materialize_grads=True)
        )
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    # and the weights' gradient of the estimate is that of mean_k v_k^T H v_k
    est, _ = paths(f, x, True, batched=True, num_samples=14, create_graph=True, seed=9)
    got = torch.autograd.grad(est.value.sum(), params, allow_unused=True, materialize_grads=True)
    g = torch.Generator().manual_seed(9)
    V = torch.cat([torch.randint(0, 2, (k, 4, 24), generator=g) for k in (10, 4)]) * 2.0 - 1
    named = dict(f.named_parameters())

    def loss_of(p):
        H = vmap(hessian(lambda xi: functional_call(f, p, (xi,))[0]))(x.detach())
        return torch.einsum("kbi,bij,kbj->", V, H, V) / 14

    want = torch.func.grad(loss_of)(named)
    for a, (name, b) in zip(got, want.items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
