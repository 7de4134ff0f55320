"""The zoo benchmark (``python -m benchmarks.zoo``) end to end on one small model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the `benchmarks` package

from benchmarks import zoo
from benchmarks.run import main as bench_main

FAST = ["--models", "pair_potential", "--rounds", "1", "--repeats", "1", "--no-mace"]
FAST += ["--threads", str(torch.get_num_threads())]  # main sets torch's threads


@pytest.mark.slow
def test_zoo_benchmark_end_to_end_with_its_child_processes(tmp_path: Path) -> None:
    assert bench_main(["--zoo", *FAST, "--out", str(tmp_path)]) == 0
    run = json.loads((tmp_path / "results.json").read_text())
    assert run["env"]["git"] and [r["mode"] for r in run["records"]] == ["single", "batched"]
    for rec in run["records"]:
        assert rec["status"] == "ok" and rec["rel_error"] <= 1e-8
        assert rec["settled_ms"] > 0 and rec["func_ms"] > 0
        auto, func = rec["auto_child"], rec["func_child"]
        assert "error" not in auto and "error" not in func, (auto, func)
        assert auto["settled"] and len(auto["calls"]) >= 2 and auto["first_ms"] > 0
        assert auto["peak_mb"] >= 0 and func["peak_mb"] >= 0 and auto["strategy"]
        assert all(c["warnings"] == [] for c in auto["calls"])
    text = (tmp_path / "results.md").read_text()
    assert "| pair_potential | batched | yes |" in text


def test_zoo_benchmark_refuses_to_time_a_wrong_result(tmp_path: Path, monkeypatch) -> None:
    """A reference off by 1% (as a wrong method would be) stops the case before timing."""
    peer = zoo.func_peer

    def off(inst):
        call, label = peer(inst)
        return (lambda: 1.01 * call()), label

    monkeypatch.setattr(zoo, "func_peer", off)
    assert zoo.main([*FAST, "--no-memory", "--out", str(tmp_path)]) == 0
    run = json.loads((tmp_path / "results.json").read_text())
    for rec in run["records"]:
        assert rec["status"] == "wrong" and "settled_ms" not in rec
        assert rec["error"].startswith("relative error 9.9e-03")
    assert torch.get_default_dtype() == torch.float64  # the conftest's default, kept


def test_zoo_benchmark_names_unknown_models() -> None:
    with pytest.raises(SystemExit, match=r"unknown models \['resnet50'\]"):
        zoo.main(["--models", "resnet50"])
