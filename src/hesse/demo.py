"""The ``hesse demo``: input Hessians of a small CNN trained on handwritten digits.

Everything runs offline on the CPU in well under a minute:

1. train a small smooth CNN (softplus/tanh, so second derivatives are not zero) on
   scikit-learn's bundled 8x8 digits (:func:`sklearn.datasets.load_digits`, no download);
2. take the Hessian of the predicted class's logit with respect to one test image,
   a ``64 x 64`` matrix, with ``hesse.hessian(model, x, output=pred, flat=True)``;
3. take per-sample Hessians for a batch of test images (``batched=True``), each of its
   own predicted class's logit, and time them against :func:`torch.func.hessian`;
4. save a PNG with the Hessian heatmap, its diagonal as an image and the input image.

The optional dependencies are scikit-learn and matplotlib: ``pip install 'hesse[demo]'``.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

import hesse
from hesse.planning.tuning import settle

__all__ = ["DemoResult", "PredictedLogit", "build_model", "format_summary", "run_demo"]

IMAGE_SHAPE = (8, 8)
_INSTALL_HINT = "pip install 'hesse[demo]'"


@dataclass(frozen=True)
class DemoSettings:
    """Knobs of one demo run.

    Attributes:
        epochs: Training epochs over the ~1400 training images.
        batch: Number of test images B for the per-sample Hessians.
        repeats: Timed repeats of each method (the median is reported).
    """

    epochs: int
    batch: int
    repeats: int


FULL = DemoSettings(epochs=15, batch=256, repeats=3)
QUICK = DemoSettings(epochs=3, batch=32, repeats=1)


@dataclass(frozen=True)
class DemoResult:
    """What the demo computed, for printing and for tests.

    Attributes:
        accuracy: Test accuracy of the trained classifier, in [0, 1].
        n_test: Number of test images.
        label: True class of the single explained image.
        pred: Predicted class of that image.
        hessian_shape: Shape of its Hessian, ``(64, 64)``.
        batch_shape: Shape of the batch of per-sample Hessians, ``(B, 64, 64)``.
        hesse_seconds: Median time of the batched ``hesse.hessian`` call.
        func_seconds: Median time of the same quantity with ``torch.func``.
        max_abs_diff: Largest absolute difference between the two batched results.
        max_abs_hessian: Largest absolute entry of the batched result (for scale).
        single_vs_batch_diff: Largest difference between the single-image Hessian and
            the same image's entry of the batched result.
        diag_diff: Largest difference between ``hesse.hessian_diag`` and the diagonal
            of the single-image Hessian.
        png_path: Where the figure was saved, or ``None`` with ``plot=False``.
        tuning: What ``strategy="auto"`` settled on and the timings it saw ("" if none).
    """

    accuracy: float
    n_test: int
    label: int
    pred: int
    hessian_shape: tuple[int, ...]
    batch_shape: tuple[int, ...]
    hesse_seconds: float
    func_seconds: float
    max_abs_diff: float
    max_abs_hessian: float
    single_vs_batch_diff: float
    diag_diff: float
    png_path: Path | None
    tuning: str = ""


class PredictedLogit(nn.Module):
    """The logit of each sample's own predicted class, as a model with one output.

    ``forward(x)[b] = logits[b, argmax(logits[b])]``. The argmax is locally constant,
    so away from ties the derivatives equal those of the fixed-class logit: this gives
    per-sample Hessians of each image's predicted class in one batched call (an ``int``
    ``output=`` would pick the same class for every sample).

    Args:
        classifier: Maps ``(B, 1, 8, 8)`` images to ``(B, C)`` logits.
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        """Return the predicted-class logits.

        Args:
            x: Images, shape ``(B, 1, 8, 8)``.

        Returns:
            Logits of the predicted classes, shape ``(B,)``.
        """
        logits = self.classifier(x)
        return logits.gather(-1, logits.argmax(-1, keepdim=True)).squeeze(-1)


def build_model(seed: int) -> nn.Module:
    """Build the untrained CNN with a fixed initialisation.

    conv 1->8 3x3, softplus, conv 8->16 3x3, tanh, 2x2 average pool, linear 256->10.
    All nonlinearities are smooth, so input Hessians are not identically zero. The
    parameters are float32 whatever the default dtype.

    Args:
        seed: Seed of the initialisation; the global RNG state is left untouched.

    Returns:
        The model, mapping ``(B, 1, 8, 8)`` images to ``(B, 10)`` logits.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.Softplus(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 10),
        ).to(torch.float32)  # whatever torch's default dtype is


def load_data(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Load the bundled digits and split them 80/20 with a fixed permutation.

    Args:
        seed: Seed of the split.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: images of shape ``(N, 1, 8, 8)`` scaled
        to [0, 1] (float32) and labels of shape ``(N,)`` (int64).

    Raises:
        ImportError: If scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(f"hesse demo: scikit-learn is required; {_INSTALL_HINT}") from exc
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = len(labels) // 5
    test, train = perm[:n_test], perm[n_test:]
    return images[train], labels[train], images[test], labels[test]


def train(
    model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, seed: int, progress: bool
) -> None:
    """Train ``model`` in place with Adam and cross-entropy, then put it in eval mode.

    Args:
        model: Maps ``(B, 1, 8, 8)`` to ``(B, 10)`` logits.
        x: Training images, shape ``(N, 1, 8, 8)``.
        y: Labels, shape ``(N,)``.
        epochs: Passes over the data, in mini-batches of 64.
        seed: Seed of the shuffling.
        progress: Show a tqdm bar on stderr.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    bar = tqdm(range(epochs), desc="training", unit="epoch", disable=not progress, file=sys.stderr)
    for _ in bar:
        for idx in torch.randperm(len(y), generator=gen).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def torch_func_hessians(f: nn.Module, x: Tensor) -> Tensor:
    """Reference per-sample Hessians with ``torch.func`` (vmap of forward-over-reverse).

    Args:
        f: Maps ``(B, *S)`` to ``(B,)``.
        x: Inputs, shape ``(B, *S)``.

    Returns:
        Per-sample Hessians, shape ``(B, n, n)`` with ``n = prod(S)``.
    """

    def one(xi: Tensor) -> Tensor:
        return f(xi.unsqueeze(0))[0]

    with torch.no_grad():  # no graph to the parameters; torch.func ignores an outer no_grad
        hess = torch.func.vmap(torch.func.hessian(one))(x)
    return hess.reshape(x.shape[0], x[0].numel(), x[0].numel())


def median_time(fn: Callable[[], Tensor], repeats: int) -> tuple[float, Tensor]:
    """Run ``fn`` once to warm up, then ``repeats`` times.

    Args:
        fn: The computation to time.
        repeats: Number of timed runs (at least 1).

    Returns:
        ``(median seconds, result of the last run)``.
    """
    result = fn()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def tuning_pending(f: nn.Module, xb: Tensor) -> bool:
    """Whether ``strategy="auto"`` is still timing (or watching) these per-sample Hessians."""
    record = hesse.plan(f, xb, "hessian", batched=True, flat=True).tuning
    return record is not None and record.pending


def time_both(
    f: nn.Module, xb: Tensor, *, repeats: int, progress: bool
) -> tuple[float, Tensor, float, Tensor]:
    """Time the same per-sample Hessians with hesse and with ``torch.func``.

    Args:
        f: Maps ``(B, *S)`` to ``(B,)``.
        xb: Inputs, shape ``(B, *S)``.
        repeats: Timed repeats of each method (after one warm-up run).
        progress: Show a tqdm bar on stderr.

    Returns:
        ``(hesse seconds, hesse result, torch.func seconds, torch.func result)``,
        medians and results of shape ``(B, n, n)``.
    """
    bar = tqdm(total=2, desc="timing", unit="method", disable=not progress, file=sys.stderr)
    with bar:
        # the first calls of auto time its candidates: report the steady state after them
        settle(lambda: hesse.hessian(f, xb, batched=True, flat=True), lambda: tuning_pending(f, xb))
        t_hesse, h_hesse = median_time(
            lambda: hesse.hessian(f, xb, batched=True, flat=True), repeats
        )
        bar.update()
        t_func, h_func = median_time(lambda: torch_func_hessians(f, xb), repeats)
        bar.update()
    return t_hesse, h_hesse, t_func, h_func


def _max_diff(a: Tensor, b: Tensor) -> float:
    """Largest absolute elementwise difference of two same-shaped tensors."""
    return float((a.detach() - b.detach()).abs().max())


def run_demo(
    out_dir: Path | str = "hesse-demo",
    *,
    quick: bool = False,
    plot: bool = True,
    seed: int = 0,
    progress: bool = False,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Train the digits CNN, compute its input Hessians, compare and plot them.

    Args:
        out_dir: Folder for ``hessian.png``; created if missing.
        quick: Fewer epochs, a smaller batch and one timed repeat (for tests).
        plot: Save the PNG (needs matplotlib).
        seed: Seed of the data split, the initialisation and the shuffling.
        progress: Show tqdm bars on stderr.
        echo: Receives the progress lines (the memory plan, the steps).

    Returns:
        The numbers and the PNG path; see :class:`DemoResult`.
    """
    cfg = QUICK if quick else FULL
    x_train, y_train, x_test, y_test = load_data(seed)
    model = build_model(seed)
    train(model, x_train, y_train, epochs=cfg.epochs, seed=seed, progress=progress)
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(-1) == y_test).float().mean())
        pred = int(model(x_test[:1]).argmax())

    x = x_test[:1]
    echo(f"[1] hesse.hessian(model, x, output={pred}, flat=True), x: {tuple(x.shape)}")
    hess = hesse.hessian(model, x, output=pred, flat=True)
    diag = hesse.hessian_diag(model, x, output=pred, flat=True)

    xb = x_test[: cfg.batch]
    f = PredictedLogit(model).eval()
    echo(f"[2] per-sample Hessians of each image's predicted logit, x: {tuple(xb.shape)}")
    echo(str(hesse.plan(f, xb, "hessian", batched=True)))
    t_hesse, hb, t_func, hf = time_both(f, xb, repeats=cfg.repeats, progress=progress)

    png = None
    if plot:
        png = Path(out_dir) / "hessian.png"
        save_demo_figure(hess, diag, x[0, 0], png, label=int(y_test[0]), pred=pred)
    return DemoResult(
        accuracy=accuracy,
        n_test=len(y_test),
        label=int(y_test[0]),
        pred=pred,
        hessian_shape=tuple(hess.shape),
        batch_shape=tuple(hb.shape),
        hesse_seconds=t_hesse,
        tuning=str(hesse.plan(f, xb, "hessian", batched=True, flat=True).tuning or ""),
        func_seconds=t_func,
        max_abs_diff=_max_diff(hb, hf),
        max_abs_hessian=float(hf.detach().abs().max()),
        single_vs_batch_diff=_max_diff(hess, hb[0]),
        diag_diff=_max_diff(diag, hess.diagonal()),
        png_path=png,
    )


def save_demo_figure(
    hess: Tensor, diag: Tensor, image: Tensor, path: Path, *, label: int, pred: int
) -> None:
    """Save the three-panel figure: Hessian heatmap, its diagonal, the input image.

    Args:
        hess: Hessian of the predicted logit, shape ``(64, 64)``.
        diag: Its diagonal, shape ``(64,)``.
        image: The input image, shape ``(8, 8)``.
        path: PNG file to write; its folder is created if missing.
        label: True class, for the title.
        pred: Predicted class, for the title.
    """
    from matplotlib.figure import Figure

    from hesse.plotting import plot_diagonal, plot_hessian

    fig = Figure(figsize=(11.0, 6.0), layout="constrained")
    axes = fig.subplot_mosaic([["H", "X"], ["H", "D"]], width_ratios=[2.2, 1.0])
    plot_hessian(
        hess,
        ax=axes["H"],
        image_shape=IMAGE_SHAPE,
        title=f"Hessian of logit[{pred}] w.r.t. the 64 input pixels",
    )
    plot_diagonal(diag, IMAGE_SHAPE, ax=axes["D"], title="diagonal d²logit/dx_i² (8x8)")
    axes["X"].imshow(image.numpy(), cmap="gray_r", vmin=0.0, vmax=1.0)
    axes["X"].set_title(f"input: digit {label}, predicted {pred}")
    axes["X"].set_xticks([])
    axes["X"].set_yticks([])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def format_summary(result: DemoResult) -> str:
    """Render the demo's results as a short multi-line report.

    Args:
        result: Output of :func:`run_demo`.

    Returns:
        The report, without a trailing newline.
    """
    ratio = result.func_seconds / result.hesse_seconds if result.hesse_seconds > 0 else float("nan")
    lines = [
        f"test accuracy       {result.accuracy:.1%} on {result.n_test} held-out digits",
        f"single image        digit {result.label}, predicted {result.pred}, "
        f"Hessian {result.hessian_shape}",
        f"batch               per-sample Hessians {result.batch_shape} "
        "(each image's own predicted-class logit)",
        f"hesse.hessian       {result.hesse_seconds * 1e3:8.1f} ms (median)"
        + (f", auto {result.tuning}" if result.tuning else ""),
        f"torch.func.hessian  {result.func_seconds * 1e3:8.1f} ms (median, vmap)",
        f"speed ratio         {ratio:.2f}x (torch.func time / hesse time)",
        f"agreement           max |hesse - torch.func| = {result.max_abs_diff:.2e} "
        f"(max |H| = {result.max_abs_hessian:.2e})",
        f"consistency         single vs batched {result.single_vs_batch_diff:.2e}, "
        f"hessian_diag vs diag(H) {result.diag_diff:.2e}",
    ]
    if result.png_path is not None:
        lines.append(f"figure              {result.png_path}")
    return "\n".join(lines)
