"""PINN training-step peers in torch (quantity ``laplacian_train``).

A step: the Laplacian of the selected output at every sample, kept differentiable, the
loss ``mean(lap^2)``, and its gradient with respect to the weights (``autograd.grad``, the
same work as ``backward()``), returned flattened in parameter order, shape ``(P,)``. Every
method trains a copy of the case's model with ``requires_grad`` on, so all see the same
weights.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.func import hessian, vmap

from ..cases import Instance
from . import Method, Prepared, register

Tensor = torch.Tensor
TRAIN = ("laplacian_train",)
Laplacian = Callable[[nn.Module, Tensor], Tensor]  # (model, x (B, n)) -> (B,) or (B, m)


def trainable(inst: Instance) -> tuple[nn.Module, list[nn.Parameter]]:
    """A copy of the case's model whose parameters require grad, and those parameters."""
    model = copy.deepcopy(inst.model).requires_grad_(True)
    return model, list(model.parameters())


def flat_grads(loss: Tensor, params: list[nn.Parameter]) -> Tensor:
    """``d loss / d params`` flattened in parameter order; unused parameters give zeros."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


def step(inst: Instance, laplacian: Laplacian) -> Prepared:
    """The training step around a differentiable Laplacian."""
    if not inst.case.batched:
        raise ValueError("training-step cases are batched")
    model, params = trainable(inst)
    x = inst.x

    def run() -> Tensor:
        lap = laplacian(model, x)
        return flat_grads((lap**2).mean(), params)

    return run


def _selected(inst: Instance, model: nn.Module) -> Callable[[Tensor], Tensor]:
    out = inst.case.output
    return lambda z: model(z).reshape(z.shape[0], -1)[:, out]


def func_step(inst: Instance) -> Prepared:
    """``torch.func``: vmap over samples of ``hessian``, then the trace (the reference)."""

    def lap(model: nn.Module, x: Tensor) -> Tensor:
        u = _selected(inst, model)
        h = vmap(hessian(lambda z: u(z[None])[0]))(x)  # (B, n, n)
        return h.diagonal(0, -2, -1).sum(-1)

    return step(inst, lap)


def loop_step(inst: Instance) -> Prepared:
    """The hand-written loop: gradient, then one ``autograd.grad`` per input dimension."""

    def lap(model: nn.Module, x: Tensor) -> Tensor:
        x = x.detach().requires_grad_(True)
        u = _selected(inst, model)(x)
        (g,) = torch.autograd.grad(u.sum(), x, create_graph=True)
        return sum(
            torch.autograd.grad(g[:, i].sum(), x, create_graph=True)[0][:, i]
            for i in range(x.shape[1])
        )

    return step(inst, lap)


register(
    Method(
        "func_train",
        "torch.func: vmap(hessian) trace, then grad to the weights",
        "torch.func",
        func_step,
        quantities=TRAIN,
    )
)
register(
    Method(
        "grad_loop_train",
        "double autograd.grad loop over input dims (batch-summed), then grad to the weights",
        "seed",
        loop_step,
        quantities=TRAIN,
    )
)
