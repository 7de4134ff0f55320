"""create_graph=True through normalisations: torch's forward-mode AD is wrong at third order.

d/dx of a Laplacian through ``layer_norm`` by forward-over-reverse (torch.func's
``jacfwd(jacrev)``, hesse's ``vmap`` and the engine's generic rule) is off by O(1) in torch
2.13, while the Hessian itself is right. The reference here is reverse-over-reverse.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import jacrev, vmap

import hesse


def _model() -> nn.Module:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 1))
    with torch.no_grad():
        model[1].weight.add_(torch.randn(8))
    return model


def _reference(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Laplacian and d(sum Laplacian)/dx by reverse-over-reverse-over-reverse."""
    xr = x.clone().requires_grad_(True)
    h = vmap(jacrev(jacrev(lambda z: model(z[None])[0, 0])))(xr)
    lap = h.diagonal(dim1=-2, dim2=-1).sum(-1)
    (grad,) = torch.autograd.grad(lap.sum(), xr)
    return lap.detach(), grad


@pytest.mark.parametrize("strategy", ["auto", "reverse", "loop"])
def test_gradient_of_a_laplacian_through_layer_norm(strategy: str) -> None:
    model, x = _model(), torch.randn(5, 4)
    want_lap, want_grad = _reference(model, x)
    xg = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hesse.FallbackWarning)
        lap = hesse.laplacian(
            model, xg, batched=True, output=0, strategy=strategy, create_graph=True
        )
    (grad,) = torch.autograd.grad(lap.sum(), xg)
    torch.testing.assert_close(lap.detach(), want_lap, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-11)
    if strategy == "auto":
        plan = hesse.plan(model, x, "laplacian", batched=True, output=0, create_graph=True)
        notes = dict(plan.estimates)
        assert notes["vmap"].startswith("n/a: create_graph=True through layer_norm")
        assert notes["structured"].startswith("n/a: create_graph=True through layer_norm")


@pytest.mark.parametrize("strategy", ["vmap", "structured"])
def test_forward_mode_strategies_decline_and_name_one_that_can(strategy: str) -> None:
    model, x = _model(), torch.randn(5, 4, requires_grad=True)
    with pytest.raises(hesse.StrategyError, match=r"layer_norm.*strategy='reverse' can"):
        hesse.laplacian(model, x, batched=True, output=0, strategy=strategy, create_graph=True)
    # without create_graph (second order only) they are right and run
    got = hesse.laplacian(model, x.detach(), batched=True, output=0, strategy=strategy)
    torch.testing.assert_close(got, _reference(model, x.detach())[0], rtol=1e-10, atol=1e-12)
