"""MACE in the zoo benchmark: the Hessian of the energy of 32 atoms against MACE's own.

A small MACE model built from its constructor with random weights (no downloads): two
elements, ``hidden_irreps="8x0e+8x1o"``, ``max_ell=2``, correlation 2, two interactions,
cutoff 4 A; 32 atoms on a jittered 4x4x2 grid (spacing 1.6 A) without periodic images.
hesse differentiates ``energy(positions, node_attrs, edge_index)`` with the graph passed
through ``args=``; MACE's reference is ``model(data, compute_hessian=True)["hessian"]``
(``mace.modules.utils.compute_hessians_vmap``: forces with ``create_graph=True``, then
``vmap`` of their vector-Jacobian products). Needs ``pip install 'hesse[mace]'``; without
``mace-torch`` the case is skipped with a note.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

R_MAX = 4.0
ATOMS = 32


def available() -> bool:
    """Whether ``mace-torch`` (and its ``e3nn``) can be imported."""
    return all(importlib.util.find_spec(m) is not None for m in ("mace", "e3nn"))


class MaceEnergy(nn.Module):
    """The total energy of one MACE graph as a function of the positions.

    ``forward(positions, node_attrs, edge_index)``: positions ``(N, 3)``, one-hot
    species ``(N, K)``, edges ``(2, E)`` (no periodic shifts); returns ``()``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, positions: torch.Tensor, node_attrs: torch.Tensor, edge_index: torch.Tensor
    ) -> torch.Tensor:
        data = graph(positions, node_attrs, edge_index)
        return self.model(data, compute_force=False)["energy"].sum()


def graph(positions: torch.Tensor, node_attrs: torch.Tensor, edge_index: torch.Tensor) -> dict:
    """MACE's input dictionary for one molecule (no cell, no periodic shifts)."""
    n, e = positions.shape[0], edge_index.shape[1]
    zeros = positions.new_zeros(e, 3)
    return {
        "positions": positions,
        "node_attrs": node_attrs,
        "edge_index": edge_index,
        "shifts": zeros,
        "unit_shifts": zeros,
        "cell": positions.new_zeros(3, 3),
        "batch": torch.zeros(n, dtype=torch.int64),
        "ptr": torch.tensor([0, n]),
    }


def build(atoms: int = ATOMS, seed: int = 0) -> tuple[MaceEnergy, torch.Tensor, tuple]:
    """A small random MACE model (float64, eval) and ``atoms`` atoms.

    Returns:
        ``(energy, positions, args)``: ``energy(positions, *args)`` is the energy,
        positions ``(atoms, 3)``, ``args = (node_attrs (atoms, 2), edge_index (2, E))``.
    """
    import numpy as np

    with warnings.catch_warnings():  # e3nn and mace warn on import (TorchScript, loads)
        warnings.simplefilter("ignore")
        import mace  # noqa: F401 - before e3nn: it allows e3nn's constants in torch.load
        from e3nn import o3
        from mace import modules

    block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            model = modules.MACE(
                r_max=R_MAX, num_bessel=4, num_polynomial_cutoff=5, max_ell=2,
                interaction_cls=block, interaction_cls_first=block, num_interactions=2,
                num_elements=2, hidden_irreps=o3.Irreps("8x0e+8x1o"),
                MLP_irreps=o3.Irreps("8x0e"), atomic_energies=np.zeros(2),
                avg_num_neighbors=8.0, atomic_numbers=[1, 8], correlation=2,
                gate=torch.nn.functional.silu,
            )  # fmt: skip
            side = -(-atoms // 8)
            axes = (torch.arange(4.0), torch.arange(2.0), torch.arange(float(side)))
            grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
            positions = 1.6 * grid[:atoms] + 0.2 * torch.randn(atoms, 3)
            species = torch.randint(0, 2, (atoms,))
        finally:
            torch.set_default_dtype(dtype)
    dist = (positions[:, None] - positions[None]).norm(dim=-1)  # exact zeros on the diagonal
    dist.fill_diagonal_(float("inf"))
    edge_index = torch.stack(torch.nonzero(dist < R_MAX, as_tuple=True))
    node_attrs = torch.nn.functional.one_hot(species, 2).double()
    return MaceEnergy(model.double().eval()), positions, (node_attrs, edge_index)


def mace_hessian(energy: MaceEnergy, positions: torch.Tensor, args: tuple) -> torch.Tensor:
    """MACE's own Hessian of the energy, ``(3N, 3N)`` (positions as rows ``atom * 3 + axis``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = graph(positions.detach().clone(), *args)
        out = energy.model(data, compute_force=True, compute_hessian=True)["hessian"]
    n = positions.numel()
    return out.detach().reshape(n, n)


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The MACE case: verification, first calls, settled interleaved timing."""
    import hesse
    from hesse.planning.tuning import settle

    if not available():
        note = "mace-torch is not installed (pip install 'hesse[mace]')"
        return {"status": "skipped", "note": note}
    energy, positions, extra = build()
    options = {"args": extra, "flat": True}

    def auto() -> torch.Tensor:
        return hesse.hessian(energy, positions, **options)

    def pending() -> bool:
        tuning = hesse.plan(energy, positions, "hessian", **options).tuning
        return tuning is not None and tuning.pending

    t0 = time.perf_counter()
    want = mace_hessian(energy, positions, extra)
    mace_first = 1e3 * (time.perf_counter() - t0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        got = auto()
        auto_first = 1e3 * (time.perf_counter() - t0)
        settle(auto, pending)
    err = float((got - want).abs().max() / want.abs().max())
    late = len(caught) - sum(isinstance(w.message, hesse.FallbackWarning) for w in caught)
    plan = hesse.plan(energy, positions, "hessian", **options)
    rounds = {"auto": [], "mace": []}
    for _ in range(2 if args.quick else 3):
        rounds["auto"].append(_median_ms(auto, 2))
        rounds["mace"].append(_median_ms(lambda: mace_hessian(energy, positions, extra), 2))
    auto_ms, mace_ms = min(rounds["auto"]), min(rounds["mace"])
    columns = ["atoms", "edges", "auto ran", "rel. error", "first call auto / MACE (ms)"]
    columns += ["settled auto / MACE (ms)", "MACE / auto"]
    row = [str(positions.shape[0]), str(extra[1].shape[1]), plan.ran or plan.strategy]
    row += [f"{err:.0e}", f"{auto_first:.0f} / {mace_first:.0f}"]
    row += [f"{auto_ms:.0f} / {mace_ms:.0f}", f"{mace_ms / auto_ms:.2f}"]
    note = (
        f"MACE's reference: compute_hessians_vmap. hesse: {len(caught)} warning(s) on the first "
        f"call ({late} not a FallbackWarning); not captured: {plan.capture_note}; "
        f"failed: {dict(plan.failed)}."
    )
    return {
        "status": "ok" if err <= 1e-8 else "wrong",
        "rel_error": err,
        "auto_first_ms": auto_first,
        "mace_first_ms": mace_first,
        "auto_ms": auto_ms,
        "mace_ms": mace_ms,
        "rounds_ms": rounds,
        "strategy": plan.ran or plan.strategy,
        "columns": columns,
        "rows": [row],
        "note": note,
    }
