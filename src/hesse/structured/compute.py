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


def _sweep(records: list[Record], grads: dict, start, d: int, batch: int, like) -> torch.Tensor:
    """The Hessian in the seed's coordinates by the rule-based reverse sweep: ``(B, d, d)``.

    See NOTE: [reverse sweep] in :mod:`.rules.base`.
    """
    gdot: dict = {}
    for record in reversed(records):
        rule, site = record.step.rule, record.site
        incoming = gdot.pop(record.step.node, None)
        parts = [rule.transpose(site, incoming)] if incoming is not None else []
        g = grads.get(record.step.node)
        curv = rule.curvature(site, g) if g is not None else None
        if curv is not None:
            parts.append(curv)
        for part in parts:
            for node, value in zip(record.inputs, part, strict=True):
                gdot[node] = value if node not in gdot else gdot[node] + value
    if start not in gdot:
        return like.new_zeros((batch, d, d))
    return gdot[start].reshape(d, batch, -1).transpose(0, 1)


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
    mode: str = "gram",
) -> dict[str, torch.Tensor]:
    """Computes the requested pieces for a sub-batch.

    Args:
        captured: The captured model.
        x: Flat inputs of the sub-batch, ``(s, n)``.
        to_model: Reshapes ``(s, n)`` to the model's input layout.
        batch: ``s`` when batched, 1 for a single sample.
        index: Flat indices of the selected outputs (``None``: all).
        want: Any of ``"jacobian"``, ``"gradient"``, ``"hessian"``, ``"diag"``.
        mode: ``"gram"`` (sum of per-layer terms) or ``"sweep"`` (rule-based
            forward-over-reverse; Hessians only).

    Returns:
        ``jacobian`` and ``gradient`` ``(s, m, n)``, ``hessian`` ``(s, m, n, n)``,
        ``diag`` ``(s, m, n)``, as requested.
    """
    n = x.shape[1]
    seed = find_seed(captured, n)
    with torch.enable_grad():
        xin = to_model(x.detach()).requires_grad_(True)
        sweep = mode == "sweep"
        out, t_out, records, start = forward(captured, xin, seed, keep_linear=sweep)
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
            result.update(
                _second_order(
                    records,
                    xin,
                    y,
                    seed,
                    batch,
                    second,
                    "gradient" in want,
                    start if sweep else None,
                )
            )
    return result


def _second_order(records, xin, y, seed: Seed, batch, second: set, gradient: bool, start):
    m = y.shape[1]
    curved = [r for r in records if not r.step.rule.linear]
    outputs = [r.site.output for r in curved] + [xin]
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
            if start is not None:
                by_node = {r.step.node: g for r, g in zip(curved, grads[:-1], strict=True)}
                h = _sweep(records, by_node, start, seed.d, batch, y)
            else:
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
