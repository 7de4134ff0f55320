"""Model / input cases shared by the test files.

Every case is a :class:`Case`: factories (not objects) so that each test gets a fresh
model and input, built deterministically (``torch.random.fork_rng`` + a per-case seed, so
the global RNG of the test is left alone) in the current default dtype (float64 in the
tests, see ``conftest.py``).

All models are ``nn.Module`` s, also the "functions": converting a case to float32 or
float16 is then ``model.to(dtype)``, and the float64 reference can be rebuilt from exactly
the same (rounded) weights with ``copy.deepcopy(model).double()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

B = 3  # samples in a batched case


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Runs a block with the global CPU RNG seeded, restoring the caller's RNG state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def mlp(d: int, widths: tuple[int, ...], out: int, act: Callable[[], nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Linear(d, w), act()]
        d = w
    layers.append(nn.Linear(d, out))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------
# Models that are "functions" in the seed's examples, written as modules.
# --------------------------------------------------------------------------------------


class SquaredLoss(nn.Module):
    """``((W x - y)**2).sum()`` per sample; Hessian ``2 W^T W`` (closed form)."""

    def __init__(self, d: int = 4, k: int = 3) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(k, d))
        self.register_buffer("target", torch.randn(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x @ self.weight.T - self.target) ** 2).sum(-1)


class WeightedSquare(nn.Module):
    """``x * x * arange(4)``: Hessian of output k is ``2 k e_k e_k^T``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.arange(4.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x * self.scale


class Residual(nn.Module):
    def __init__(self, d: int = 5, depth: int = 2, out: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(depth))
        self.head = nn.Linear(d, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.head(x)


class SmallCNN(nn.Module):
    """Conv -> tanh -> AvgPool -> flatten -> Linear; works on (C,H,W) and (N,C,H,W)."""

    def __init__(self, side: int = 5, classes: int = 2, stride: int = 1, kernel: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel, stride=stride)
        self.pool = nn.AvgPool2d(2)
        conv_side = (side - kernel) // stride + 1
        self.head = nn.Linear(2 * (conv_side // 2) ** 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.tanh(self.conv(x)))
        return self.head(h.flatten(-3))


class LayerNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.norm(self.inp(x))))


class MultiOutput(nn.Module):
    """Per-sample output of shape (2, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.out = nn.Linear(5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.out(nn.functional.softplus(self.lin(x)))
        return y.reshape(*x.shape[:-1], 2, 3)


class AssumesBatch(nn.Module):
    """Uses ``x.flatten(1)``: only works on a batch, like many real models."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.sin(self.lin(x.flatten(1))))


class ItemCheck(nn.Module):
    """Calls ``.item()`` (a finiteness guard): vmap cannot run it, autograd can."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(4, (5,), 2, nn.Tanh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(torch.isfinite(x).all().item()):
            raise ValueError("non-finite input")
        return self.net(x)


class InPlaceWrite(nn.Module):
    """Writes into a fresh ``torch.zeros`` buffer in place: vmap rejects it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        out = torch.zeros(*x.shape[:-1], 3, dtype=h.dtype)
        out[..., 0] = torch.tanh(h[..., 0]) * h[..., 1]
        out[..., 1:] = nn.functional.softplus(h[..., 1:])
        return out


class PartialDependence(nn.Module):
    """Uses only features 0 and 1 of 4: zero rows and columns, never "unused" errors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x[..., 0], x[..., 1]
        return torch.stack([a * a * b, torch.sin(b), b], dim=-1)


class _CubeOldStyle(torch.autograd.Function):
    """Old-style custom Function (no ``setup_context``): torch.func cannot run it at all."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad  # differentiable, so double backward works


class _CubeNoJvp(torch.autograd.Function):
    """torch.func-ready custom Function without a ``jvp``: no forward-mode AD."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


class CustomFunctionNet(nn.Module):
    """Linear -> custom cube Function -> Linear."""

    def __init__(self, function: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.function = function
        self.inp = nn.Linear(4, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.function.apply(self.inp(x)))


def bn_eval_net() -> nn.Module:
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2))
    bn = net[1]
    bn.running_mean.copy_(torch.randn(5) * 0.3)
    bn.running_var.copy_(torch.rand(5) + 0.5)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(5) + 0.5)
        bn.bias.copy_(torch.randn(5) * 0.1)
    return net.eval()


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One model with inputs.

    Attributes:
        id: Readable test id.
        make_model: Builds the model (called inside :meth:`build`, seeded).
        make_x: ``make_x(batched)`` builds the input; batched inputs have ``B`` samples.
        modes: The ``batched`` values the case supports.
        output: The ``output=`` argument the case is called with.
        vmap_ok: False if a ``torch.func`` / vmap-based strategy may be unable to run the
            model (it must then raise a StrategyError, or give the right answer).
        needs: What the model needs: ``"any"``; ``"reverse"`` (no forward-mode AD: a
            forward-over-reverse strategy must refuse second-order quantities); ``"autograd"``
            (torch.func cannot run it: only plain-autograd strategies can).
        zero_hessian: The second derivative is identically zero.
        tags: Free-form labels.
    """

    id: str
    make_model: Callable[[], nn.Module]
    make_x: Callable[[bool], torch.Tensor]
    modes: tuple[bool, ...] = (False, True)
    output: Any = None
    vmap_ok: bool = True
    zero_hessian: bool = False
    needs: str = "any"
    seed: int = 0
    tags: frozenset[str] = field(default_factory=frozenset)

    def build(self, batched: bool) -> tuple[nn.Module, torch.Tensor]:
        """A fresh ``(model, x)``, identical at every call."""
        with seeded(self.seed):
            model = self.make_model()
            x = self.make_x(batched)
        return model, x

    def __str__(self) -> str:
        return self.id


def _randn(*shape: int) -> Callable[[bool], torch.Tensor]:
    """Input factory: per-sample shape ``shape``, with ``B`` samples when batched."""
    return lambda batched: torch.randn(B, *shape) if batched else torch.randn(*shape)


def _transposed(batched: bool) -> torch.Tensor:
    # per-sample (3, 4) from a transposed (4, 3) block: not contiguous
    if batched:
        return torch.randn(B, 4, 3).transpose(1, 2)
    return torch.randn(4, 3).t()


def _sliced(batched: bool) -> torch.Tensor:
    # every other column / row: strided, not contiguous
    if batched:
        return torch.randn(2 * B, 9)[::2, 1::2]
    return torch.randn(9)[1::2]


CASES: tuple[Case, ...] = (
    Case("linear", lambda: nn.Linear(4, 3), _randn(4), zero_hessian=True, seed=1),
    Case("squared-loss", SquaredLoss, _randn(4), seed=2, tags=frozenset({"scalar"})),
    Case("weighted-square-out2", WeightedSquare, _randn(4), output=2, seed=3),
    Case("mlp-tanh", lambda: mlp(5, (6, 6), 3, nn.Tanh), _randn(5), seed=4),
    Case("mlp-softplus", lambda: mlp(4, (6,), 2, nn.Softplus), _randn(4), seed=5),
    Case("mlp-gelu", lambda: mlp(4, (5, 5), 2, nn.GELU), _randn(4), seed=6),
    Case("mlp-silu", lambda: mlp(3, (7,), 4, nn.SiLU), _randn(3), seed=7),
    Case("residual-mlp", Residual, _randn(5), seed=8),
    Case("cnn-avgpool", SmallCNN, _randn(1, 5, 5), seed=9),
    Case("layernorm", LayerNormNet, _randn(4), seed=10),
    Case("multi-output-2x3", MultiOutput, _randn(4), seed=11),
    Case("noncontig-transposed", lambda: mlp(4, (5,), 2, nn.Tanh), _transposed, seed=12),
    Case("noncontig-sliced", lambda: mlp(4, (5,), 2, nn.Softplus), _sliced, seed=13),
    Case("assumes-batch-dim", AssumesBatch, _randn(2, 3), modes=(True,), seed=14),
    Case("batchnorm-eval", bn_eval_net, _randn(4), modes=(True,), seed=15),
    Case("partial-dependence", PartialDependence, _randn(4), seed=18),
    Case("item-call", ItemCheck, _randn(4), vmap_ok=False, seed=16),
    Case("inplace-write", InPlaceWrite, _randn(4), vmap_ok=False, seed=17),
    Case(
        "custom-fn-old-style",
        lambda: CustomFunctionNet(_CubeOldStyle),
        _randn(4),
        vmap_ok=False,
        needs="autograd",
        seed=19,
    ),
    Case(
        "custom-fn-no-jvp",
        lambda: CustomFunctionNet(_CubeNoJvp),
        _randn(4),
        vmap_ok=False,
        needs="reverse",
        seed=20,
    ),
)

CASES_BY_ID = {c.id: c for c in CASES}

# (case, batched) pairs with ids like "mlp-tanh-batched"
CASE_MODES: tuple[tuple[Case, bool], ...] = tuple((c, b) for c in CASES for b in c.modes)


def mode_id(case: Case, batched: bool) -> str:
    return f"{case.id}-{'batched' if batched else 'single'}"


def case_by_id(case_id: str) -> Case:
    return CASES_BY_ID[case_id]


# The big example of the seed: a CNN class logit of one 1x28x28 image, 784x784 Hessian.
def cnn28() -> tuple[nn.Module, torch.Tensor]:
    with seeded(28):
        model = SmallCNN(side=28, classes=10, stride=3, kernel=3)
        x = torch.randn(1, 28, 28)
    return model, x


class ReluNet(nn.Module):
    """ReLU MLP and max-pool CNN pieces: Hessian zero almost everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(4, (8, 8), 3, nn.ReLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MaxPoolNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 2)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.conv(x)).flatten(-3))
