"""Input-space curvature of a small CNN on an image, without forming the Hessian.

Trains a small CNN on scikit-learn's 8x8 digits for a few seconds, then for one image:
the top eigenpairs of the predicted logit's input Hessian (hesse.hessian_eigs), its
spectral density (hesse.hessian_spectrum), and a trace estimate with an error bar
against the exact Laplacian. Writes docs/curvature.png.

Run: python examples/curvature_demo.py [--out docs/curvature.png]
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

import hesse
from hesse.curvature.plots import plot_curvature


def train() -> tuple[nn.Module, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.Softplus(), nn.Conv2d(8, 16, 3, padding=1),
        nn.Softplus(), nn.Flatten(), nn.Linear(16 * 64, 10),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.double().eval(), x.double()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="docs/curvature.png")
    args = parser.parse_args()
    model, images = train()
    x = images[:1]  # (1, 1, 8, 8)
    label = int(model(x).argmax())
    g = torch.Generator().manual_seed(0)
    values, vectors, residuals = hesse.hessian_eigs(
        model, x, 4, output=label, batched=True, generator=g
    )
    spectrum = hesse.hessian_spectrum(
        model, x, output=label, batched=True, num_probes=16, lanczos_steps=30, generator=g
    )
    est = hesse.trace_estimate(
        model, x, output=label, batched=True, num_matvecs=40, method="xtrace", generator=g
    )
    exact = hesse.laplacian(model, x, output=label, batched=True)
    print(f"top eigenvalues of logit {label}: {values[0].tolist()}")
    print(f"largest residual: {float(residuals.max()):.2e}")
    low, high = est.ci(0.95)
    print(
        f"trace: XTrace {float(est.value[0]):.4f} +- {float(est.stderr[0]):.4f} "
        f"(95% CI [{float(low[0]):.4f}, {float(high[0]):.4f}]), exact {float(exact[0]):.4f}"
    )
    one = hesse.Spectrum(spectrum.nodes[0], spectrum.weights[0], spectrum.n)
    fig = plot_curvature(
        one, values=values[0], vectors=vectors[0], image_shape=(1, 8, 8),
        title=f"input Hessian of logit {label}, 8x8 digit",
    )  # fmt: skip
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
