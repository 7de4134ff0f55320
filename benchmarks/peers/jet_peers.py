"""Collapsed Taylor mode, PyPI ``jet-for-pytorch`` (``from jet import laplacian``), as a peer.

jet needs Python >= 3.12, so it runs in a subprocess (:mod:`benchmarks.peers.jet_runner`)
under the first of: ``$HESSE_BENCH_PYTHON312``, the repository's ``.venv312/bin/python``,
``python3.12`` on the PATH, whichever can ``import jet, torch``. With none the peer is
skipped with a note. The case's weights and input go over in an ``.npz``; the subprocess
gets the same thread count as torch here. A timed call is one request over a pipe (about
0.1 ms of the time); the result comes back on the first call only (verification).
Memory is the subprocess's own peak RSS over one call.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import machine
from ..cases import Instance, mlp_layers
from . import Method, MissingDependency, Prepared, Unsupported, register

RUNNER = Path(__file__).with_name("jet_runner.py")
NOT_RUN = (
    "not run: jet-for-pytorch needs Python >= 3.12 with torch and jet-for-pytorch "
    "(python3.12 -m venv .venv312 && .venv312/bin/pip install torch jet-for-pytorch, "
    "or set HESSE_BENCH_PYTHON312)"
)


@functools.cache
def python312() -> str | None:
    """A Python >= 3.12 interpreter that can import jet and torch, or None."""
    candidates = [
        os.environ.get("HESSE_BENCH_PYTHON312"),
        str(machine.ROOT / ".venv312" / "bin" / "python"),
        shutil.which("python3.12"),
    ]
    for py in filter(None, candidates):
        if not Path(py).exists():
            continue
        try:
            probe = subprocess.run(
                [py, "-c", "import sys, jet, torch; assert sys.version_info >= (3, 12)"],
                capture_output=True,
                timeout=300,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return py
    return None


class Runner:
    """One jet subprocess serving one case instance (its stderr goes to a file)."""

    def __init__(self, py: str, npz: Path, threads: int) -> None:
        env = os.environ | machine.peer_thread_env(threads)
        self.log = npz.with_suffix(".stderr.txt")
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(
                [py, str(RUNNER), str(npz), str(threads)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
            )
        weakref.finalize(self, Runner._stop, self.proc)
        if self.proc.stdout.readline().strip() != "ready":
            self._fail()

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    def _fail(self) -> None:
        self.proc.kill()
        self.proc.wait()
        lines = [ln for ln in self.log.read_text().splitlines() if ln.strip()]
        tail = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else "")
        raise RuntimeError(f"jet subprocess failed: {tail.strip()[:250] or 'no output'}")

    def ask(self, command: str) -> dict[str, Any]:
        """Sends one command and returns its JSON reply."""
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self._fail()
        return json.loads(line)


def _prepare(inst: Instance, randomized: bool = False) -> Prepared:
    case = inst.case
    if case.family != "mlp" or not case.batched or case.config["sizes"][-1] != 1:
        raise Unsupported("written for batched MLPs with one output (jet has no slicing rule)")
    if case.config["act"] != "tanh":
        raise Unsupported(f"jet has no rule for {case.config['act']}")
    py = python312()
    if py is None:
        raise MissingDependency(NOT_RUN)
    folder = Path(tempfile.mkdtemp(prefix="hesse-jet-"))
    arrays = {
        f"{k}{i}": a for i, wb in enumerate(mlp_layers(inst)) for k, a in zip("wb", wb, strict=True)
    }
    meta = {
        "act": case.config["act"],
        "output": case.output,
        "quantity": case.quantity,
        "randomized": case.randomized if randomized else None,
    }
    np.savez(folder / "case.npz", x=inst.x.numpy(), meta=json.dumps(meta), **arrays)
    runner = Runner(py, folder / "case.npz", torch.get_num_threads())
    fetched = []

    def run() -> Any:
        if fetched:
            runner.ask("run")
            return None
        runner.ask(f"fetch {folder / 'result.npy'}")
        fetched.append(True)
        return np.load(folder / "result.npy")

    run.measure_memory = lambda: runner.ask("mem")["delta_mb"]  # type: ignore[attr-defined]
    run.runner = runner  # type: ignore[attr-defined]  (keeps the subprocess alive)
    return run


register(
    Method(
        "jet_lap",
        "torch-jet collapsed Taylor mode (jet.laplacian, Python 3.12 subprocess), vmap",
        "torch-jet",
        _prepare,
        quantities=("laplacian", "laplacian_train"),
    )
)
register(
    Method(
        "jet_lap_rand",
        "torch-jet randomized collapsed Laplacian (Rademacher directions), 3.12 subprocess",
        "torch-jet",
        lambda inst: _prepare(inst, randomized=True),
        quantities=("laplacian_train",),
        randomized=True,
    )
)
