"""Fusable elementwise kernels of the structured engine, optionally run through torch.compile.

Most of the engine's time goes to GEMMs and convolutions, which ``torch.compile`` leaves
to the same BLAS and oneDNN calls. Its elementwise-and-reduce steps are memory-bound, and
fusing them saves whole passes over ``(d, B, I)`` tensors. Measured on the 2-core CPU
(``1024 x 8 x 128``): the Taylor-mode curvature kernel is 3-4x faster compiled; the
tangent push and the Gram product are not faster (one pass already; the product is a
BLAS call), so they stay eager.

Compiling is off by default (``hesse.set_compile(True)`` turns it on): the first call per
shape and dtype compiles for about a second and needs a C++ compiler on CPU. If
compiling fails, hesse warns once and runs the kernels eagerly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from ..errors import HesseWarning

_COMPILE = False
_COMPILED: dict[str, Callable[..., torch.Tensor]] = {}


def set_compile(enabled: bool) -> None:
    """Runs the structured engine's fusable kernels through ``torch.compile`` (off by default).

    Args:
        enabled: Whether to compile them (each compiles on its first call per shape).
    """
    global _COMPILE
    _COMPILE = bool(enabled)


def compiling() -> bool:
    """Whether :func:`set_compile` is on (and no compile has failed since)."""
    return _COMPILE


def taylor_first(d2: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``phi'' * sum_i J_i^2`` (the Laplacian coefficient of a node whose input has none).

    Args:
        d2: ``phi''(a)``, shaped like ``a``.
        t: Tangents ``(d, *a.shape)``.

    Returns:
        ``(1, *a.shape)``.
    """
    return d2 * (t * t).sum(0, keepdim=True)


def taylor_collapsed(
    d1: torch.Tensor, d2: torch.Tensor, t: torch.Tensor, coeff: torch.Tensor
) -> torch.Tensor:
    """``phi' * S + phi'' * sum_i J_i^2``: the Laplacian coefficient of an elementwise node.

    Args:
        d1: ``phi'(a)``, shaped like ``a``.
        d2: ``phi''(a)``.
        t: Tangents ``(d, *a.shape)``.
        coeff: The input's coefficient ``(1, *a.shape)``.

    Returns:
        ``(1, *a.shape)``.
    """
    return d1 * coeff + d2 * (t * t).sum(0, keepdim=True)


def gram_diag(jt: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Diagonal of ``J^T diag(w) J`` per sample: ``(B, d)`` from ``jt`` ``(B, d, I)``."""
    return (jt * jt * w).sum(-1)


KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "taylor_first": taylor_first,
    "taylor_collapsed": taylor_collapsed,
    "gram_diag": gram_diag,
}


def run(name: str, *args: torch.Tensor) -> torch.Tensor:
    """Runs kernel ``name``, compiled when :func:`set_compile` is on."""
    global _COMPILE
    fn = KERNELS[name]
    if not _COMPILE:
        return fn(*args)
    compiled = _COMPILED.get(name)
    if compiled is None:
        compiled = _COMPILED[name] = torch.compile(fn, dynamic=False)
    try:
        return compiled(*args)
    except Exception as exc:  # no C++ compiler, unsupported backend, ...
        _COMPILE = False
        warnings.warn(
            f"hesse: torch.compile of the structured engine's kernels failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); running them "
            "eagerly. hesse.set_compile(False) silences this.",
            HesseWarning,
            stacklevel=2,
        )
        return fn(*args)
