"""Estimates with error bars: the result type, running means, Student-t quantiles."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ..errors import UnsupportedInputError


def t_quantile(p: float, df: torch.Tensor) -> torch.Tensor:
    """Quantile ``p`` of Student's t with ``df`` degrees of freedom (Cornish-Fisher).

    The expansion in ``1/df`` to third order is accurate to about 1e-3 for ``df >= 3``
    at the usual levels; ``df = inf`` (exact values) gives the normal quantile.
    """
    z = float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))
    nu = df.to(torch.float64).clamp_min(1.0)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / nu + g2 / nu**2 + g3 / nu**3


@dataclass
class Estimate:
    """A randomized estimate and its standard error.

    Attributes:
        value: The estimate: ``()`` for one sample's trace, ``(B,)`` batched; a
            diagonal has the input's shape ``S`` (``(B, *S)``); a Laplacian estimate the
            selected output shape ``Q`` (``(B, *Q)``).
        stderr: Its standard error, the same shape (0 where exact).
        matvecs: Hessian-vector products (or directional second derivatives) used per
            sample: an int, or ``(B,)`` when samples stopped at different counts.
        samples: Independent samples behind ``stderr`` (degrees of freedom + 1), an
            int or ``(B,)``; 0 when exact.
        exact: The value is exact (computing it was no dearer than the estimate).
        method: ``"hutchinson"``, ``"hutch++"``, ``"xtrace"``, ``"xdiag"`` or ``"exact"``.
    """

    value: torch.Tensor
    stderr: torch.Tensor
    matvecs: int | torch.Tensor
    samples: int | torch.Tensor
    exact: bool
    method: str

    def ci(self, level: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
        """Two-sided confidence interval ``value -/+ t * stderr`` (Student t quantile).

        Args:
            level: Coverage probability in ``(0, 1)``.

        Returns:
            ``(low, high)``, each shaped like :attr:`value`.
        """
        if not isinstance(level, numbers.Real) or not 0 < float(level) < 1:
            raise UnsupportedInputError(
                f"Estimate.ci: expected level in (0, 1), e.g. 0.95, got {level!r}."
            )
        if self.exact:
            return self.value, self.value
        samples = torch.as_tensor(self.samples, device=self.value.device)
        t = t_quantile(0.5 + float(level) / 2, samples - 1).to(self.value)
        t = t.reshape(t.shape + (1,) * (self.value.dim() - t.dim()))
        return self.value - t * self.stderr, self.value + t * self.stderr

    def __iter__(self):
        """Unpacks as ``value, stderr = estimate``."""
        return iter((self.value, self.stderr))


class Running:
    """Running per-sample mean and variance of ``(B, k, *E)`` blocks, with a stop mask."""

    def __init__(self, batch: int, extra: tuple[int, ...], like: torch.Tensor) -> None:
        self.sum = torch.zeros((batch, *extra), dtype=like.dtype, device=like.device)
        self.sumsq = torch.zeros_like(self.sum)
        self.count = torch.zeros(batch, dtype=torch.long, device=like.device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=like.device)

    def add(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Adds ``values`` ``(B, k, *E)``: the columns ``mask`` ``(B, k)`` allows, if given."""
        if mask is None:
            mask = (~self.done)[:, None].expand(values.shape[:2])
        live = mask.reshape(*mask.shape, *([1] * (values.dim() - 2)))
        self.sum = self.sum + torch.where(live, values, 0).sum(1)
        self.sumsq = self.sumsq + torch.where(live, values**2, 0).sum(1)
        self.count = self.count + mask.sum(1)

    def _c(self) -> torch.Tensor:
        return self.count.to(self.sum.dtype).reshape(-1, *([1] * (self.sum.dim() - 1)))

    @property
    def mean(self) -> torch.Tensor:
        """``(B, *E)``."""
        return self.sum / self._c().clamp_min(1)

    @property
    def stderr(self) -> torch.Tensor:
        """Standard error of the mean, ``(B, *E)`` (sample variance, ``k - 1`` dof)."""
        c = self._c()
        var = (self.sumsq - c * self.mean**2).clamp_min(0) / (c - 1).clamp_min(1)
        return (var / c.clamp_min(1)).sqrt()


def check_budget(
    api: str, num: object, rtol: object, atol: object, name: str = "num_matvecs"
) -> tuple[int | None, float, float]:
    """Validates ``num_matvecs`` against ``rtol``/``atol``: exactly one way to stop."""
    if num is not None and (rtol is not None or atol is not None):
        raise UnsupportedInputError(
            f"{api}: pass either {name}= (a fixed budget) or rtol=/atol= (stop when the "
            f"standard error is small enough), not both; got {name}={num!r}, rtol={rtol!r}, "
            f"atol={atol!r}."
        )
    for label, tol in (("rtol", rtol), ("atol", atol)):
        bad = tol is not None and not (
            isinstance(tol, numbers.Real) and math.isfinite(float(tol)) and float(tol) >= 0
        )
        if bad:
            raise UnsupportedInputError(
                f"{api}: expected {label} to be a non-negative number, got {tol!r}."
            )
    if num is not None and (
        not isinstance(num, numbers.Integral) or isinstance(num, bool) or int(num) < 2
    ):
        raise UnsupportedInputError(
            f"{api}: expected {name} to be an int >= 2 (a standard error needs two samples), "
            f"got {num!r}."
        )
    return (
        None if num is None else int(num),
        float(rtol or 0.0),
        float(atol or 0.0),
    )
