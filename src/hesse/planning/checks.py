"""Checks of the caller's input and model, run before any derivative is computed.

Each checker takes the public call's name (``api``) so that every message starts with it
(``hesse.hessian: ...``), says what was expected and what was got, and gives the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import (
    BatchCouplingError,
    DeviceMismatchError,
    NonDeterministicModelError,
    NonFiniteError,
    UnsupportedInputError,
    UnsupportedModelError,
)

LOW_PRECISION = (torch.float16, torch.bfloat16)

# Substrings of torch function names whose second derivative is zero almost everywhere.
PIECEWISE_LINEAR_OPS = (
    "relu",
    "max_pool",
    "hardtanh",
    "threshold",
    "clamp",
    "clip",
    "maximum",
    "minimum",
    "abs",
    "prelu",
    "hardshrink",
    "softshrink",
    "hardsigmoid",
)


def check_input(api: str, x: object, batched: bool) -> torch.Tensor:
    """Checks that ``x`` is a finite real floating tensor of a usable shape.

    Args:
        api: The public call, for messages.
        x: The caller's input.
        batched: Whether the first dimension is a batch.

    Returns:
        ``x`` itself, typed as a tensor.

    Raises:
        UnsupportedInputError: Not a tensor, not a real floating dtype, or empty per sample.
        NonFiniteError: NaN or Inf entries.
    """
    if not isinstance(x, torch.Tensor):
        raise UnsupportedInputError(
            f"{api}: expected x to be a torch.Tensor, got {type(x).__name__}. "
            "Convert it with torch.as_tensor(x, dtype=torch.float64)."
        )
    if x.is_complex():
        raise UnsupportedInputError(
            f"{api}: complex input (dtype {x.dtype}) is not supported: Jacobians of "
            "non-holomorphic maps are not complex matrices. Wrap f as a real function of "
            "torch.view_as_real(x)."
        )
    if not x.is_floating_point():
        raise UnsupportedInputError(
            f"{api}: input x has dtype {x.dtype}; derivatives need a floating dtype. "
            "Cast with x.float() or x.double(); integer inputs such as token ids cannot "
            "be differentiated."
        )
    if x.device.type == "meta":
        raise UnsupportedInputError(
            f"{api}: x is a meta tensor (shape {tuple(x.shape)}, no values); derivatives "
            "depend on the values. Create x on a real device, e.g. torch.randn(shape)."
        )
    if batched and x.dim() == 0:
        raise UnsupportedInputError(
            f"{api}: batched=True expects x with a leading batch dimension, got a 0-d "
            "tensor. Pass x of shape (B, ...) or use batched=False."
        )
    per_sample = x.shape[1:] if batched else x.shape
    if per_sample.numel() == 0:
        raise UnsupportedInputError(
            f"{api}: each sample of x is empty (per-sample shape {tuple(per_sample)}); "
            "there is nothing to differentiate with respect to."
        )
    bad = ~torch.isfinite(x.detach())
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise NonFiniteError(
            f"{api}: x holds {int(bad.sum())} NaN/Inf entries (first at index {first}); "
            "derivatives there are meaningless. Clean the input, e.g. "
            "x = torch.nan_to_num(x), or drop those samples."
        )
    return x


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


def check_module(api: str, model: nn.Module, x: torch.Tensor, batched: bool) -> None:
    """Checks the devices of a module and refuses random or sample-coupling modes.

    Args:
        api: The public call, for messages.
        model: The caller's module.
        x: The input (its device is the one that counts).
        batched: Whether per-sample derivatives are asked for.

    Raises:
        DeviceMismatchError: A parameter or buffer is on another device than ``x``.
        NonDeterministicModelError: Dropout with ``p > 0`` in training mode.
        BatchCouplingError: Batch normalisation in training mode.
    """
    for name, tensor in _named_tensors(model):
        if tensor.device != x.device:
            raise DeviceMismatchError(
                f"{api}: input x is on {x.device} but the model's '{name}' is on "
                f"{tensor.device}. Move one of them: model.to({str(x.device)!r}) or "
                f"x.to({str(tensor.device)!r})."
            )
    for name, module in model.named_modules():
        label = f"'{name}' ({type(module).__name__}" if name else f"({type(module).__name__}"
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p:
            raise NonDeterministicModelError(
                f"{api}: module {label}, p={module.p}) is in training mode, so the "
                "model is random and so would be its derivatives. Call model.eval() first."
            )
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise BatchCouplingError(
                f"{api}: module {label}) is in training mode: it normalises with "
                "statistics of the whole batch, so samples are coupled"
                + (" (per-sample derivatives are undefined)" if batched else "")
                + " and its running statistics would be updated. Call model.eval(), or use "
                "GroupNorm/LayerNorm if batch statistics are not wanted."
            )


def check_output(api: str, out: object, batch: int | None) -> torch.Tensor:
    """Checks that the model returned one real floating tensor (with the batch first).

    Args:
        api: The public call, for messages.
        out: What the model returned.
        batch: The batch size fed in, or ``None`` when not batched.

    Returns:
        ``out`` typed as a tensor.

    Raises:
        UnsupportedModelError: Anything else.
    """
    if not isinstance(out, torch.Tensor):
        raise UnsupportedModelError(
            f"{api}: expected f(x) to return one tensor, got {type(out).__name__}. Wrap f "
            "so that it returns a single tensor, e.g. lambda x: model(x)[0]."
        )
    if out.is_complex() or not out.is_floating_point():
        raise UnsupportedModelError(
            f"{api}: expected f(x) to return a real floating tensor, got dtype {out.dtype}. "
            "Return real values (e.g. torch.view_as_real(out)) in a floating dtype."
        )
    if batch is not None and (out.dim() == 0 or out.shape[0] != batch):
        raise UnsupportedModelError(
            f"{api}: batched=True expects f(x) of shape (B, ...) with B={batch}, got shape "
            f"{tuple(out.shape)}. Return one row per sample, or use batched=False."
        )
    return out


def check_independent(
    api: str, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> bool:
    """Checks that samples do not influence each other, on the real batch.

    Every pair of samples differs in some bit of their indices. For each bit ``k`` the
    samples whose bit is 1 (then those whose bit is 0) are perturbed, and the outputs of
    the others must not move: ``2 ceil(log2 B)`` forward passes find any coupling between
    any two samples, at any batch size.

    Args:
        api: The public call, for messages.
        fn: The batched function, ``(b, n) -> (b, m)``.
        x: The flattened batch, shape ``(B, n)`` with ``B >= 2``.

    Returns:
        True (the samples are independent).

    Raises:
        BatchCouplingError: An output moved beyond rounding.
    """
    batch = x.shape[0]
    ids = torch.arange(batch, device=x.device)
    gen = torch.Generator(device=x.device).manual_seed(0)
    with torch.no_grad():
        base = fn(x)
        scale = max(1.0, float(base.abs().max())) if base.numel() else 1.0
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
        noise = noise * (1.0 + x.abs())
        eps = torch.finfo(base.dtype).eps
        tol = 64 * eps * scale
        for k in range(max(1, (batch - 1).bit_length())):
            bit = ((ids >> k) & 1).bool()
            for moved in (bit, ~bit):
                if not bool(moved.any()) or bool(moved.all()):
                    continue
                out = fn(torch.where(moved[:, None], x + noise, x))
                a, b = out[~moved], base[~moved]
                same = (a - b).abs() <= tol
                same |= (a == b) | (torch.isnan(a) & torch.isnan(b))
                if not bool(same.all()):
                    gap = float((a - b).abs().nan_to_num(float("inf")).max())
                    fixed = int((~moved).nonzero()[0])
                    raise BatchCouplingError(
                        f"{api}: with batched=True the samples must be independent, but "
                        f"changing other samples of the batch of {batch} changes the output "
                        f"of sample {fixed} by {gap:.3g} (tolerance {tol:.1g}): the model "
                        "mixes samples (batch statistics, attention or pooling over the "
                        "batch, ...). Compute one sample at a time with batched=False, or "
                        "fix the model."
                    )
    return True


RANDOM_OPS = (
    "rand", "randn", "randint", "randperm", "bernoulli", "normal", "multinomial",
    "poisson", "rrelu", "dropout", "alpha_dropout", "feature_alpha_dropout",
)  # fmt: skip


def check_deterministic(
    api: str, out: torch.Tensor, again: torch.Tensor | None, random_ops: list[str]
) -> None:
    """Refuses a model whose two calls on the same input differ.

    Args:
        api: The public call, for messages.
        out: The first call's output.
        again: The second call's output.
        random_ops: Random torch functions the calls used (for the message).

    Raises:
        NonDeterministicModelError: The outputs differ.
    """
    if again is None or again.shape != out.shape or torch.equal(out, again):
        return
    if bool(torch.isnan(out).any()) and torch.equal(out.nan_to_num(), again.nan_to_num()):
        return
    ops = f" ({', '.join(random_ops)})" if random_ops else ""
    raise NonDeterministicModelError(
        f"{api}: two calls of f on the same input gave different outputs: the model is "
        f"random{ops}, and so would be its derivatives. Call model.eval(), pass "
        "training=False to F.dropout, or draw the noise outside f and close over it."
    )


class OpRecorder(TorchFunctionMode):
    """Records the names of the torch functions a forward pass calls."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))

    def random_ops(self) -> list[str]:
        """The recorded functions that draw random numbers."""
        return sorted(n for n in self.names if any(n.startswith(r) for r in RANDOM_OPS))

    def piecewise_linear(self) -> list[str]:
        """The recorded functions whose second derivative is zero almost everywhere."""
        return sorted(n for n in self.names if any(p in n for p in PIECEWISE_LINEAR_OPS))
