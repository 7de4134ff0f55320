"""Quantities as work items: what each public call asks every strategy to compute.

Each quantity is a table row: how many work items it has per sample, what one item's result
looks like (the *tail*), and how a block of items is computed from a strategy's kernels.
Items of second-order quantities are pairs ``(k, j)`` in row-major order: selected output
``k``, Hessian row ``j``. A block of items ``[i0, i1)`` for samples ``[s0, s1)`` therefore
maps to a contiguous slice of the result, so blocks stream straight into a sink.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .planning.problem import Problem
from .strategies import Strategy


def one_hot(index: torch.Tensor, size: int, like: torch.Tensor) -> torch.Tensor:
    """Rows of the identity, without forming it: shape ``(len(index), size)``."""
    out = like.new_zeros((index.numel(), size))
    out[torch.arange(index.numel(), device=out.device), index] = 1
    return out


@dataclass(frozen=True)
class Work:
    """One block of work: samples ``[s0, s1)`` and items ``[i0, i1)``."""

    x: torch.Tensor  # (s, n)
    items: torch.Tensor  # (r,) flat item indices
    v: torch.Tensor | None  # (s, n) direction of an hvp call, else None


Block = tuple[torch.Tensor, torch.Tensor | None]
Kernel = Callable[[Strategy, Problem, Work, bool], dict[str, Block]]


@dataclass(frozen=True)
class Quantity:
    """How a quantity is computed.

    Attributes:
        name: Public name.
        second_order: Needs Hessian-vector products (so double differentiation).
        items: Work items per sample, given the problem and the strategy.
        outputs: For each array it writes: its items per sample and its tail shape.
        kernel: Computes the blocks of one :class:`Work`: for each array, the values,
            shape ``(r', s, *tail)``, and the item indices they go to (``None``: the
            work's own items).
    """

    name: str
    second_order: bool
    items: Callable[[Problem, Strategy], int]
    outputs: Callable[[Problem, Strategy], dict[str, tuple[int, tuple[int, ...]]]]
    kernel: Kernel


def forward_jacobian(problem: Problem, strategy: Strategy) -> bool:
    """Push ``n`` tangents forward rather than pull ``m`` cotangents back."""
    return strategy.capabilities.jvps and problem.n < problem.m


def _runs(problem: Problem, work: Work):
    """Splits ``(k, j)`` items into runs of one output ``k``.

    Yields:
        ``(positions, u, v)``: positions of the run in the block, the one-hot cotangent
        ``(s, m)`` of output ``k``, and the one-hot directions ``(r, s, n)`` of its rows.
    """
    s = work.x.shape[0]
    k, j = work.items // problem.n, work.items % problem.n
    for kk in torch.unique_consecutive(k).tolist():
        positions = (k == kk).nonzero().flatten()
        u = one_hot(k.new_tensor([kk]), problem.m, work.x).expand(s, -1).contiguous()
        # contiguous: stride-0 tangents send the model's matmuls down slow paths (~20x)
        v = one_hot(j[positions], problem.n, work.x)[:, None].expand(-1, s, -1).contiguous()
        yield positions, u, v


def _hvps_by_run(st: Strategy, p: Problem, w: Work, graph: bool):
    """Gradients (of the runs' first items) and HVPs ``(r, s, n)`` of ``(k, j)`` items."""
    grads, products = [], []
    for _, u, v in _runs(p, w):
        g, hv = st.hvps(p.fn, w.x, u, v, graph)
        grads.append(g)
        products.append(hv)
    return grads, torch.cat(products)


def _jacobian_kernel(st: Strategy, p: Problem, w: Work, graph: bool) -> dict:
    s = w.x.shape[0]
    if forward_jacobian(p, st):
        v = one_hot(w.items, p.n, w.x)[:, None].expand(-1, s, -1).contiguous()
        return {"jacobian": (st.jvps(p.fn, w.x, v, graph), None)}  # type: ignore[attr-defined]
    u = one_hot(w.items, p.m, w.x)[:, None].expand(-1, s, -1).contiguous()
    return {"jacobian": (st.vjps(p.fn, w.x, u, graph), None)}


def _hessian_kernel(st: Strategy, p: Problem, w: Work, graph: bool) -> dict:
    return {"hessian": (_hvps_by_run(st, p, w, graph)[1], None)}


def _diag_kernel(st: Strategy, p: Problem, w: Work, graph: bool) -> dict:
    hv = _hvps_by_run(st, p, w, graph)[1]  # (r, s, n)
    j = (w.items % p.n)[:, None, None].expand(-1, hv.shape[1], 1)
    return {"diag": (hv.gather(2, j)[..., 0], None)}


def _hvp_kernel(st: Strategy, p: Problem, w: Work, graph: bool) -> dict:
    s, k = w.x.shape[0], w.items.tolist()
    us = [one_hot(w.items.new_tensor([kk]), p.m, w.x).expand(s, -1) for kk in k]
    hv = torch.cat([st.hvps(p.fn, w.x, u, w.v[None], graph)[1] for u in us])  # type: ignore[index]
    return {"hvp": (hv, None)}


def _derivatives_kernel(st: Strategy, p: Problem, w: Work, graph: bool) -> dict:
    grads, hv = _hvps_by_run(st, p, w, graph)
    k = torch.unique_consecutive(w.items // p.n)  # one gradient per output in the block
    return {"hessian": (hv, None), "gradient": (torch.stack(grads), k)}


def _pair_items(p: Problem, st: Strategy) -> int:
    return p.m * p.n


def _hessian_out(p: Problem, st: Strategy) -> dict[str, tuple[int, tuple[int, ...]]]:
    return {"hessian": (p.m * p.n, (p.n,))}


def _diag_out(p: Problem, st: Strategy) -> dict[str, tuple[int, tuple[int, ...]]]:
    return {"diag": (p.m * p.n, ())}


def _laplacian_out(p: Problem, st: Strategy) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Whole-result strategies give one Laplacian per output; the others, the diagonal."""
    if st.capabilities.whole_samples:
        return {"laplacian": (p.m, ())}
    return _diag_out(p, st)


def _hvp_out(p: Problem, st: Strategy) -> dict[str, tuple[int, tuple[int, ...]]]:
    return {"hvp": (p.m, (p.n,))}


QUANTITIES: dict[str, Quantity] = {
    q.name: q
    for q in (
        Quantity(
            "jacobian",
            False,
            lambda p, st: p.n if forward_jacobian(p, st) else p.m,
            lambda p, st: {"jacobian": (p.n, (p.m,)) if forward_jacobian(p, st) else (p.m, (p.n,))},
            _jacobian_kernel,
        ),
        Quantity("hessian", True, _pair_items, _hessian_out, _hessian_kernel),
        Quantity("hessian_diag", True, _pair_items, _diag_out, _diag_kernel),
        Quantity("laplacian", True, _pair_items, _laplacian_out, _diag_kernel),
        Quantity("hvp", True, lambda p, st: p.m, _hvp_out, _hvp_kernel),
        Quantity(
            "derivatives",
            True,
            _pair_items,
            lambda p, st: {**_hessian_out(p, st), "gradient": (p.m, (p.n,))},
            _derivatives_kernel,
        ),
    )
}
