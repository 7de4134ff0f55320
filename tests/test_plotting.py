from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402

from hesse.errors import HesseError, UnsupportedInputError  # noqa: E402
from hesse.plotting import plot_diagonal, plot_hessian, plot_spectrum  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures() -> Iterator[None]:
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def _sym(n: int = 16, seed: int = 0) -> torch.Tensor:
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a + a.T


def _clim(fig: Figure) -> tuple[float, float]:
    return fig.axes[0].images[0].get_clim()


def test_plot_hessian_symmetric_limits_from_tensor() -> None:
    h = _sym()
    fig = plot_hessian(h, title="H")
    assert isinstance(fig, Figure)
    vmin, vmax = _clim(fig)
    assert vmin == -vmax
    assert vmax == pytest.approx(float(h.abs().max()))
    assert fig.axes[0].get_title() == "H"
    assert len(fig.axes) == 2  # heatmap and colorbar


def test_plot_hessian_accepts_numpy_grad_and_unflattened() -> None:
    h = _sym(16)
    for value in (h.numpy(), h.float().requires_grad_(), h.reshape(4, 4, 4, 4)):
        fig = plot_hessian(value, image_shape=(4, 4))
        assert fig.axes[0].images[0].get_array().shape == (16, 16)


def test_plot_hessian_positive_only_still_centred() -> None:
    h = torch.ones(9, 9)
    h[0, 0] = 3.0
    assert _clim(plot_hessian(h)) == (-3.0, 3.0)


def test_plot_hessian_zero_and_nonfinite() -> None:
    assert _clim(plot_hessian(torch.zeros(4, 4))) == (-1.0, 1.0)
    h = torch.tensor([[1.0, float("nan")], [float("inf"), -2.0]])
    assert _clim(plot_hessian(h)) == (-2.0, 2.0)


def test_plot_hessian_on_given_axes(tmp_path) -> None:
    fig = Figure()
    ax = fig.add_subplot()
    assert plot_hessian(_sym(4), ax=ax) is fig
    fig.savefig(tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pyplot_figures_when_pyplot_is_in_use() -> None:
    import matplotlib.pyplot as plt

    before = set(plt.get_fignums())
    fig = plot_spectrum(_sym(4))
    assert fig.number not in before
    assert fig.number in plt.get_fignums()


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 3), (), (0, 0), (5,), (2, 3, 3, 2)], ids=str)
def test_plot_hessian_bad_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(UnsupportedInputError, match=r"hesse\.plot_hessian: expected one Hessian"):
        plot_hessian(torch.zeros(shape))


def test_plot_hessian_bad_image_shape_and_dtype() -> None:
    with pytest.raises(UnsupportedInputError, match="image_shape"):
        plot_hessian(_sym(16), image_shape=(3, 5))
    with pytest.raises(UnsupportedInputError, match="image_shape"):
        plot_hessian(_sym(16), image_shape=(2, 2, 4))
    with pytest.raises(HesseError, match="complex"):
        plot_hessian(torch.zeros(2, 2, dtype=torch.complex64))
    with pytest.raises(HesseError, match="real numbers"):
        plot_hessian(np.array([["a", "b"], ["c", "d"]]))


@pytest.mark.parametrize("shape", [(64,), (8, 8), (1, 8, 8)], ids=str)
def test_plot_diagonal(shape: tuple[int, ...]) -> None:
    d = torch.linspace(-1.0, 4.0, 64).reshape(shape)
    fig = plot_diagonal(d, (1, 8, 8))
    assert fig.axes[0].images[0].get_array().shape == (8, 8)
    assert _clim(fig) == (-4.0, 4.0)


def test_plot_diagonal_bad_shapes() -> None:
    with pytest.raises(UnsupportedInputError, match="holding 64 elements"):
        plot_diagonal(torch.zeros(64), (8, 7))
    with pytest.raises(UnsupportedInputError, match="empty"):
        plot_diagonal(torch.zeros(0), (0, 0))


def test_plot_spectrum_sorted_eigenvalues() -> None:
    h = torch.diag(torch.tensor([3.0, -1.0, 0.5, 2.0]))
    fig = plot_spectrum(h)
    ydata = fig.axes[0].lines[0].get_ydata()
    np.testing.assert_allclose(ydata, [-1.0, 0.5, 2.0, 3.0])
    assert "1 negative, 3 positive" in fig.axes[0].get_title()


def test_plot_spectrum_rejects_nonfinite_and_nonsquare() -> None:
    with pytest.raises(UnsupportedInputError, match="NaN/Inf"):
        plot_spectrum(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(UnsupportedInputError):
        plot_spectrum(torch.zeros(2, 3))
