"""The model zoo: everyday architectures, built by hand (no torchvision, no downloads).

Shared by the tests (``tests/test_zoo.py``, through ``tests/zoo.py``) and the zoo
benchmark (``python -m benchmarks.zoo``).

Every entry is a :class:`ZooCase`: a factory of a small, deterministic model in eval mode,
the per-sample input shape, the ``output=`` selection to differentiate, and (where
``torch.func`` cannot differentiate the model twice) a factory of a *reference twin*: the
same function written with ops that have a double backward (Hardswish as
``x * clamp(x + 3, 0, 6) / 6``), sharing the model's weights. Sizes are tiny so that the
whole zoo runs in seconds on one core.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Runs a block with the global CPU RNG seeded, restoring the caller's RNG state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Attention on the math kernels (the fused ones have no jvp): for torch.func references."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


class ClampHardswish(nn.Module):
    """``nn.Hardswish`` written with ``hardtanh`` (double-backward capable, same values)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.hardtanh(x + 3.0, 0.0, 6.0) / 6.0


class ClampHardsigmoid(nn.Module):
    """``nn.Hardsigmoid`` written with ``hardtanh``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardtanh(x + 3.0, 0.0, 6.0) / 6.0


def reference_twin(model: nn.Module) -> nn.Module:
    """The model with Hardswish/Hardsigmoid swapped for their clamp forms (same weights)."""
    import copy

    twin = copy.deepcopy(model)
    for name, child in list(twin.named_modules()):
        for attr, sub in list(child.named_children()):
            if isinstance(sub, nn.Hardswish):
                setattr(child, attr, ClampHardswish())
            elif isinstance(sub, nn.Hardsigmoid):
                setattr(child, attr, ClampHardsigmoid())
        del name
    return twin


def _warm_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters for every BatchNorm."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


class BasicBlock(nn.Module):
    """ResNet's basic block: conv-BN-act-conv-BN, plus the identity, then act."""

    def __init__(self, c: int, act: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.act1 = act()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.act2 = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x  # in place, as torchvision's BasicBlock
        return self.act2(out)


def resnet(act: Callable[[], nn.Module], pool: Callable[[], nn.Module] | None = None):
    """A resnet-style CNN on 3x6x6 images: stem, one basic block, pooling, 3 logits."""
    pool = pool or (lambda: nn.Identity())
    return _warm_batchnorm(
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=False),
            nn.BatchNorm2d(4),
            act(),
            pool(),
            BasicBlock(4, act),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 3),
        )
    )


class SqueezeExcite(nn.Module):
    """MobileNetV3's squeeze-excite: pool, reduce, ReLU, expand, Hardsigmoid, scale."""

    def __init__(self, c: int, r: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, r, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(r, c, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    """MobileNetV3's block: expand 1x1, depthwise 3x3, squeeze-excite, project, residual."""

    def __init__(self, c: int, e: int) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e))
        self.act1 = nn.Hardswish()
        self.depthwise = nn.Sequential(
            nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e)
        )
        self.act2 = nn.Hardswish()
        self.se = SqueezeExcite(e, 4)
        self.project = nn.Sequential(nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act2(self.depthwise(self.act1(self.expand(x))))
        return x + self.project(self.se(out))


def mobilenet_block() -> nn.Module:
    """A MobileNetV3-style network on 3x4x4 images: stem, one inverted residual, head."""
    return _warm_batchnorm(
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=False),
            nn.BatchNorm2d(4),
            nn.Hardswish(),
            InvertedResidual(4, 8),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 6),
            nn.Hardswish(),
            nn.Linear(6, 3),
        )
    )


class TinyViT(nn.Module):
    """A ViT on 3x4x4 images: 2x2 patches (4 tokens of width 8), 1 encoder layer, head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 2, stride=2)
        self.pos = nn.Parameter(0.1 * torch.randn(4, 8))
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = x.dim() == 3
        if single:
            x = x[None]
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        out = self.head(self.norm(self.encoder(tokens)).mean(1))
        return out[0] if single else out


class RecurrentHead(nn.Module):
    """A GRU or LSTM over a sequence of 4 steps of width 3, a linear head on the last state."""

    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cell(3, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = x.dim() == 2
        out, _ = self.rnn(x[None] if single else x)
        y = self.head(torch.tanh(out[:, -1]))
        return y[0] if single else y


class AffineCoupling(nn.Module):
    """RealNVP's affine coupling on 6 features: ``chunk``/``split`` and ``torch.cat``."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.half = d // 2
        self.net = nn.Sequential(nn.Linear(self.half, 8), nn.Tanh(), nn.Linear(8, 2 * self.half))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        s, t = self.net(x1).split(self.half, dim=-1)
        y2 = x2 * torch.exp(torch.tanh(s)) + t
        return torch.cat([x1, y2], dim=-1)


class PairPotential(nn.Module):
    """A Morse pair potential with per-species parameters over a neighbour list.

    ``forward(positions, species, pairs)``: positions ``(N, 3)`` (or ``(B, N, 3)``),
    species ``(N,)`` integer types, pairs ``(2, P)`` atom indices. Returns the energy
    (``()`` or ``(B,)``).
    """

    def __init__(self, kinds: int = 2) -> None:
        super().__init__()
        self.depth = nn.Parameter(0.5 + torch.rand(kinds, kinds))
        self.width = nn.Parameter(1.0 + 0.5 * torch.rand(kinds, kinds))
        self.r0 = nn.Parameter(1.0 + 0.2 * torch.rand(kinds, kinds))

    def forward(self, pos: torch.Tensor, species: torch.Tensor, pairs: torch.Tensor):
        i, j = pairs[0], pairs[1]
        diff = pos[..., i, :] - pos[..., j, :]
        r = torch.sqrt((diff * diff).sum(-1) + 1e-12)
        si, sj = species[i], species[j]
        depth, width, r0 = self.depth[si, sj], self.width[si, sj], self.r0[si, sj]
        e = torch.exp(-width * (r - r0))
        return (depth * (e * e - 2.0 * e)).sum(-1)


ATOMS = 5


def species() -> torch.Tensor:
    """Atom types of the pair potential's 5 atoms."""
    return torch.tensor([0, 1, 1, 0, 1])


def neighbours() -> torch.Tensor:
    """A neighbour list (not every pair): ``(2, P)``."""
    return torch.tensor([[0, 0, 1, 1, 2, 3, 0], [1, 2, 2, 3, 4, 4, 4]])


class Bound(nn.Module):
    """``model(x, *args)`` as a model of ``x`` alone (the closure a user writes)."""

    def __init__(self, model: nn.Module, *args: Any) -> None:
        super().__init__()
        self.model, self.args = model, args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, *self.args)


@dataclass(frozen=True)
class ZooCase:
    """One architecture of the zoo.

    Attributes:
        name: Short name.
        build: Makes the model (seeded, float64, eval mode).
        shape: Per-sample input shape.
        output: The ``output=`` selection.
        twin: Makes the reference twin from the model (``None``: the model itself).
        piecewise: All curvature is piecewise linear (the Hessian is zero a.e.).
        lead: A single input keeps a leading batch dimension of 1 (BatchNorm needs it).
        rtol: Tolerance against the reference.
        args: Makes the fixed extra arguments of the model after ``x`` (``args=``).
    """

    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    output: Any = None
    twin: Callable[[nn.Module], nn.Module] | None = None
    piecewise: bool = False
    lead: bool = False
    rtol: float = 1e-9
    args: Callable[[], tuple] | None = None

    def model(self, seed: int = 0) -> nn.Module:
        with seeded(seed):
            return self.build().eval()

    def input(self, batch: int | None, seed: int = 1) -> torch.Tensor:
        with seeded(seed):
            if batch is None:
                shape = (1, *self.shape) if self.lead else self.shape
            else:
                shape = (batch, *self.shape)
            return torch.randn(shape)

    def extra_args(self) -> tuple:
        return () if self.args is None else self.args()

    def reference_model(self, model: nn.Module) -> nn.Module:
        """A model of ``x`` alone (the closure over the extra arguments) for torch.func."""
        model = model if self.twin is None else self.twin(model)
        return Bound(model, *self.extra_args()) if self.args is not None else model


ZOO = {
    "resnet_relu": ZooCase(
        "resnet_relu",
        lambda: resnet(lambda: nn.ReLU(inplace=True)),
        (3, 6, 6),
        0,
        piecewise=True,
        lead=True,
    ),
    "resnet_silu": ZooCase("resnet_silu", lambda: resnet(nn.SiLU), (3, 6, 6), 0, lead=True),
    "mobilenet_v3": ZooCase(
        "mobilenet_v3",
        mobilenet_block,
        (3, 4, 4),
        1,
        twin=reference_twin,
        lead=True,
        rtol=1e-7,  # torch's float64 hardsigmoid_backward uses a float32 1/6
    ),
    "vit": ZooCase("vit", TinyViT, (3, 4, 4), 2),
    "gru": ZooCase("gru", lambda: RecurrentHead(nn.GRU), (4, 3)),
    "lstm": ZooCase("lstm", lambda: RecurrentHead(nn.LSTM), (4, 3)),
    "coupling": ZooCase("coupling", AffineCoupling, (6,)),
    "pair_potential": ZooCase(
        "pair_potential", PairPotential, (ATOMS, 3), args=lambda: (species(), neighbours())
    ),
}
