"""MACE (optional, ``pip install 'hesse[mace]'``): the Hessian of a MACE energy.

A small random MACE model (``benchmarks/zoo_mace.py``), positions as ``x`` and the graph
through ``args=``, against MACE's own ``compute_hessians_vmap`` and against
``torch.autograd.functional.hessian``, in float64. Without ``mace-torch`` the MACE test is
skipped (one skip) and the benchmark's MACE case says why.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the `benchmarks` package

from benchmarks import zoo_mace

import hesse

HAS_MACE = zoo_mace.available()


@pytest.mark.skipif(not HAS_MACE, reason="mace-torch is not installed")
def test_mace_energy_hessian_matches_compute_hessians() -> None:
    energy, positions, args = zoo_mace.build(atoms=8)
    node_attrs, edges = args
    attrs_before, edges_before = node_attrs.clone(), edges.clone()
    want = zoo_mace.mace_hessian(energy, positions, args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript deprecations inside e3nn
        slow = torch.autograd.functional.hessian(lambda p: energy(p, *args), positions)
    torch.testing.assert_close(want, slow.reshape(want.shape), rtol=1e-10, atol=1e-12)
    assert want.abs().max() > 1e-3 and edges.shape[1] > 8
    fallbacks = []
    for call in range(3):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = hesse.hessian(energy, positions, args=args, flat=True)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"call {call + 1}")
        fallbacks.append(sum(isinstance(w.message, hesse.FallbackWarning) for w in caught))
    # vmap and reverse cannot run MACE (it calls positions.requires_grad_()): said once
    assert fallbacks == [1, 0, 0]
    assert not positions.requires_grad
    assert torch.equal(node_attrs, attrs_before) and torch.equal(edges, edges_before)


def test_benchmark_skips_mace_with_a_note_without_it(monkeypatch) -> None:
    monkeypatch.setattr(zoo_mace, "available", lambda: False)
    result = zoo_mace.run(argparse.Namespace(quick=True))
    assert result == {
        "status": "skipped",
        "note": "mace-torch is not installed (pip install 'hesse[mace]')",
    }
