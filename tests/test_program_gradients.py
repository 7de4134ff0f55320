"""Gradients through the structured engine's derivative programs (``create_graph=True``).

From a request's third call the engine runs a traced derivative program instead of
interpreting the graph (:mod:`hesse.engine.program`). Its results must stay differentiable
exactly as the interpreted pass is: to the input and to the weights, on every call, and
after plain (``create_graph=False``) calls of the same request. References: nested
``torch.func`` in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, vmap

import hesse

CALLS = 5


class DetachedScale(nn.Module):
    """A tanh MLP whose output is scaled by a detached (constant) function of the input."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh())
        self.head = nn.Linear(12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return self.head(h) * (1.0 + h.detach().sum(-1, keepdim=True) ** 2)


def tanh_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16), nn.Softplus(), nn.Linear(16, 1)
    )


def tanh_tanh() -> nn.Module:
    return nn.Sequential(
        nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)
    )


MODELS = {"tanh_softplus": tanh_mlp, "tanh_tanh": tanh_tanh, "detached_scale": DetachedScale}


def reference(model: nn.Module, params: dict, x: torch.Tensor, quantity: str) -> torch.Tensor:
    """``(B, 3, 3)``, ``(B, 3)`` or ``(B,)`` by vmap of torch.func.hessian."""

    def f(z: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, (z,)).squeeze(-1)

    h = vmap(hessian(f))(x)
    if quantity == "hessian":
        return h
    diag = h.diagonal(dim1=-2, dim2=-1)
    return diag if quantity == "hessian_diag" else diag.sum(-1)


def gradients(out: torch.Tensor, x: torch.Tensor, params: dict) -> list[torch.Tensor]:
    loss = (out**2).sum() + out.sin().sum()
    return torch.autograd.grad(
        loss, [x, *params.values()], allow_unused=True, materialize_grads=True
    )


@pytest.mark.parametrize("plain_first", [False, True], ids=["graph_only", "plain_first"])
@pytest.mark.parametrize("quantity", ["hessian", "hessian_diag", "laplacian"])
@pytest.mark.parametrize("name", list(MODELS))
def test_program_gradients_match_torch_func(name: str, quantity: str, plain_first: bool) -> None:
    torch.manual_seed(3)
    model = MODELS[name]().double()
    x0 = torch.randn(5, 3, dtype=torch.float64)
    if plain_first:  # the request's program is emitted by calls that keep no graph
        for _ in range(CALLS):
            getattr(hesse, quantity)(model, x0, batched=True, strategy="structured")
    params = dict(model.named_parameters())
    for call in range(CALLS):
        x = x0.clone().requires_grad_(True)
        got = getattr(hesse, quantity)(
            model, x, batched=True, strategy="structured", create_graph=True
        )
        want = reference(model, params, x, quantity)
        torch.testing.assert_close(got.reshape(want.shape), want, rtol=1e-10, atol=1e-12)
        got_grads = gradients(got.reshape(want.shape), x, params)
        for g, r in zip(got_grads, gradients(want, x, params), strict=True):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11, msg=f"call {call + 1}")


def test_taylor_programs_stay_in_use_for_training() -> None:
    """The PINN fast path: a tanh MLP's Laplacian program has no ``detach`` and runs."""
    torch.manual_seed(4)
    model = tanh_tanh().double()
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    for _ in range(CALLS):
        hesse.laplacian(model, x, batched=True, strategy="structured", create_graph=True)
    note = hesse.plan(
        model, x, "laplacian", batched=True, strategy="structured", create_graph=True
    ).program
    assert note.startswith("derivative program"), note


def test_hessian_program_that_cuts_gradients_is_not_used_for_training() -> None:
    """tanh's backward reads its saved output: that program is interpreted under a graph."""
    torch.manual_seed(5)
    model = tanh_tanh().double()
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    for _ in range(CALLS):
        hesse.hessian(model, x, batched=True, strategy="structured", create_graph=True)
    note = hesse.plan(
        model, x, "hessian", batched=True, strategy="structured", create_graph=True
    ).program
    assert note.startswith("interpreted (the traced derivative program would cut"), note
