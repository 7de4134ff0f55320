"""Memory budgets: parsing ``max_memory``, finding what is free, measuring a forward pass.

The planner needs three numbers: the budget (what the caller allows, or half of what the
device has free), the bytes of the result, and the working set of one unit of work (one
Hessian row of one sample). The last one is measured, not guessed: one forward pass of one
sample under :func:`torch.autograd.graph.saved_tensors_hooks` reports the bytes autograd
keeps for the backward pass, and each strategy scales it by its own factor.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..errors import UnsupportedInputError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
UNLIMITED = 2**62  # max_memory=float("inf")
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | float | str | None, api: str = "hesse") -> int | None:
    """Turns ``max_memory`` into a number of bytes.

    Args:
        value: ``None`` (no budget given), a number of bytes, or a string such as
            ``"2GB"``, ``"512MiB"`` or ``"1.5e9"`` (decimal units: kB, MB, GB, TB; binary
            units: KiB, MiB, GiB, TiB).
        api: The public call, for the error message.

    Returns:
        The budget in bytes, or ``None``.

    An infinite budget means no limit (:data:`UNLIMITED` bytes); a positive budget below
    one byte is one byte (nothing fits in it: the call then raises ``MemoryBudgetError``).

    Raises:
        UnsupportedInputError: The value is not a positive size.

    >>> parse_bytes("2GB"), parse_bytes("1KiB"), parse_bytes(None), parse_bytes(0.5)
    (2000000000, 1024, None, 1)
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UnsupportedInputError(
            f"{api}: expected max_memory as bytes (int) or a string like '2GB', got "
            f"{type(value).__name__}. Pass e.g. max_memory='2GB'."
        )
    if isinstance(value, str):
        match = _SIZE.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise UnsupportedInputError(
                f"{api}: could not read max_memory={value!r}; expected a number with an "
                "optional unit (B, kB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '2GB'."
            )
        value = float(match.group(1)) * _UNITS[unit]
    if not value > 0:  # also NaN
        raise UnsupportedInputError(
            f"{api}: max_memory must be a positive size, got {value!r}. Pass e.g. "
            "max_memory='2GB', or None for half of the free memory."
        )
    if value == float("inf"):
        return UNLIMITED
    return max(1, math.ceil(value))


def available_bytes(device: torch.device) -> int:
    """Bytes free on ``device`` now: CUDA's free memory, or the host's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def profile_forward(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> tuple[int, float]:
    """Bytes autograd saves for the backward pass of ``fn(x)``, and its multiply-adds.

    Args:
        fn: The function, mapping ``x`` of shape ``(b, n)`` to ``(b, m)``.
        x: A small input, usually one sample, shape ``(1, n)``.

    Returns:
        The summed size of the activations packed for backward (weights excluded: they are
        shared by all work items) plus the output's size, and
        the multiply-adds of matrix products and convolutions (FlopCounterMode).
    """
    total = 0

    xin = x.detach().requires_grad_(True)

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        root = t._base if t._base is not None else t
        if not (root.is_leaf and root is not xin):  # weights are shared, not per item
            total += t.numel() * t.element_size()
        # NOTE: not ``t`` itself: an output saved by its own node and packed to itself is a
        # reference cycle through C++ (tensor -> grad_fn -> saved tensor) that the garbage
        # collector cannot see, so every call kept the forward's activations alive. The
        # graph is never run backward; a detached alias is enough.
        return t.detach()

    counter = FlopCounterMode(display=False)
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with torch.enable_grad(), hooks, counter:
        out = fn(xin)
    macs = counter.get_total_flops() / 2 + out.numel()
    return total + out.numel() * out.element_size(), float(max(macs, x.numel()))


def format_bytes(n: float) -> str:
    """Formats a size for people: ``format_bytes(2.5e9) == '2.33 GiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover
