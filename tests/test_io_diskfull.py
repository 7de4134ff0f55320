"""`hesse compute` on a full disk: a typed one-line error, nothing a resume would trust.

A real "disk full" without root: a subprocess whose file-size limit (``RLIMIT_FSIZE``) is
below the output's size, with ``SIGXFSZ`` ignored, so a write past the limit fails with
``EFBIG`` as a full disk fails with ``ENOSPC``. And ``ENOSPC`` itself, raised by the
sink's write in the middle of a run. Each time a ``--resume`` with room completes, byte
for byte equal to an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hesse import cli, errors
from hesse.io import files
from hesse.io import manifest as mf

zarr = pytest.importorskip("zarr")  # zarr 3 needs Python 3.11

TESTS = Path(__file__).resolve().parent
CODE = cli.EXIT_CODES[errors.OutputWriteError]
# jacobian of io_models:mlp over 2000 samples: (2000, 3, 6) float32 = 144 kB, 4 blocks of
# 36 kB; the manifest stays under 2 kB
ARGS = ["--quantity", "jacobian", "--batched", "--block-size", "500", "--quiet"]
_LIMITED = (
    "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "n = int(sys.argv.pop(1)); resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
    "from hesse.cli import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.fixture(autouse=True)
def _float32_default(_numerics: None) -> None:
    torch.set_default_dtype(torch.float32)  # as in a fresh `hesse compute` process


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    rng = np.random.default_rng(2)
    np.save(tmp_path / "x.npy", rng.standard_normal((2000, 6)).astype("float32"))
    return tmp_path / "x.npy"


def _argv(inputs: Path, out: Path, *extra: str) -> list[str]:
    return ["compute", "io_models:mlp", str(inputs), *ARGS, "--out", str(out), *extra]


def _bytes(out: Path) -> bytes:
    if out.suffix == ".zarr":
        return np.asarray(zarr.open_array(str(out))[...]).tobytes()
    if out.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(out))["jacobian"].tobytes()
    return out.read_bytes()


def _reference(inputs: Path, out: Path) -> bytes:
    assert cli.main(_argv(inputs, out)) == 0
    return _bytes(out)


def _limited(inputs: Path, out: Path, limit: int) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    argv = [sys.executable, "-c", _LIMITED, str(limit), *_argv(inputs, out)]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def _one_line(err: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("hesse: error: OutputWriteError"), err
    assert "Traceback" not in err


def _trusted_blocks(out: Path) -> set[int]:
    """The blocks a resume would skip: recorded, with the checksum of the bytes there."""
    merged = mf.read_all(out)
    return set() if merged is None else set(merged.done)


@pytest.mark.parametrize(
    ("ext", "limit", "where"),
    [
        (".npy", 64_000, "the whole file is reserved at the start"),
        (".zarr", 16_000, "the first chunk (36 kB) is written at the start"),
        (".safetensors", 64_000, "the shards fit; the assembled file does not"),
    ],
)
def test_file_size_limit_then_resume(
    ext: str, limit: int, where: str, inputs: Path, tmp_path: Path
) -> None:
    want = _reference(inputs, tmp_path / f"ref{ext}")
    out = tmp_path / f"J{ext}"
    run = _limited(inputs, out, limit)
    assert run.returncode == CODE, (where, run.stderr)
    _one_line(run.stderr)
    assert "EFBIG" in run.stderr
    if ext == ".safetensors":  # every block is in its shard, checked on resume
        assert _trusted_blocks(out) == {0, 1, 2, 3}
        assert not out.exists()  # never a half-written result file
    else:  # nothing was kept that a resume would trust
        assert _trusted_blocks(out) == set()
    assert cli.main(_argv(inputs, out, "--resume")) == 0
    assert _bytes(out) == want
    assert json.loads(Path(f"{out}.manifest.json").read_text())["complete"]


@pytest.mark.parametrize("ext", [".npy", ".zarr"])
def test_disk_full_mid_run_then_resume(
    ext: str,
    inputs: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    want = _reference(inputs, tmp_path / f"ref{ext}")
    calls = {"n": 0}
    real = files.NpySink._start if ext == ".npy" else files.ZarrSink._index

    def full_disk(self: object, region: object) -> object:
        calls["n"] += 1
        if calls["n"] >= 3:  # the third block: no space left
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, region)

    cls = files.NpySink if ext == ".npy" else files.ZarrSink
    monkeypatch.setattr(cls, "_start" if ext == ".npy" else "_index", full_disk)
    out = tmp_path / f"J{ext}"
    capsys.readouterr()
    assert cli.main(_argv(inputs, out)) == CODE
    err = capsys.readouterr().err
    _one_line(err)
    assert "the disk is full" in err
    assert _trusted_blocks(out) == {0, 1}  # the blocks really written, and no other
    monkeypatch.undo()
    assert cli.main(_argv(inputs, out, "--resume")) == 0
    assert _bytes(out) == want
