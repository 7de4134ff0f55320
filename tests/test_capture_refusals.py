"""Models TorchDynamo refuses are not traced again while their structure is unchanged.

The refusal only decides whether hesse tries the capture; the tests change the model
between calls (submodule swap, hook, rebound closure) and check the answer in float64
against ``torch.autograd.functional`` or torch.func.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import hessian

import hesse
from hesse.planning import capture as capture_module


class Head(nn.Module):
    """A recurrent (or, after a swap, feed-forward) core and a tanh readout."""

    def __init__(self, core: nn.Module) -> None:
        super().__init__()
        self.core = core
        self.out = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.core(x)
        h = h[0] if isinstance(h, tuple) else h
        return torch.tanh(self.out(h)).sum()


@pytest.fixture
def traces(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the captures hesse attempts."""
    counter = [0]
    real = capture_module.capture

    def counting(f, x):
        counter[0] += 1
        return real(f, x)

    monkeypatch.setattr(capture_module, "capture", counting)
    return counter


def check(model, x: torch.Tensor) -> None:
    """hesse's auto Hessian against ``torch.autograd.functional.hessian``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hesse.FallbackWarning)
        got = hesse.hessian(model, x, flat=True)
    want = torch.autograd.functional.hessian(lambda z: model(z.reshape(x.shape)), x.flatten())
    torch.testing.assert_close(got.reshape(want.shape), want, rtol=1e-10, atol=1e-12)


def captured(model, x: torch.Tensor) -> bool:
    return hesse.plan(model, x, "hessian").anchor is not None


def test_a_refused_model_is_traced_once(traces: list[int]) -> None:
    torch.manual_seed(0)
    model = Head(nn.GRU(3, 4, batch_first=True)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    for _ in range(4):
        check(model, x)
    assert traces[0] == 1
    assert not captured(model, x)


def test_a_swapped_submodule_or_a_hook_tries_again(traces: list[int]) -> None:
    torch.manual_seed(1)
    model = Head(nn.GRU(3, 4, batch_first=True)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    check(model, x)
    assert not captured(model, x) and traces[0] == 1
    model.core = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).double()  # now one graph
    check(model, x)
    assert captured(model, x)
    model.core = nn.GRU(3, 4, batch_first=True).double()
    check(model, x)
    assert not captured(model, x)
    refused = traces[0]
    check(model, x)
    assert traces[0] == refused  # the GRU again: remembered
    handle = model.out.register_forward_hook(lambda m, i, o: o * 2.0)
    check(model, x)  # the hook doubles the readout: a new structure, a new answer
    assert traces[0] == refused + 1
    handle.remove()
    check(model, x)


def test_a_rebound_closure_tries_again(traces: list[int]) -> None:
    torch.manual_seed(2)
    x = torch.randn(3, dtype=torch.float64)
    scale = torch.tensor(1.5, dtype=torch.float64)

    def f(z: torch.Tensor) -> torch.Tensor:
        if float(z.detach().sum()) > -1e9:  # data-dependent: TorchDynamo refuses it
            return (scale * z.tanh()).sum() ** 2
        return z.sum()

    check(f, x)
    assert traces[0] == 1
    check(f, x)
    assert traces[0] == 1
    scale = torch.tensor(-0.5, dtype=torch.float64)  # read by f
    check(f, x)
    assert traces[0] == 2
    want = hessian(lambda z: (scale * z.tanh()).sum() ** 2)(x)
    got = hesse.hessian(f, x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


class FlaggedHead(Head):
    """``Head`` with a plain attribute that changes its output."""

    scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * super().forward(x)


def test_a_refused_model_reads_reassigned_parameters_and_attributes(traces: list[int]) -> None:
    """The refusal is kept (same structure), and the answers follow the model's changes."""
    torch.manual_seed(3)
    model = FlaggedHead(nn.GRU(3, 4, batch_first=True)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    check(model, x)
    model.out.weight = nn.Parameter(torch.randn(1, 4, dtype=torch.float64))  # same shape
    check(model, x)
    model.scale = -2.5
    check(model, x)
    model.out.bias.data.add_(0.7)  # in place
    check(model, x)
    assert traces[0] == 1  # one structure: traced once, every answer still right
