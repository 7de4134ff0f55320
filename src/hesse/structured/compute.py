"""Quantities from one structured pass: Jacobian, gradient, Hessian, diagonal, Laplacian."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .capture import Captured
from .engine import Record, Seed, find_seed, forward


def _terms(records: list[Record], grads: tuple, batch: int, diag: bool, d: int, like):
    """Sum of the nonlinear nodes' terms: ``(B, d, d)`` or ``(B, d)``."""
    total = like.new_zeros((batch, d) if diag else (batch, d, d))
    for record, g in zip(records, grads, strict=True):
        part = record.step.rule.term(record.site, g, batch, diag)
        if part is not None:
            total = total + part
    return total


def _to_input(seed: Seed, h: torch.Tensor, diag: bool) -> torch.Tensor:
    """Maps a Hessian in the seed's coordinates to the input: ``W^T H W`` (bottleneck)."""
    w = seed.matrix
    if w is None:
        return h
    hw = torch.matmul(h, w)  # (B, n1, n)
    if diag:
        return (hw * w).sum(-2)
    return torch.matmul(w.t(), hw)


def structured_pass(
    captured: Captured,
    x: torch.Tensor,
    to_model: Callable[[torch.Tensor], torch.Tensor],
    batch: int,
    index: torch.Tensor | None,
    want: frozenset[str],
) -> dict[str, torch.Tensor]:
    """Computes the requested pieces for a sub-batch.

    Args:
        captured: The captured model.
        x: Flat inputs of the sub-batch, ``(s, n)``.
        to_model: Reshapes ``(s, n)`` to the model's input layout.
        batch: ``s`` when batched, 1 for a single sample.
        index: Flat indices of the selected outputs (``None``: all).
        want: Any of ``"jacobian"``, ``"gradient"``, ``"hessian"``, ``"diag"``.

    Returns:
        ``jacobian`` and ``gradient`` ``(s, m, n)``, ``hessian`` ``(s, m, n, n)``,
        ``diag`` ``(s, m, n)``, as requested.
    """
    n = x.shape[1]
    seed = find_seed(captured, n)
    with torch.enable_grad():
        xin = to_model(x.detach()).requires_grad_(True)
        out, t_out, records = forward(captured, xin, seed)
        y = out.reshape(batch, -1)
        j_out = t_out.reshape(seed.d, batch, -1)
        if index is not None:
            y, j_out = y.index_select(1, index), j_out.index_select(2, index)
        result: dict[str, torch.Tensor] = {}
        if "jacobian" in want:
            jac = j_out.permute(1, 2, 0)  # (B, m, d)
            result["jacobian"] = jac if seed.matrix is None else jac @ seed.matrix
        second = want & {"hessian", "diag"}
        if second or "gradient" in want:
            result.update(_second_order(records, xin, y, seed, batch, second, "gradient" in want))
    return result


def _second_order(records, xin, y, seed: Seed, batch: int, second: set, gradient: bool):
    m = y.shape[1]
    outputs = [r.site.output for r in records] + [xin]
    diag_only = second == {"diag"} and seed.matrix is None
    per_output: dict[str, list[torch.Tensor]] = {k: [] for k in (*second, "gradient")}
    for k in range(m):
        grads = torch.autograd.grad(
            y[:, k].sum(), outputs, retain_graph=True, allow_unused=True, materialize_grads=True
        )
        if gradient:
            per_output["gradient"].append(grads[-1].reshape(batch, -1).detach())
        if not second:
            continue
        with torch.no_grad():
            h = _terms(records, grads[:-1], batch, diag_only, seed.d, y)
            if "hessian" in second:
                per_output["hessian"].append(_to_input(seed, h, diag=False))
            if "diag" in second:
                per_output["diag"].append(
                    h
                    if diag_only
                    else _to_input(seed, h, diag=True)
                    if seed.matrix is not None
                    else h.diagonal(dim1=-2, dim2=-1)
                )
    return {k: torch.stack(v, 1) for k, v in per_output.items() if v}
