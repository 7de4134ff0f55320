"""Models of the adversarial suite (issue 9) beyond plain MLPs: state, output-dependent
probes, batch coupling, once_differentiable, randomness, detach, GRU, chunk, checkpoint,
attention. Each is deterministic at construction (own seed), in the default dtype."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

D = 3  # per-sample input size (as in trust_cases)


# --------------------------------------------------------------------------------------
# Models with state, and models whose outputs differ in how they may be differentiated
# --------------------------------------------------------------------------------------


class _Base(nn.Module):
    def __init__(self, seed: int = 6, hidden: int = 4, out: int = 2) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.lin = nn.Linear(D, hidden)
            self.out = nn.Linear(hidden, out)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin(x)))


class CountingBuffer(_Base):
    """``self.count += 1`` on a registered buffer in every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return self.body(x)


class RunningMean(_Base):
    """A running mean of the input updated in place under ``no_grad`` (as BatchNorm does)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("running", torch.zeros(D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.running.mul_(0.9).add_(0.1 * x.detach().reshape(-1, D).mean(0))
        return self.body(x)


class PythonCounter(_Base):
    """A Python int counter on the module, incremented in every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.body(x)


STATEFUL = {
    "count_buffer": CountingBuffer,
    "running_mean": RunningMean,
    "int_counter": PythonCounter,
}


class NoGradOutput(_Base):
    """Output 1 reads a tensor computed under ``torch.no_grad`` (forward mode ignores it,
    pytorch#128600); output 0 does not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            s = x**2
        y0 = self.body(x)[..., 0]
        y1 = (torch.tanh(x) * s).sum(-1) + y0
        return torch.stack([y0, y1], -1)


class CoupledOutput(_Base):
    """Output 0 is per sample; output 1 mixes every sample of the batch into each."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0 = self.body(x)[..., 0]
        y1 = y0 * torch.tanh(x).mean(0).sum()
        return torch.stack([y0, y1], -1)


class MixAtFour(_Base):
    """Mixes sample 3 into sample 0, but only when the batch has at least 4 samples."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if x.dim() == 2 and x.shape[0] >= 4:
            y = torch.cat([y[:1] * (1 + torch.tanh(x[3:4]).sum()), y[1:]])
        return y


class CenterTail(_Base):
    """``x - x.mean(0)`` over samples 2.. only: samples 0 and 1 never couple."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] > 2:
            x = torch.cat([x[:2], x[2:] - x[2:].mean(0)])
        return self.body(x)


# --------------------------------------------------------------------------------------
# Models of categories 6-9: operators that some strategies cannot differentiate
# --------------------------------------------------------------------------------------


class _Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


class OnceDifferentiable(_Base):
    """A cube whose backward is ``@once_differentiable`` (``custom=False``: plain ``**3``)."""

    def __init__(self, custom: bool = True) -> None:
        super().__init__()
        self.custom = custom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return self.out(_Cube.apply(h) if self.custom else h**3)


class FunctionalDropout(_Base):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.nn.functional.dropout(torch.tanh(self.lin(x)), 0.5, training=True))


class RandNoise(_Base):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x + 0.1 * torch.rand_like(x))


class Detached(_Base):
    """``tanh`` terms plus a product with ``x.detach()**2`` (no derivative through it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x) + torch.tanh(x).sum(-1, keepdim=True)
        return y + (x.detach() ** 2).sum(-1, keepdim=True) * torch.sin(x).sum(-1, keepdim=True)


class GRULast(nn.Module):
    """``nn.GRU(batch_first=True)``, a head on the last hidden state; input ``(B, T, F)``."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            self.gru = nn.GRU(2, 3, batch_first=True)
            self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.gru(x)
        return self.head(h[-1])


class Chunked(_Base):
    """``Tensor.chunk`` of a hidden layer into a gated product."""

    def __init__(self) -> None:
        super().__init__(hidden=8, out=2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(8)
            self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lin(x).chunk(2, dim=-1)
        return self.out(torch.tanh(a) * b)


class Checkpointed(_Base):
    """``torch.utils.checkpoint`` around the hidden block (``use=False``: a plain call)."""

    def __init__(self, reentrant: bool, use: bool = True) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.use = use

    def block(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use:
            from torch.utils.checkpoint import checkpoint

            h = checkpoint(self.block, x, use_reentrant=self.reentrant)
        else:
            h = self.block(x)
        return self.out(h)


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` (batch_first) as self-attention plus a residual."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(9)
            self.mha = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0] + x


def encoder_layer() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(10)
        return nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=0.0, batch_first=True)


def attention_settings() -> dict[str, Any]:
    """The user's global switches that a math-backend fallback could leave changed."""
    cuda = torch.backends.cuda
    return {
        "mha_fastpath": torch.backends.mha.get_fastpath_enabled(),
        "flash_sdp": cuda.flash_sdp_enabled(),
        "mem_efficient_sdp": cuda.mem_efficient_sdp_enabled(),
        "math_sdp": cuda.math_sdp_enabled(),
        "cudnn_sdp": cuda.cudnn_sdp_enabled(),
        "grad_enabled": torch.is_grad_enabled(),
        "default_dtype": torch.get_default_dtype(),
    }
