"""Figures of input-space curvature: a spectral density and the top eigenvectors as images.

Matplotlib is optional (``pip install 'hesse[plot]'``) and imported only when called, as
in :mod:`hesse.plotting`, whose conventions (returned figure, pyplot only when already
imported) this module follows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import UnsupportedInputError
from ..plotting import _CMAP, _require_matplotlib, _symmetric_limit, _to_numpy
from .spectral import Spectrum

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(figsize: tuple[float, float]) -> Figure:
    import sys

    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt

        return plt.figure(figsize=figsize, layout="constrained")
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _image(vector: np.ndarray, image_shape: Sequence[int]) -> np.ndarray:
    """An eigenvector as an ``(rows, cols)`` image; channels are summed in quadrature."""
    shape = tuple(int(s) for s in image_shape)
    if len(shape) == 3:
        arr = vector.reshape(shape)
        return np.sign(arr.sum(0)) * np.sqrt((arr**2).sum(0)) if shape[0] > 1 else arr[0]
    if len(shape) == 2:
        return vector.reshape(shape)
    raise UnsupportedInputError(
        f"hesse.plot_curvature: image_shape must be (rows, cols) or (channels, rows, cols), "
        f"got {shape}."
    )


def plot_curvature(
    spectrum: Spectrum,
    *,
    values: Any = None,
    vectors: Any = None,
    image_shape: Sequence[int] | None = None,
    sigma: float | None = None,
    title: str | None = None,
) -> Figure:
    """Plot a spectral density and, for image inputs, the top eigenvectors as images.

    Args:
        spectrum: One sample's :class:`~hesse.Spectrum` (nodes ``(probes, steps)``).
        values: Eigenvalues ``(k,)`` from :func:`hesse.hessian_eigs`, marked on the density.
        vectors: Their eigenvectors ``(k, *S)``; drawn as images when ``image_shape``
            (``(rows, cols)`` or ``(channels, rows, cols)``) is given, largest first.
        image_shape: The per-sample input shape of an image.
        sigma: Width of the Gaussian smoothing; default 1% of the node range.
        title: Title of the density panel.

    Returns:
        The figure.
    """
    _require_matplotlib("plot_curvature")
    if spectrum.nodes.dim() != 2:
        raise UnsupportedInputError(
            "hesse.plot_curvature: expected one sample's spectrum (nodes of shape "
            f"(probes, steps)), got nodes of shape {tuple(spectrum.nodes.shape)}; index the "
            "batch first, e.g. Spectrum(s.nodes[0], s.weights[0], s.n)."
        )
    nodes = spectrum.nodes.detach()
    lo, hi = float(nodes.min()), float(nodes.max())
    pad = 0.05 * max(hi - lo, 1e-12)
    width = sigma if sigma is not None else 0.01 * max(hi - lo, 1e-12)
    grid = torch.linspace(lo - pad, hi + pad, 1000, dtype=nodes.dtype)
    dens = spectrum.density(grid, width).cpu().double().numpy()
    k = 0 if vectors is None or image_shape is None else len(vectors)
    shown = min(k, 4)
    fig = _figure((4.5 + 2.2 * shown, 3.6))
    axes = fig.subplots(1, 1 + shown, squeeze=False)[0]
    ax = axes[0]
    ax.semilogy(grid.numpy(), np.maximum(dens, 1e-12), linewidth=1.0)
    ax.set_ylim(bottom=max(1e-6, dens.max() * 1e-7))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (smoothed)")
    ax.set_title(title if title is not None else "Hessian spectral density (SLQ)")
    if values is not None:
        for v in _to_numpy(values, "plot_curvature", "values").ravel():
            ax.axvline(v, color="C3", linewidth=0.6, alpha=0.7)
    if shown:
        vals = _to_numpy(values, "plot_curvature", "values").ravel() if values is not None else None
        vecs = _to_numpy(vectors, "plot_curvature", "vectors").reshape(k, -1)
        order = np.argsort(-vals) if vals is not None else np.arange(k)
        for ax, i in zip(axes[1:], order[:shown], strict=False):
            img = _image(vecs[i], image_shape)
            limit = _symmetric_limit(img)
            ax.imshow(img, cmap=_CMAP, vmin=-limit, vmax=limit, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"eigenvector, λ = {vals[i]:.3g}" if vals is not None else f"#{i}")
    return fig
