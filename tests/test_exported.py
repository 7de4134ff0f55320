"""``torch.export`` programs: a static batch size works per sample, or a typed error."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import hessian, jacrev

import hesse


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).eval()


def _per_sample(model: nn.Module, x: torch.Tensor, transform) -> torch.Tensor:
    return torch.stack([transform(lambda z: model(z[None])[0])(xi) for xi in x]).detach()


@pytest.mark.parametrize("strategy", ["auto", "structured", "vmap", "reverse", "loop"])
@pytest.mark.parametrize("batch", [3, 2, 5], ids=["exported-batch", "smaller", "larger"])
def test_static_batch_program_works_per_sample(strategy: str, batch: int) -> None:
    model = _model()
    program = torch.export.export(model, (torch.randn(3, 4),)).module()
    x = torch.randn(batch, 4)
    want = _per_sample(model, x, hessian)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = hesse.hessian(program, x, batched=True, strategy=strategy)
        jac = hesse.jacobian(program, x, batched=True, strategy=strategy)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(jac, _per_sample(model, x, jacrev), rtol=1e-10, atol=1e-12)


def test_static_program_single_input_of_the_exported_shape() -> None:
    model = _model()
    x = torch.randn(3, 4)
    program = torch.export.export(model, (x,)).module()
    want = hessian(lambda z: model(z.reshape(3, 4)).reshape(-1))(x.reshape(-1))
    got = hesse.hessian(program, x, flat=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "x, batched, match",
    [
        (torch.randn(4), False, r"traced for inputs of shape \(3, 4\), got x of shape \(4,\)"),
        (torch.randn(2, 5), True, r"traced for batches of shape \(3, 4\), got samples"),
    ],
    ids=["single-other-shape", "other-sample-shape"],
)
def test_static_program_of_another_shape_is_a_typed_error(x, batched, match) -> None:
    program = torch.export.export(_model(), (torch.randn(3, 4),)).module()
    with pytest.raises(hesse.UnsupportedModelError, match=match):
        hesse.hessian(program, x, batched=batched)
    with pytest.raises(hesse.UnsupportedModelError, match=match):
        hesse.plan(program, x, batched=batched)


def test_dynamic_batch_program_runs_as_is() -> None:
    model = _model()
    batch = torch.export.Dim("batch")
    program = torch.export.export(
        model, (torch.randn(3, 4),), dynamic_shapes=({0: batch},)
    ).module()
    x = torch.randn(5, 4)
    got = hesse.hessian(program, x, batched=True)
    torch.testing.assert_close(got, _per_sample(model, x, hessian), rtol=1e-10, atol=1e-12)
