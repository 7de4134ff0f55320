"""Model factories for the tests of hesse.io and `hesse compute` (importable by subprocesses)."""

from __future__ import annotations

import os
import time

import torch

nn = torch.nn


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).float()


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Softplus(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).float()


class Slow(nn.Module):
    """An MLP that sleeps in every forward pass (HESSE_TEST_SLEEP seconds), for kill tests."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(float(os.environ.get("HESSE_TEST_SLEEP", "0")))
        return self.net(x)


def slow() -> nn.Module:
    return Slow()


def broken() -> nn.Module:
    raise RuntimeError("factory failed")
