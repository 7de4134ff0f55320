"""A physics-informed network for the 2-D Poisson equation, trained with hesse's Laplacian.

Problem: ``-Laplace(u) = f`` on the unit square with ``u = 0`` on the boundary, for
``f(x, y) = 2 pi^2 sin(pi x) sin(pi y)``; the exact solution is ``u = sin(pi x) sin(pi y)``.

The network ``u(x, y) = x (1 - x) y (1 - y) N(x, y)`` meets the boundary condition by
construction, so the loss is the mean squared PDE residual at random collocation points.
The residual needs the Laplacian of the network at every point, kept differentiable so that
``loss.backward()`` reaches the weights: ``hesse.laplacian(..., create_graph=True)``.

Run: ``python examples/pinn_poisson.py`` (about a minute on a CPU); it prints the relative
L2 error against the exact solution and writes ``pinn_poisson.png`` (needs matplotlib,
``pip install "hesse[plot]"``). ``--steps 20 --no-plot`` is a quick check.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn

import hesse

PI = math.pi


class PoissonNet(nn.Module):
    """``u(p) = x (1 - x) y (1 - y) N(p)``: zero on the boundary of the unit square."""

    def __init__(self, width: int = 32, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(2, width), nn.Tanh()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.Tanh()]
        self.body = nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        """``(B, 2) -> (B, 1)``."""
        bump = (p * (1 - p)).prod(-1, keepdim=True)
        return bump * self.body(p)


def exact(p: torch.Tensor) -> torch.Tensor:
    """``u(x, y) = sin(pi x) sin(pi y)``, shape ``(B,)``."""
    return torch.sin(PI * p[:, 0]) * torch.sin(PI * p[:, 1])


def source(p: torch.Tensor) -> torch.Tensor:
    """``f = -Laplace(u) = 2 pi^2 sin(pi x) sin(pi y)``, shape ``(B,)``."""
    return 2 * PI**2 * exact(p)


def train(steps: int, points: int, lr: float, seed: int, log_every: int) -> nn.Module:
    """Adam on the mean squared residual ``(Laplace(u) + f)^2``, fresh points every step."""
    torch.manual_seed(seed)
    model = PoissonNet().double()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr / 50)
    for step in range(1, steps + 1):
        p = torch.rand(points, 2, dtype=torch.float64)
        lap = hesse.laplacian(model, p, batched=True, output=0, create_graph=True)  # (B,)
        loss = ((lap + source(p)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == 1):
            print(f"step {step:5d}  loss {loss.item():.3e}", flush=True)
    return model


def relative_l2(model: nn.Module, grid: int = 101) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Relative L2 error on a ``grid x grid`` mesh; also the learned and exact fields."""
    t = torch.linspace(0, 1, grid, dtype=torch.float64)
    p = torch.stack(torch.meshgrid(t, t, indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        u = model(p)[:, 0]
    ue = exact(p)
    err = (torch.linalg.vector_norm(u - ue) / torch.linalg.vector_norm(ue)).item()
    return err, u.reshape(grid, grid), ue.reshape(grid, grid)


def plot(learned: torch.Tensor, truth: torch.Tensor, err: float, path: Path) -> None:
    """Learned, exact and error fields side by side, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), constrained_layout=True)
    panels = [
        (learned, "PINN u (hesse.laplacian in the loss)", "viridis"),
        (truth, "exact u = sin(pi x) sin(pi y)", "viridis"),
        (learned - truth, f"error (relative L2 {err:.1e})", "RdBu_r"),
    ]
    for ax, (field, title, cmap) in zip(axes, panels, strict=True):
        lim = float(field.abs().max()) if cmap == "RdBu_r" else None
        im = ax.imshow(
            field.numpy(),
            origin="lower",
            extent=(0, 1, 0, 1),
            cmap=cmap,
            vmin=-lim if lim else None,
            vmax=lim,
        )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        fig.colorbar(im, ax=ax, shrink=0.85)
    fig.suptitle("2-D Poisson  -Laplace(u) = 2 pi^2 sin(pi x) sin(pi y),  u = 0 on the boundary")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> float:
    """Trains, prints the relative L2 error, plots; returns the error."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--points", type=int, default=256, help="collocation points per step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (small batches gain little from more)",
    )
    ap.add_argument("--out", type=Path, default=Path("pinn_poisson.png"))
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = train(args.steps, args.points, args.lr, args.seed, max(1, args.steps // 10))
    seconds = time.perf_counter() - start
    err, learned, truth = relative_l2(model)
    print(f"trained {args.steps} steps in {seconds:.1f} s; relative L2 error {err:.3e}")
    if not args.no_plot:
        plot(learned, truth, err, args.out)
        print(f"wrote {args.out}")
    return err


if __name__ == "__main__":
    main()
