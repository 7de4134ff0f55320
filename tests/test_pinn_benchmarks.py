"""The PINN peers of the benchmarks: training steps, folx, torch-jet, the randomized hook."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the `benchmarks` package

from benchmarks import machine, peers, protocol
from benchmarks.cases import CASES, PINN_SMOKE_CASES, build, mlp_parameters
from benchmarks.peers.jet_peers import python312
from benchmarks.peers.torch_peers import reference
from benchmarks.run import main

import hesse

HAS_FOLX = importlib.util.find_spec("jax") is not None and importlib.util.find_spec("folx")


def _verify(name: str, case: str) -> protocol.Check:
    inst = build(PINN_SMOKE_CASES[case], torch.float64)
    return protocol.verify(peers.get(name), inst, reference(inst), inst.case.samples)


def test_training_cases_layout():
    train = [c for c in CASES.values() if c.quantity == "laplacian_train"]
    assert {c.n for c in train} >= {2, 8, 32, 100, 1000}
    assert any(c.config["sizes"] == (50, 768, 768, 512, 512, 1) for c in train)
    assert [c.randomized for c in train if c.n == 1000] == [64]
    case = PINN_SMOKE_CASES["smoke_train"]
    assert case.result_shape == (mlp_parameters(case.config),) == (3 * 8 + 8 + 8 * 8 + 8 + 8 + 1,)


@pytest.mark.parametrize(
    "name", ["func_train", "grad_loop_train", "hesse[auto]", "hesse[eager]", "hesse[operator]"]
)
def test_torch_training_steps_match_torch_func(name):
    check = _verify(name, "smoke_train")
    assert check.status == "ok" and check.rel_error < 1e-12, check.reason


def test_quantity_gate_makes_refusals_unsupported():
    assert _verify("func_hessian", "smoke_train").status == "unsupported"
    assert _verify("func_train", "smoke_lap_b").status == "unsupported"
    check = _verify("jet_lap_rand", "smoke_train")
    assert check.status == "unsupported" and "randomized" in check.reason


@pytest.mark.skipif(not HAS_FOLX, reason="jax/folx not installed")
@pytest.mark.parametrize(
    ("name", "case"),
    [
        ("folx_lap", "smoke_lap_b"),
        ("folx_lap", "smoke_train"),
        ("jax_jvp_jvp_train", "smoke_train"),
    ],
)
def test_jax_peers(name, case):
    check = _verify(name, case)
    assert check.status == "ok" and check.rel_error < 1e-12, check.reason


def test_jet_peer_runs_under_python312_or_is_skipped_with_a_note():
    check = _verify("jet_lap", "smoke_train")
    if python312() is None:
        assert check.status == "skipped" and check.reason.startswith("not run: ")
    else:
        assert check.status == "ok" and check.rel_error < 1e-12, check.reason


def test_peer_thread_env(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    env = machine.peer_thread_env(3)
    assert "intra_op_parallelism_threads=3" in env["XLA_FLAGS"]
    assert "--xla_cpu_multi_thread_eigen=true" in env["XLA_FLAGS"]  # false: one thread
    assert env["OMP_NUM_THREADS"] == "3"
    monkeypatch.setenv(
        "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=5"
    )
    assert machine.peer_thread_env(3)["XLA_FLAGS"].count("intra_op") == 1  # the caller's wins


def test_randomized_case_end_to_end_counts_the_skips(tmp_path):
    names = ["hesse[operator]", "hesse[estimate]", "folx_lap", "jet_lap_rand"]
    argv = ["--cases", "smoke_train_rand", "--methods", ",".join(names), "--repeats", "1"]
    assert main([*argv, "--rounds", "1", "--no-memory", "--out", str(tmp_path)]) == 0
    run = json.loads((tmp_path / "results.json").read_text())
    status = {(r["method"], r["dtype"]): r for r in run["records"]}
    skipped = [k for k, r in status.items() if r["status"] == "skipped"]
    # each refusal that is a missing package (or API) is a skip in both dtypes, nothing more
    expected = {"hesse[estimate]"} if not hasattr(hesse, "laplacian_estimate") else set()
    expected |= set() if HAS_FOLX else {"folx_lap"}
    expected |= set() if python312() else {"jet_lap_rand"}
    assert sorted(skipped) == sorted((m, d) for m in expected for d in ("float32", "float64"))
    for dtype in ("float32", "float64"):
        assert status["hesse[operator]", dtype]["status"] == "ok"
        if python312():  # a randomized estimate: its error is recorded, not enforced
            rand = status["jet_lap_rand", dtype]
            assert rand["status"] == "ok" and rand["rel_error"] > 1e-6
    if "hesse[estimate]" in expected:
        assert "laplacian_estimate does not exist" in status["hesse[estimate]", "float64"]["reason"]
