"""Shared pieces of the public front: option checks, result layout, result warnings."""

from __future__ import annotations

import math
import numbers
import warnings

import torch

from .errors import (
    NonFiniteError,
    NonFiniteResultWarning,
    PiecewiseLinearWarning,
    UnsupportedInputError,
    ZeroDerivativeWarning,
)
from .planning.plan import Request
from .planning.problem import Problem
from .quantities import QUANTITIES


def check_request(request: Request) -> None:
    """Checks a request's options (types and ranges) before anything runs.

    Raises:
        UnsupportedInputError: An option of the wrong type or out of range.
    """
    if request.quantity not in QUANTITIES:
        raise UnsupportedInputError(
            f"{request.api}: unknown quantity {request.quantity!r}; expected one of "
            f"{', '.join(map(repr, QUANTITIES))}."
        )
    check_options(
        request.api,
        request.chunk_size,
        request.strategy,
        batched=request.batched,
        flat=request.flat,
        create_graph=request.create_graph,
        progress=request.progress,
    )


def direction(api: str, v: object, x: torch.Tensor, flat_x: torch.Tensor) -> torch.Tensor:
    """Checks ``v`` against ``x`` and flattens it like the problem's input: ``(B, n)``.

    Raises:
        UnsupportedInputError: ``v`` is not a real floating tensor shaped like ``x``.
        NonFiniteError: ``v`` holds NaN or Inf.
    """
    if not isinstance(v, torch.Tensor) or not v.is_floating_point():
        got = type(v).__name__ if not isinstance(v, torch.Tensor) else f"dtype {v.dtype}"
        raise UnsupportedInputError(
            f"{api}: expected v to be a real floating tensor shaped like x, got {got}."
        )
    if v.shape != x.shape:
        raise UnsupportedInputError(
            f"{api}: expected v of the same shape as x, {tuple(x.shape)}, got "
            f"{tuple(v.shape)}. For a batch, pass one direction per sample."
        )
    if v.device.type == "meta" or not bool(torch.isfinite(v.detach()).all()):
        raise NonFiniteError(
            f"{api}: v holds NaN/Inf entries (or no values); pass a finite direction."
        )
    return v.to(device=flat_x.device, dtype=flat_x.dtype).reshape(flat_x.shape)


def empty_result(problem: Problem, request: Request):
    """The result for a batch of zero samples: empty tensors of the documented shapes."""
    dims = {"jacobian": 1, "hessian": 2, "hessian_diag": 1, "laplacian": 0, "hvp": 1}
    empty = problem.x.new_zeros((0,))
    if request.quantity == "derivatives":
        return tuple(finish(problem, empty, k, request.flat) for k in (0, 1, 2))
    return finish(problem, empty, dims[request.quantity], request.flat)


def check_options(api: str, chunk_size: int | None, strategy: str, **flags: object) -> None:
    """Checks ``chunk_size``, ``strategy`` and boolean flags.

    Raises:
        UnsupportedInputError: A value of the wrong type or out of range.
    """
    if chunk_size is not None and (
        not isinstance(chunk_size, numbers.Integral)
        or isinstance(chunk_size, bool)
        or chunk_size < 1
    ):
        raise UnsupportedInputError(
            f"{api}: expected chunk_size to be None (all at once) or a positive int, got "
            f"{chunk_size!r}. Use chunk_size=1 for one Hessian row at a time."
        )
    if not isinstance(strategy, str):
        raise UnsupportedInputError(
            f"{api}: expected strategy to be a name such as 'auto', got {type(strategy).__name__}."
        )
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise UnsupportedInputError(
                f"{api}: expected {name} to be True or False, got {value!r}."
            )


def finish(problem: Problem, arr: torch.Tensor, input_dims: int, flat: bool) -> torch.Tensor:
    """Reshapes ``(B, m * n**input_dims)``-sized data to the documented layout."""
    per_out = (problem.m,) if problem.sel_shape != () else ()
    if flat:
        shape = per_out + (problem.n,) * input_dims
    else:
        shape = tuple(problem.sel_shape) + tuple(problem.in_shape) * input_dims
    out = arr.reshape((problem.batch, *shape))
    if not problem.batched:
        out = out[0]
    return out.to(problem.out_dtype).contiguous()


def warn_zero(problem: Problem, arr: torch.Tensor, second_order: bool) -> None:
    """The warnings of an all-zero or non-finite result."""
    if arr.numel() == 0:
        return
    peak = float(arr.detach().abs().amax())  # one pass: NaN propagates, inf stays inf
    if not math.isfinite(peak):
        per_sample = torch.isfinite(arr.detach()).reshape(arr.shape[0], -1).all(1)
        bad = (~per_sample).nonzero().flatten().tolist()[:10]
        warnings.warn(
            f"{problem.api}: the result holds NaN/Inf although x is finite (samples {bad}). "
            "Common causes: torch.where with a singular unselected branch, sqrt or norm at "
            "0, overflow in low precision. Try float64 or torch.autograd.detect_anomaly().",
            NonFiniteResultWarning,
            stacklevel=3,
        )
        return
    if peak != 0:
        return
    if second_order and problem.piecewise_ops:
        warnings.warn(
            f"{problem.api}: the result is all zero because the model's nonlinearities "
            f"({', '.join(problem.piecewise_ops)}) are piecewise linear: their second "
            "derivative is zero almost everywhere and AD does not see the kinks. Use a "
            "smooth activation (Softplus, GELU, SiLU, tanh) if curvature is needed.",
            PiecewiseLinearWarning,
            stacklevel=3,
        )
    elif not second_order:
        warnings.warn(
            f"{problem.api}: the Jacobian is all zero: the selected outputs do not depend "
            "on x. If unexpected, check that f uses its argument (closing over a tensor "
            "instead is a common cause).",
            ZeroDerivativeWarning,
            stacklevel=3,
        )
