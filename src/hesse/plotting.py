"""Matplotlib figures for Hessians, Hessian diagonals and spectra.

Matplotlib is an optional dependency (``pip install 'hesse[plot]'``); it is imported
only when a function of this module is called. Every function accepts a
:class:`torch.Tensor` (any device, with or without grad) or anything
:func:`numpy.asarray` understands, and returns the :class:`matplotlib.figure.Figure`
it drew on.

Figures are made with :mod:`matplotlib.pyplot` when the caller has already imported it
(so ``plt.show()`` shows them), and as bare :class:`~matplotlib.figure.Figure` objects
otherwise: those need no display and no GUI backend, render with Agg on
``fig.savefig(...)``, and are never kept alive by pyplot's figure registry.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from hesse.errors import UnsupportedInputError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_diagonal", "plot_hessian", "plot_spectrum"]

_INSTALL_HINT = "pip install 'hesse[plot]'"
_CMAP = "RdBu_r"


def _require_matplotlib(caller: str) -> None:
    """Import matplotlib, or raise an ImportError that says how to install it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"hesse.{caller}: matplotlib is required for plotting; {_INSTALL_HINT}"
        ) from exc


def _to_numpy(value: Any, caller: str, name: str) -> np.ndarray:
    """Convert a tensor or array-like to a float64 numpy array.

    Args:
        value: A ``torch.Tensor`` or array-like of real numbers, any shape.
        caller: Public function name, used in error messages.
        name: Argument name, used in error messages.

    Returns:
        A float64 array of the same shape.

    Raises:
        UnsupportedInputError: If the values are not real numbers.
    """
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
        if value.is_complex():
            raise UnsupportedInputError(
                f"hesse.{caller}: {name} must be real, got a complex tensor ({value.dtype})"
            )
        value = value.double().numpy()
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise UnsupportedInputError(
            f"hesse.{caller}: {name} must hold real numbers, got dtype {arr.dtype}"
        )
    return arr.astype(np.float64)


def _as_square(value: Any, caller: str) -> np.ndarray:
    """Return ``value`` as an ``(n, n)`` float64 array, or raise.

    Args:
        value: A Hessian of shape ``(n, n)``, or ``S + S`` for an input shape ``S``
            (e.g. ``(8, 8, 8, 8)`` for an 8x8 image), as returned with ``flat=False``.
        caller: Public function name, used in error messages.

    Returns:
        The matrix, shape ``(n, n)`` with ``n = prod(S)``.

    Raises:
        UnsupportedInputError: If the shape is not ``(n, n)`` or ``S + S`` with n > 0.
    """
    arr = _to_numpy(value, caller, "H")
    half = arr.ndim // 2
    if arr.ndim == 0 or arr.ndim % 2 or arr.shape[:half] != arr.shape[half:] or arr.size == 0:
        raise UnsupportedInputError(
            f"hesse.{caller}: expected one Hessian of shape (n, n) or S + S, got shape "
            f"{tuple(arr.shape)}; for batched or multi-output results select one, e.g. H[0]"
        )
    n = math.prod(arr.shape[:half])
    return arr.reshape(n, n)


def _check_image_shape(image_shape: Sequence[int], n: int, caller: str) -> tuple[int, int]:
    """Validate an image shape against ``n`` input elements and return ``(rows, cols)``.

    Args:
        image_shape: Per-sample input shape, e.g. ``(8, 8)`` or ``(1, 8, 8)``; leading
            dimensions of size one (channels) are dropped.
        n: Number of input elements the shape must hold.
        caller: Public function name, used in error messages.

    Returns:
        The 2-D image shape ``(rows, cols)``.

    Raises:
        UnsupportedInputError: If the shape is not 2-D after dropping leading ones, or
            does not hold ``n`` elements.
    """
    shape = tuple(int(s) for s in image_shape)
    while len(shape) > 2 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2 or min(shape) < 1 or math.prod(shape) != n:
        raise UnsupportedInputError(
            f"hesse.{caller}: image_shape must be (rows, cols) (leading ones allowed) "
            f"holding {n} elements, got {tuple(image_shape)}"
        )
    return shape[0], shape[1]


def _symmetric_limit(arr: np.ndarray) -> float:
    """Largest finite absolute value of ``arr``, or 1.0 when there is none or it is 0."""
    finite = np.abs(arr[np.isfinite(arr)])
    limit = float(finite.max()) if finite.size else 0.0
    return limit if limit > 0 else 1.0


def _new_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """Return ``(figure, axes)``: ``ax`` and its figure, or a new single-axes figure."""
    if ax is not None:
        return ax.figure, ax
    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=figsize, layout="constrained")
    else:
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def plot_hessian(
    H: Any,
    *,
    ax: Axes | None = None,
    title: str | None = None,
    image_shape: Sequence[int] | None = None,
) -> Figure:
    """Draw a Hessian as a heatmap with a diverging colormap centred on zero.

    The colour limits are ``[-a, a]`` with ``a`` the largest finite ``|H_ij|``, so white
    is exactly zero, red is positive curvature and blue negative.

    Args:
        H: One Hessian, shape ``(n, n)``, or ``S + S`` for an input shape ``S``
            (``hesse.hessian(..., flat=False)``), as a tensor or array.
        ax: Axes to draw on; a new figure is made when ``None``.
        title: Axes title; defaults to ``"Hessian (n x n)"``.
        image_shape: Shape of the input image, e.g. ``(8, 8)`` or ``(1, 8, 8)``, with
            ``prod(image_shape) == n``. When given, thin lines separate image rows
            and the ticks are labelled by image row.

    Returns:
        The figure holding the heatmap and its colorbar.

    Raises:
        UnsupportedInputError: If ``H`` is not square, or ``image_shape`` does not fit.
        ImportError: If matplotlib is not installed.
    """
    _require_matplotlib("plot_hessian")
    mat = _as_square(H, "plot_hessian")
    n = mat.shape[0]
    rows_cols = None if image_shape is None else _check_image_shape(image_shape, n, "plot_hessian")
    fig, ax = _new_axes(ax, (6.0, 5.0))
    limit = _symmetric_limit(mat)
    im = ax.imshow(mat, cmap=_CMAP, vmin=-limit, vmax=limit, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title if title is not None else f"Hessian ({n} x {n})")
    if rows_cols is None:
        ax.set_xlabel("input index j")
        ax.set_ylabel("input index i")
    else:
        _mark_image_rows(ax, *rows_cols)
    return fig


def _mark_image_rows(ax: Axes, rows: int, cols: int) -> None:
    """Draw faint lines between image rows and put the ticks at the row starts."""
    starts = np.arange(rows) * cols
    for pos in starts[1:] - 0.5:
        ax.axhline(pos, color="0.6", linewidth=0.4)
        ax.axvline(pos, color="0.6", linewidth=0.4)
    step = max(1, rows // 8)
    ticks = starts[::step]
    labels = [str(r) for r in range(0, rows, step)]
    ax.set_xticks(ticks, labels, fontsize="small")
    ax.set_yticks(ticks, labels, fontsize="small")
    ax.set_xlabel(f"input pixel j (ticks: start of image row, {cols} pixels each)")
    ax.set_ylabel("input pixel i (by image row)")


def plot_diagonal(
    diag: Any,
    image_shape: Sequence[int],
    *,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Draw a Hessian diagonal as an image, on a diverging colormap centred on zero.

    Args:
        diag: The diagonal ``d_i = H_ii``, shape ``(n,)`` or the input shape ``S``
            (``hesse.hessian_diag``), as a tensor or array.
        image_shape: Shape of the input image, e.g. ``(8, 8)`` or ``(1, 8, 8)``, with
            ``prod(image_shape) == n``.
        ax: Axes to draw on; a new figure is made when ``None``.
        title: Axes title; defaults to ``"Hessian diagonal"``.

    Returns:
        The figure holding the image and its colorbar.

    Raises:
        UnsupportedInputError: If ``diag`` is empty or its size does not match
            ``image_shape``.
        ImportError: If matplotlib is not installed.
    """
    _require_matplotlib("plot_diagonal")
    arr = _to_numpy(diag, "plot_diagonal", "diag")
    if arr.size == 0:
        raise UnsupportedInputError("hesse.plot_diagonal: diag is empty")
    rows, cols = _check_image_shape(image_shape, arr.size, "plot_diagonal")
    fig, ax = _new_axes(ax, (4.5, 4.0))
    limit = _symmetric_limit(arr)
    im = ax.imshow(
        arr.reshape(rows, cols), cmap=_CMAP, vmin=-limit, vmax=limit, interpolation="nearest"
    )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title if title is not None else "Hessian diagonal")
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


def plot_spectrum(H: Any, *, ax: Axes | None = None, title: str | None = None) -> Figure:
    """Plot the sorted eigenvalues of a Hessian.

    The matrix is symmetrised, ``(H + H^T) / 2``, and its eigenvalues computed in float64
    with :func:`numpy.linalg.eigvalsh`, then drawn in ascending order with a line at
    zero; the title gives the counts of negative and positive eigenvalues.

    Args:
        H: One Hessian, shape ``(n, n)``, or ``S + S`` for an input shape ``S``, as a
            tensor or array. Must be finite.
        ax: Axes to draw on; a new figure is made when ``None``.
        title: Axes title; defaults to a summary of the signs of the eigenvalues.

    Returns:
        The figure holding the spectrum.

    Raises:
        UnsupportedInputError: If ``H`` is not square or holds NaN or Inf.
        ImportError: If matplotlib is not installed.
    """
    _require_matplotlib("plot_spectrum")
    mat = _as_square(H, "plot_spectrum")
    if not np.isfinite(mat).all():
        raise UnsupportedInputError(
            f"hesse.plot_spectrum: H holds {int((~np.isfinite(mat)).sum())} NaN/Inf entries; "
            "eigenvalues need a finite matrix"
        )
    eig = np.linalg.eigvalsh(0.5 * (mat + mat.T))
    fig, ax = _new_axes(ax, (5.5, 4.0))
    ax.plot(np.arange(eig.size), eig, marker=".", linestyle="-", linewidth=0.8)
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    if title is None:
        title = f"Hessian spectrum: {(eig < 0).sum()} negative, {(eig > 0).sum()} positive"
    ax.set_title(title)
    ax.set_xlabel("index (ascending)")
    ax.set_ylabel("eigenvalue")
    return fig
