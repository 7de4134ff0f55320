"""Eigenpairs and spectral densities of input Hessians, from Hessian-vector products only."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ConvergenceWarning, UnsupportedInputError
from ..planning.problem import Selection
from .lanczos import lanczos_quadrature, random_start, thick_restart_eigs
from .operator import HessianOperator, hessian_operator

Fn = Callable[[torch.Tensor], torch.Tensor]
WHICH = ("LA", "SA", "LM", "BE")


def check_count(api: str, name: str, value: object, low: int, high: int | None = None) -> int:
    """Checks that ``value`` is an int in ``[low, high]`` and returns it."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and low <= int(value) and (high is None or int(value) <= high):
        return int(value)
    span = f">= {low}" if high is None else f"in {low}..{high}"
    extra = f" (n = {high} inputs per sample)" if high is not None and name == "k" else ""
    raise UnsupportedInputError(
        f"{api}: expected {name} to be an int {span}{extra}, got {value!r}."
    )


def check_tol(api: str, name: str, value: object) -> float:
    """Checks that ``value`` is a positive finite number and returns it as a float."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if real and math.isfinite(float(value)) and float(value) > 0:
        return float(value)
    raise UnsupportedInputError(f"{api}: expected {name} to be a positive number, got {value!r}.")


def _eigs(
    op: HessianOperator,
    k: int,
    which: str,
    tol: float,
    max_iter: int | None,
    ncv: int | None,
    generator: torch.Generator | None,
    api: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, B = op.n, op.batch
    k = check_count(api, "k", k, 1, n)
    if which not in WHICH:
        raise UnsupportedInputError(
            f"{api}: expected which to be one of {WHICH} (largest algebraic, smallest "
            f"algebraic, largest magnitude, both ends), got {which!r}."
        )
    tol = check_tol(api, "tol", tol)
    ncv = min(n, max(2 * k + 1, k + 20)) if ncv is None else check_count(api, "ncv", ncv, 1, n)
    if ncv <= k and ncv < n:
        raise UnsupportedInputError(f"{api}: expected ncv > k = {k} (or ncv = n), got {ncv}.")
    max_iter = 10 * max(10, n // max(1, ncv - k)) if max_iter is None else max_iter
    max_iter = check_count(api, "max_iter", max_iter, 1)

    def apply(v: torch.Tensor) -> torch.Tensor:
        return op.apply(v.unsqueeze(-1)).squeeze(-1)

    values, vectors, resid, done = thick_restart_eigs(
        apply,
        B,
        n,
        k,
        which,  # type: ignore[arg-type]
        tol=tol,
        max_iter=max_iter,
        ncv=ncv,
        dtype=op.dtype,
        device=op.device,
        generator=generator,
    )
    if not bool(done.all()):
        warnings.warn(
            f"{api}: {int((~done).sum())} of {B} eigenproblems did not converge to tol={tol:g} "
            f"in max_iter={max_iter} restarts (largest residual {float(resid.max()):.3g}); "
            "the last Ritz pairs are returned. Raise max_iter or ncv, or loosen tol.",
            ConvergenceWarning,
            stacklevel=3,
        )
    vectors = vectors.transpose(1, 2).reshape(B, k, *op.in_shape)
    if not op.batched:
        return values[0], vectors[0], resid[0]
    return values, vectors, resid


def hessian_eigs(
    f: Fn,
    x: torch.Tensor,
    k: int,
    *,
    which: str = "LA",
    output: Selection = None,
    batched: bool = False,
    tol: float = 1e-6,
    max_iter: int | None = None,
    ncv: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``k`` eigenpairs of the input Hessian by thick-restart Lanczos, without forming ``H``.

    Lanczos with full reorthogonalisation and thick restarts (Wu & Simon) over
    :func:`hesse.hessian_operator`'s products. With ``batched=True`` the ``B``
    eigenproblems run in lockstep: one batched Hessian-vector product per Lanczos step
    for all samples, one batched ``eigh`` of the small projected matrices, and each
    sample's result is frozen once all of its ``k`` pairs have converged.

    Args:
        f: Function or ``nn.Module`` taking one tensor and returning one tensor.
        x: Input, shape ``S`` (``n`` entries), or ``(B, *S)`` with ``batched=True``.
        k: Number of eigenpairs, ``1 <= k <= n``.
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest
            magnitude, ``"BE"`` both ends (``k // 2`` from the bottom, the rest from the
            top), as in :func:`scipy.sparse.linalg.eigsh`.
        output: One scalar output per sample (see :func:`hesse.hessian_operator`).
        batched: The first dimension of ``x`` holds independent samples.
        tol: Converged when every residual ``||H y - theta y|| <= tol * max|theta|``.
        max_iter: Restart cycles at most (default grows with ``n``).
        ncv: Lanczos basis size (default ``max(2k + 1, k + 20)``, at most ``n``).
        generator: Draws the starting vectors (reproducible results).

    Returns:
        ``(values, vectors, residuals)``: values ``(k,)`` in ascending order, unit
        eigenvectors ``(k, *S)`` (``vectors[i]`` belongs to ``values[i]``) and residual
        norms ``(k,)``; with ``batched=True`` ``(B, k)``, ``(B, k, *S)`` and ``(B, k)``.

    Raises:
        UnsupportedInputError: ``k``, ``which``, ``tol``, ``max_iter`` or ``ncv`` invalid.
        OutputSelectionError: ``output`` does not select one scalar per sample.

    Warns:
        ConvergenceWarning: Some eigenproblem did not converge in ``max_iter`` restarts.

    >>> import torch, hesse
    >>> f = lambda x: (torch.arange(1.0, 6.0) * x**2).sum()  # H = diag(2, 4, 6, 8, 10)
    >>> values, vectors, _ = hesse.hessian_eigs(f, torch.ones(5), 2)
    >>> values.round(decimals=4)
    tensor([ 8., 10.])
    """
    api = "hesse.hessian_eigs"
    op = hessian_operator(f, x, output=output, batched=batched)
    op._api = api
    return _eigs(op, k, which, tol, max_iter, ncv, generator, api)


@dataclass
class Spectrum:
    """A spectral density estimate: Gauss quadrature nodes and weights per probe.

    The density is ``sum_ij weights[..., i, j] delta(lambda - nodes[..., i, j])``; weights
    sum to 1 over probes and nodes, so ``n * sum(weights * nodes)`` estimates the trace.

    Attributes:
        nodes: Ritz values, ``(num_probes, lanczos_steps)``, or ``(B, ...)`` batched.
        weights: Their weights, the same shape, non-negative.
        n: Number of inputs per sample (eigenvalues counted by the density).
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    n: int

    def density(self, grid: torch.Tensor, sigma: float) -> torch.Tensor:
        """The density smoothed by a Gaussian of width ``sigma``, on ``grid``.

        Args:
            grid: Eigenvalue positions, shape ``(g,)``.
            sigma: Standard deviation of the Gaussian kernel (> 0).

        Returns:
            Density values ``(g,)`` (``(B, g)`` batched), integrating to about 1.
        """
        sigma = check_tol("Spectrum.density", "sigma", sigma)
        grid = grid.to(self.nodes)
        z = (grid[:, None, None] - self.nodes[..., None, :, :]) / sigma
        kern = torch.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi))
        return (kern * self.weights[..., None, :, :]).sum(dim=(-2, -1))

    def trace(self) -> torch.Tensor:
        """The trace estimate ``n * sum(weights * nodes)``: ``()`` or ``(B,)``."""
        return self.n * (self.weights * self.nodes).sum(dim=(-2, -1))


def hessian_spectrum(
    f: Fn,
    x: torch.Tensor,
    *,
    output: Selection = None,
    batched: bool = False,
    num_probes: int = 8,
    lanczos_steps: int = 30,
    generator: torch.Generator | None = None,
) -> Spectrum:
    """Spectral density of the input Hessian by stochastic Lanczos quadrature.

    Each of ``num_probes`` Rademacher probes runs ``lanczos_steps`` Lanczos steps (all
    probes, and with ``batched=True`` all samples, in one batched product per step); the
    eigenvalues of each tridiagonal matrix are the nodes and the squared first
    components of its eigenvectors the weights (Golub & Meurant; Ghorbani et al. 2019).

    Args:
        f: Function or ``nn.Module`` taking one tensor and returning one tensor.
        x: Input, shape ``S`` (``n`` entries), or ``(B, *S)`` with ``batched=True``.
        output: One scalar output per sample (see :func:`hesse.hessian_operator`).
        batched: The first dimension of ``x`` holds independent samples.
        num_probes: Random probes (>= 1).
        lanczos_steps: Lanczos steps per probe (capped at ``n``).
        generator: Draws the probes (reproducible results).

    Returns:
        A :class:`Spectrum` with nodes and weights of shape ``(num_probes, steps)``
        (``(B, num_probes, steps)`` batched).

    >>> import torch, hesse
    >>> f = lambda x: (x**2).sum() - x[0] ** 2  # H = diag(0, 2, 2, 2)
    >>> s = hesse.hessian_spectrum(f, torch.ones(4), num_probes=4, lanczos_steps=4)
    >>> round(float(s.trace()), 4)
    6.0
    """
    api = "hesse.hessian_spectrum"
    op = hessian_operator(f, x, output=output, batched=batched)
    op._api = api
    probes = check_count(api, "num_probes", num_probes, 1)
    steps = min(check_count(api, "lanczos_steps", lanczos_steps, 1), op.n)
    B, n = op.batch, op.n
    v0 = random_start((B, probes, n), op.dtype, op.device, generator, rademacher=True)

    def apply(v: torch.Tensor) -> torch.Tensor:  # (B * probes, n)
        out = op.apply(v.reshape(B, probes, n).transpose(1, 2))
        return out.transpose(1, 2).reshape(B * probes, n)

    nodes, weights = lanczos_quadrature(apply, v0.reshape(B * probes, n), steps, generator)
    nodes = nodes.reshape(B, probes, steps)
    weights = weights.reshape(B, probes, steps) / probes
    if not op.batched:
        nodes, weights = nodes[0], weights[0]
    return Spectrum(nodes=nodes, weights=weights, n=n)
