"""Interrupted `hesse compute` runs (SIGINT, SIGKILL) and 2-process torchrun runs.

Each resumed or distributed result must equal an uninterrupted one-process run byte for
byte; SIGINT exits 130 and leaves a manifest that lists only blocks really written.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hesse import cli
from hesse.io import manifest as mf

zarr = pytest.importorskip("zarr")  # zarr 3 needs Python 3.11

TESTS = Path(__file__).resolve().parent
ARGS = ["--quantity", "hessian", "--batched", "--output", "1", "--quiet"]


@pytest.fixture(autouse=True)
def _float32_default(_numerics: None) -> None:
    torch.set_default_dtype(torch.float32)  # as in a fresh `hesse compute` process


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    np.save(tmp_path / "x.npy", np.random.default_rng(1).standard_normal((24, 6)).astype("float32"))
    return tmp_path / "x.npy"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _reference(inputs: Path, out: Path, model: str = "io_models:slow", budget: str = "1") -> bytes:
    assert (
        cli.main(["compute", model, str(inputs), *ARGS, "--out", str(out), "--block-size", budget])
        == 0
    )
    return _bytes(out)


def _bytes(out: Path) -> bytes:
    if out.suffix == ".zarr":
        return np.asarray(zarr.open_array(str(out))[...]).tobytes()
    return out.read_bytes()


def _start(inputs: Path, out: Path) -> subprocess.Popen[str]:
    argv = [
        sys.executable,
        "-m",
        "hesse",
        "compute",
        "io_models:slow",
        str(inputs),
        *ARGS,
        "--out",
        str(out),
        "--block-size",
        "1",
    ]
    return subprocess.Popen(
        argv, env=_env(HESSE_TEST_SLEEP="0.25"), stderr=subprocess.PIPE, text=True
    )


def _wait_for_blocks(out: Path, proc: subprocess.Popen[str], count: int = 2) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        merged = None
        with contextlib.suppress(Exception):  # the run may not have made it yet
            merged = mf.read_all(out)
        if merged is not None and len(merged.done) >= count:
            return
        time.sleep(0.05)
    raise AssertionError("no block finished in time")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_kill_then_resume_is_byte_identical(sig: int, inputs: Path, tmp_path: Path) -> None:
    expected = _reference(inputs, tmp_path / "ref.npy")
    out = tmp_path / "H.npy"
    proc = _start(inputs, out)
    _wait_for_blocks(out, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    merged = mf.read_all(out)  # valid JSON, config hash checked
    assert merged is not None and not merged.complete
    blocks = merged.config["blocks"]
    assert 2 <= len(merged.done) < blocks
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        assert (
            err.strip().splitlines()[-1] == "hesse: error: interrupted" and "Traceback" not in err
        )
    else:
        assert proc.returncode == -signal.SIGKILL
    argv = [
        "compute",
        "io_models:slow",
        str(inputs),
        *ARGS,
        "--out",
        str(out),
        "--block-size",
        "1",
    ]
    assert cli.main(argv) == cli.EXIT_CODES[cli.errors.OutputExistsError]
    assert cli.main([*argv, "--resume"]) == 0
    assert _bytes(out) == expected
    final = json.loads(Path(f"{out}.manifest.json").read_text())
    assert final["complete"] and len(final["done"]) == blocks
    assert not mf.part_paths(out)


@pytest.mark.parametrize("ext", [".npy", ".zarr"])
def test_two_processes_equal_one(ext: str, inputs: Path, tmp_path: Path) -> None:
    expected = _reference(inputs, tmp_path / f"ref{ext}", "io_models:mlp", "2")
    out = tmp_path / f"H{ext}"
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "hesse",
        "compute",
        "io_models:mlp",
        str(inputs),
        *ARGS,
        "--out",
        str(out),
        "--block-size",
        "2",
    ]
    run = subprocess.run(
        argv, env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "2 processes" in run.stdout
    assert _bytes(out) == expected
    assert json.loads(Path(f"{out}.manifest.json").read_text())["complete"]
