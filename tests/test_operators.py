"""hesse.second_order_operator and hesse.mixed_partials against per-sample Hessians."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian as af_hessian
from torch.func import functional_call, jacfwd, jacrev, vmap

import hesse

D, B, M = 4, 5, 3


def mlp(d: int = D, m: int = M, act: type[nn.Module] = nn.Tanh) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(d, 16), act(), nn.Linear(16, 16), nn.Softplus(), nn.Linear(16, m)
    )


def hessians(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(B, m, d, d)`` by torch.autograd.functional.hessian, one sample and output at a time."""
    m = model(x[:1]).shape[1]
    return torch.stack(
        [
            torch.stack([af_hessian(lambda z, k=k: model(z[None])[0, k], xs) for k in range(m)])
            for xs in x
        ]
    )


def grads(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(B, m, d)`` per-sample Jacobians."""
    return vmap(jacrev(lambda z: model(z[None])[0]))(x)


@pytest.fixture
def setup():
    model = mlp()
    x = torch.randn(B, D)
    return model, x, hessians(model, x)


# --------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------


def test_shared_coefficients_and_default_laplacian(setup):
    model, x, h = setup
    c = torch.randn(D, D)
    got = hesse.second_order_operator(model, x, coefficients=c, batched=True)
    torch.testing.assert_close(got, torch.einsum("ij,bkij->bk", c, h))
    lap = hesse.second_order_operator(model, x, batched=True)
    torch.testing.assert_close(lap, h.diagonal(0, -2, -1).sum(-1))
    diag = torch.diag(torch.tensor([1.0, 0.0, 3.0, 0.5]))  # diagonal, rank-deficient
    got = hesse.second_order_operator(model, x, coefficients=diag, batched=True, output=1)
    torch.testing.assert_close(got, torch.einsum("ij,bij->b", diag, h[:, 1]))


def test_per_sample_coefficients_factor_and_drift(setup):
    model, x, h = setup
    c = torch.randn(B, D, D)
    got = hesse.second_order_operator(model, x, coefficients=c, batched=True)
    torch.testing.assert_close(got, torch.einsum("bij,bkij->bk", c, h))
    s = torch.randn(D, 2)  # shared rank-2 factor
    got = hesse.second_order_operator(model, x, factor=s, batched=True)
    torch.testing.assert_close(got, torch.einsum("ij,bkij->bk", s @ s.T, h))
    sb = torch.randn(B, D, 3)  # per-sample factor, shared drift
    bvec = torch.randn(D)
    got = hesse.second_order_operator(model, x, factor=sb, drift=bvec, batched=True)
    want = torch.einsum("bij,bkij->bk", sb @ sb.mT, h) + grads(model, x) @ bvec
    torch.testing.assert_close(got, want)
    bb = torch.randn(B, D)  # shared C, per-sample drift
    got = hesse.second_order_operator(model, x, coefficients=c[0], drift=bb, batched=True)
    want = torch.einsum("ij,bkij->bk", c[0], h) + torch.einsum("bkd,bd->bk", grads(model, x), bb)
    torch.testing.assert_close(got, want)


def test_single_input_and_output_selection(setup):
    model, x, h = setup
    c = torch.randn(D, D)
    f = lambda z: model(z[None])[0]  # noqa: E731  (S = (D,) -> (M,))
    got = hesse.second_order_operator(f, x[2], coefficients=c, drift=torch.ones(D), output=2)
    want = torch.einsum("ij,ij->", c, h[2, 2]) + grads(model, x)[2, 2].sum()
    assert got.shape == ()
    torch.testing.assert_close(got, want)
    got = hesse.second_order_operator(model, x, coefficients=c, output=[0, 2], batched=True)
    assert got.shape == (B, 2)


def test_image_shaped_input_and_vector_output():
    torch.manual_seed(3)
    f = lambda z: torch.stack([torch.sin(z).sum(), (z**3).sum() * z[0, 1]])  # noqa: E731
    x = torch.randn(2, 3)
    s = torch.randn(6, 2)
    h = torch.stack(
        [af_hessian(lambda z, k=k: f(z.reshape(2, 3))[k], x.reshape(-1)) for k in (0, 1)]
    )
    got = hesse.second_order_operator(f, x, factor=s)
    assert got.shape == (2,)
    torch.testing.assert_close(got, torch.einsum("ij,kij->k", s @ s.T, h))


@pytest.mark.parametrize("mode", ["taylor", "hvp", "reverse"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_directional_derivatives_modes(setup, mode, per_sample):
    from hesse.operators import _directional_derivatives

    model, x, h = setup
    dirs = torch.randn(B, 3, D) if per_sample else torch.randn(3, D)
    first, second = _directional_derivatives(model, x, dirs, mode=mode)
    assert first.shape == second.shape == (3, B, M)
    s = dirs if per_sample else dirs.expand(B, 3, D)
    torch.testing.assert_close(second, torch.einsum("bri,bkij,brj->rbk", s, h, s))
    torch.testing.assert_close(first, torch.einsum("bki,bri->rbk", grads(model, x), s))


def test_mixed_partials(setup):
    model, x, h = setup
    pairs = [(0, 1), (1, 0), (2, 2), (3, 1), (-1, 0)]
    got = hesse.mixed_partials(model, x, pairs, batched=True)
    assert got.shape == (B, M, len(pairs))
    want = torch.stack([h[..., i % D, j % D] for i, j in pairs], -1)
    torch.testing.assert_close(got, want)
    got = hesse.mixed_partials(model, x[0], torch.tensor([[0, 3]]), output=1)
    torch.testing.assert_close(got, h[0, 1, 0, 3][None])


def test_linear_model_gives_zeros_and_drift():
    lin = nn.Linear(D, 2)
    x = torch.randn(B, D)
    b = torch.randn(D)
    got = hesse.second_order_operator(lin, x, drift=b, batched=True)
    torch.testing.assert_close(got, (lin.weight @ b).expand(B, 2))


# --------------------------------------------------------------------------------------
# Gradients (create_graph=True) against torch.func
# --------------------------------------------------------------------------------------


def _func_operator(model, params, x, c, bvec, outer=jacfwd):
    """``sum C_ij H_ij + b . grad u`` per sample by nested jacfwd/jacrev, for autograd."""

    def u(p, z):
        return functional_call(model, p, (z[None],))[0]

    h = vmap(outer(jacrev(u, argnums=1), argnums=1), in_dims=(None, 0))(params, x)
    g = vmap(jacrev(u, argnums=1), in_dims=(None, 0))(params, x)
    return torch.einsum("ij,bkij->bk", c, h) + g @ bvec


def test_create_graph_gradients_to_weights_and_input(setup):
    model, x, _ = setup
    c, bvec = torch.randn(D, D), torch.randn(D)
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())

    xg = x.clone().requires_grad_(True)
    got = hesse.second_order_operator(
        model, xg, coefficients=c, drift=bvec, batched=True, create_graph=True
    )
    assert got.requires_grad
    loss = (got**2).sum()
    g_got = torch.autograd.grad(loss, [xg, *params.values()], allow_unused=True)

    xr = x.clone().requires_grad_(True)
    want = _func_operator(model, params, xr, c, bvec)
    torch.testing.assert_close(got.detach(), want.detach())
    g_want = torch.autograd.grad((want**2).sum(), [xr, *params.values()], allow_unused=True)
    assert g_got[-1] is None and g_want[-1] is None  # the last bias drops out
    for name, a, b in zip(["x", *names[:-1]], g_got, g_want, strict=False):
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"{n}: {m}")
    for p in model.parameters():
        assert p.grad is None


def test_create_graph_mixed_partials_and_factor_gradient(setup):
    model, x, h = setup
    s = torch.randn(D, 2, requires_grad=True)
    got = hesse.second_order_operator(model, x, factor=s, batched=True, create_graph=True)
    (gs,) = torch.autograd.grad(got.sum(), s)
    torch.testing.assert_close(gs, 2 * torch.einsum("bkij,jr->ir", h, s.detach()))
    w = model[0].weight
    mp = hesse.mixed_partials(model, x, [(0, 1)], batched=True, create_graph=True)
    (gw,) = torch.autograd.grad(mp.sum(), w)
    params = dict(model.named_parameters())
    e = torch.zeros(D, D)
    e[0, 1] = e[1, 0] = 0.5
    want = _func_operator(model, params, x, e, torch.zeros(D)).sum()
    torch.testing.assert_close(gw, torch.autograd.grad(want, params["0.weight"])[0])


def test_no_graph_results_are_detached(setup):
    model, x, _ = setup
    got = hesse.second_order_operator(model, x.requires_grad_(True), batched=True)
    assert not got.requires_grad and x.grad is None
    assert not hesse.mixed_partials(model, x, [(0, 1)], batched=True).requires_grad


# --------------------------------------------------------------------------------------
# Fallback for layer_norm (forward-over-forward is wrong there, pytorch#196700)
# --------------------------------------------------------------------------------------


def test_layer_norm_falls_back_to_double_backward():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(D, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 2))
    with torch.no_grad():
        model[1].weight.add_(torch.randn(8))
    x = torch.randn(B, D)
    c, h = torch.randn(D, D), hessians(model, x)
    with pytest.warns(hesse.FallbackWarning, match="layer_norm.*196700"):
        got = hesse.second_order_operator(
            model, x, coefficients=c, drift=torch.ones(D), batched=True
        )
    want = torch.einsum("ij,bkij->bk", c, h) + grads(model, x).sum(-1)
    torch.testing.assert_close(got, want)
    xg = x.clone().requires_grad_(True)
    with pytest.warns(hesse.FallbackWarning):
        mp = hesse.mixed_partials(model, xg, [(0, 2)], batched=True, create_graph=True)
    torch.testing.assert_close(mp.detach(), h[..., 0, 2, None])
    (gx,) = torch.autograd.grad(mp.sum(), xg)
    e = torch.zeros(D, D)
    e[0, 2] = e[2, 0] = 0.5
    xr = x.clone().requires_grad_(True)
    # reverse-over-reverse reference: forward mode through layer_norm is the suspect
    want = _func_operator(model, dict(model.named_parameters()), xr, e, torch.zeros(D), jacrev)
    torch.testing.assert_close(gx, torch.autograd.grad(want.sum(), xr)[0])


def test_no_fallback_warning_for_plain_models(setup):
    model, x, _ = setup
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hesse.second_order_operator(model, x, batched=True)


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"coefficients": torch.eye(3)},
            r"operator: expected coefficients of shape \(4, 4\) or \(5, 4, 4\).*\(3, 3\)",
        ),
        ({"coefficients": torch.eye(4), "factor": torch.eye(4)}, "both coefficients= and factor="),
        ({"factor": torch.ones(3, 2)}, r"expected factor of shape \(4, 2\) or \(5, 4, 2\)"),
        ({"drift": torch.ones(5, 3)}, r"expected drift of shape \(4,\) or \(5, 4\)"),
        ({"drift": [1.0, 2.0]}, "expected drift to be a real floating tensor"),
        ({"coefficients": torch.eye(4, dtype=torch.long)}, "dtype torch.int64"),
        ({"batched": 1}, "expected batched to be True or False"),
    ],
)
def test_operator_errors(setup, kwargs, match):
    model, x, _ = setup
    kwargs = {"batched": True} | kwargs
    with pytest.raises(hesse.UnsupportedInputError, match=match):
        hesse.second_order_operator(model, x, **kwargs)


def test_operator_errors_more(setup):
    model, x, _ = setup
    with pytest.raises(hesse.UnsupportedInputError, match="per-sample forms need batched=True"):
        hesse.second_order_operator(model, x[0], coefficients=torch.eye(4).expand(5, 4, 4))
    with pytest.raises(hesse.NonFiniteError, match="coefficients holds NaN"):
        hesse.second_order_operator(
            model, x, coefficients=torch.full((4, 4), float("nan")), batched=True
        )
    c = torch.eye(4, requires_grad=True)
    with pytest.raises(
        hesse.UnsupportedInputError, match=r"gradients to C are not supported.*factor="
    ):
        hesse.second_order_operator(model, x, coefficients=c, batched=True, create_graph=True)
    with pytest.raises(hesse.OutputSelectionError):
        hesse.second_order_operator(model, x, batched=True, output=7)


@pytest.mark.parametrize(
    ("pairs", "match"),
    [
        ([], "non-empty list of"),
        ([(0, 4)], r"pair \(0, 4\) is out of range.*n=4"),
        ([(0, 1, 2)], "int pairs"),
        (torch.zeros(2, 3, dtype=torch.long), r"\(P, 2\) integer tensor"),
        ([(0.5, 1)], "int pairs"),
    ],
)
def test_mixed_partials_errors(setup, pairs, match):
    model, x, _ = setup
    with pytest.raises(hesse.UnsupportedInputError, match=r"hesse\.mixed_partials: .*" + match):
        hesse.mixed_partials(model, x, pairs, batched=True)


class _Cube(torch.autograd.Function):
    """x^3 with a backward only (no forward-mode rule, no vmap rule)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


def test_ops_without_forward_mode_fall_back():
    x = torch.randn(B, 3)
    f = lambda z: _Cube.apply(z).sum(-1, keepdim=True)  # noqa: E731
    with pytest.warns(hesse.FallbackWarning, match="forward-mode AD failed"):
        got = hesse.mixed_partials(f, x, [(0, 0), (0, 1)], batched=True, output=0)
    torch.testing.assert_close(got, torch.stack([6 * x[:, 0], torch.zeros(B)], -1))


def test_one_output_linear_model_uses_the_gradient_path():
    lin = nn.Linear(D, 1)
    x = torch.randn(B, D)
    got = hesse.second_order_operator(lin, x, coefficients=torch.randn(D, D), batched=True)
    torch.testing.assert_close(got, torch.zeros(B, 1))
