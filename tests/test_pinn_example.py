"""The PINN example (examples/pinn_poisson.py) in a tiny configuration."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pinn_poisson.py"


def _load():
    spec = importlib.util.spec_from_file_location("pinn_poisson", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_trains_and_plots(tmp_path, capsys):
    example = _load()
    argv = ["--steps", "8", "--points", "32", "--threads", "0", "--out", str(tmp_path / "p.png")]
    plot = importlib.util.find_spec("matplotlib") is not None
    err = example.main(argv + ([] if plot else ["--no-plot"]))
    out = capsys.readouterr().out
    assert math.isfinite(err) and 0 < err < 2
    assert "relative L2 error" in out and "step     8" in out
    if plot:
        assert (tmp_path / "p.png").stat().st_size > 10_000


def test_example_loss_uses_the_differentiable_laplacian():
    import torch

    example = _load()
    model = example.PoissonNet().double()
    p = torch.rand(16, 2, dtype=torch.float64)
    import hesse

    lap = hesse.laplacian(model, p, batched=True, output=0, create_graph=True)
    h = torch.func.vmap(torch.func.hessian(lambda z: model(z[None])[0, 0]))(p)
    torch.testing.assert_close(lap, h.diagonal(0, -2, -1).sum(-1))
    assert lap.requires_grad
    # the boundary condition holds by construction
    edge = torch.tensor([[0.0, 0.3], [1.0, 0.7], [0.2, 0.0], [0.9, 1.0]], dtype=torch.float64)
    assert float(model(edge).detach().abs().max()) == pytest.approx(0.0, abs=1e-15)
