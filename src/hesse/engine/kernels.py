"""Fusable elementwise kernels of the structured engine, optionally run through torch.compile.

Most of the engine's time goes to GEMMs and convolutions, which ``torch.compile`` leaves
to the same BLAS and oneDNN calls. Its elementwise-and-reduce steps are memory-bound, and
fusing them saves whole passes over ``(d, B, I)`` tensors. Measured on the 2-core CPU
(``1024 x 8 x 128``): the Taylor-mode curvature kernel is 3-4x faster compiled; the
tangent push and the Gram product are not faster (one pass already; the product is a
BLAS call), so they stay eager.

Compiling the kernels is off by default (``with hesse.settings(compile=True):`` turns it
on; the default ``"auto"`` compiles whole derivative programs instead, when that pays): the
first call per shape and dtype compiles for about a second and needs a C++ compiler on
CPU. If compiling fails, hesse warns once and runs that kernel eagerly.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import torch

from ..errors import HesseWarning
from ..settings import settings

_LOCK = threading.Lock()
_COMPILED: dict[tuple[str, torch.dtype, str], Callable[..., torch.Tensor]] = {}
_FAILED: set[str] = set()


def compiling() -> bool:
    """Whether the calls in this context compile the kernels (``hesse.settings(compile=True)``).

    Under ``compile="auto"`` the kernels run eagerly: the whole derivative program is what
    gets compiled when that pays (:mod:`.compiling`).
    """
    return settings.current().compile is True


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
    """Runs kernel ``name``, compiled under ``hesse.settings(compile=True)``."""
    fn = KERNELS[name]
    if not compiling() or name in _FAILED:
        return fn(*args)
    with _LOCK:  # one compiled function per kernel, dtype and device type
        key = (name, args[0].dtype, args[0].device.type)
        compiled = _COMPILED.get(key)
        if compiled is None:
            compiled = _COMPILED[key] = torch.compile(fn, dynamic=False)
    try:
        return compiled(*args)
    except Exception as exc:  # no C++ compiler, unsupported backend, ...
        with _LOCK:
            first = name not in _FAILED
            _FAILED.add(name)
        if first:
            warnings.warn(
                f"hesse: torch.compile of the structured engine's kernel {name} failed "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); running it "
                "eagerly.",
                HesseWarning,
                stacklevel=2,
            )
        return fn(*args)
