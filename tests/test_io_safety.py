"""`hesse compute` on hostile and broken files: typed errors, one line, no code run."""

from __future__ import annotations

import io
import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import hesse
from hesse import cli, errors
from io_models import mlp

CODE = cli.EXIT_CODES


class Payload:
    """Unpickling this creates the canary file."""

    def __init__(self, canary: Path) -> None:
        self.canary = str(canary)

    def __reduce__(self) -> tuple:
        return (open, (self.canary, "w"))


@pytest.fixture
def files(tmp_path: Path) -> Path:
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((5, 6)).astype("float32"))
    save_file(mlp().state_dict(), tmp_path / "w.safetensors")
    torch.export.save(
        torch.export.export(mlp(), (torch.randn(1, 6, dtype=torch.float32),)), tmp_path / "m1.pt2"
    )
    return tmp_path


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def _one_line(err: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("hesse: error: "), err
    assert "Traceback" not in err


def _evil_pt2(base: Path, canary: Path, dest: Path) -> None:
    buf = io.BytesIO()
    torch.save(Payload(canary), buf)
    with zipfile.ZipFile(base) as src, zipfile.ZipFile(dest, "w") as out:
        for item in src.infolist():
            data = src.read(item.filename)
            if "sample_inputs" in item.filename:
                data = buf.getvalue()
            out.writestr(item, data)


@pytest.mark.parametrize(
    "role",
    [
        "model-pickle",
        "model-pt",
        "model-pt2",
        "inputs-pt",
        "inputs-npy",
        "inputs-npz",
        "weights-pt",
    ],
)
def test_pickle_payload_never_runs(
    role: str, files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    canary = files / "canary"
    evil = Payload(canary)
    model, inputs, extra = "io_models:mlp", files / "x.npy", ["--weights", files / "w.safetensors"]
    if role == "model-pickle":
        (files / "m.pt").write_bytes(pickle.dumps(evil))
        model, extra = str(files / "m.pt"), []
    elif role == "model-pt":
        torch.save(evil, files / "m.pt")
        model, extra = str(files / "m.pt"), []
    elif role == "model-pt2":
        _evil_pt2(files / "m1.pt2", canary, files / "m.pt2")
        model, extra = str(files / "m.pt2"), []
    elif role == "inputs-pt":
        torch.save({"x": evil}, files / "x.pt")
        inputs = files / "x.pt"
    elif role == "inputs-npy":
        np.save(files / "x.npy", np.array([evil], dtype=object), allow_pickle=True)
    elif role == "inputs-npz":
        np.savez(files / "x.npz", x=np.array([evil], dtype=object))
        inputs = files / "x.npz"
    else:
        torch.save({"0.weight": evil}, files / "w.pt")
        extra = ["--weights", files / "w.pt"]
    code, err = _run(
        capsys,
        "compute",
        model,
        inputs,
        *extra,
        "--quantity",
        "laplacian",
        "--batched",
        "--out",
        files / "L.npy",
        "--quiet",
    )
    assert not canary.exists()
    assert code == CODE[errors.UnsafeFileError], err
    _one_line(err)
    assert not (files / "L.npy").exists()


@pytest.mark.parametrize("which", ["inputs-npy", "inputs-safetensors", "model-pt2", "weights"])
def test_truncated_files(which: str, files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, inputs, extra = "io_models:mlp", files / "x.npy", ["--weights", files / "w.safetensors"]
    if which == "inputs-npy":
        target = inputs
    elif which == "inputs-safetensors":
        save_file({"x": torch.randn(5, 6)}, files / "x.safetensors")
        target = inputs = files / "x.safetensors"
    elif which == "model-pt2":
        target, model, extra = files / "m1.pt2", str(files / "m1.pt2"), []
    else:
        target = files / "w.safetensors"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    code, err = _run(
        capsys,
        "compute",
        model,
        inputs,
        *extra,
        "--quantity",
        "hessian",
        "--batched",
        "--output",
        "0",
        "--out",
        files / "H.zarr",
        "--quiet",
    )
    assert code == CODE[errors.FileFormatError], err
    _one_line(err)
    assert not (files / "H.zarr").exists()


def test_model_rejects_input_shape(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(files / "x7.npy", np.zeros((4, 7), dtype="float32"))
    for model in ("io_models:mlp", files / "m1.pt2"):
        code, err = _run(
            capsys,
            "compute",
            model,
            files / "x7.npy",
            "--quantity",
            "hessian",
            "--batched",
            "--out",
            files / "H.npy",
            "--quiet",
        )
        assert code == CODE[errors.UnsupportedModelError], err
        _one_line(err)
        assert not (files / "H.npy").exists()


def test_static_batch_export(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Batch-1 exports run sample by sample; other static batch sizes are a typed error."""
    torch.export.save(
        torch.export.export(mlp(), (torch.randn(2, 6, dtype=torch.float32),)), files / "m2.pt2"
    )
    code, err = _run(
        capsys,
        "compute",
        files / "m2.pt2",
        files / "x.npy",
        "--quantity",
        "laplacian",
        "--batched",
        "--out",
        files / "L.npy",
        "--quiet",
    )
    assert code == CODE[errors.UnsupportedModelError] and "static batch size of 2" in err
    args = ["--quantity", "hessian_diag", "--batched", "--quiet"]
    assert (
        _run(capsys, "compute", files / "m1.pt2", files / "x.npy", *args, "--out", files / "a.npy")[
            0
        ]
        == 0
    )
    assert (
        _run(
            capsys,
            "compute",
            "io_models:mlp",
            files / "x.npy",
            "--weights",
            files / "w.safetensors",
            *args,
            "--out",
            files / "b.npy",
        )[0]
        == 0
    )
    np.testing.assert_allclose(np.load(files / "a.npy"), np.load(files / "b.npy"), atol=1e-5)


def test_torchscript_needs_opt_in(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(
            torch.jit.trace(mlp(), torch.randn(2, 6, dtype=torch.float32)), files / "ts.pt"
        )
    argv = [
        "compute",
        files / "ts.pt",
        files / "x.npy",
        "--quantity",
        "laplacian",
        "--batched",
        "--out",
        files / "L.npy",
        "--quiet",
        "--strategy",
        "loop",
    ]
    code, err = _run(capsys, *argv)
    assert code == CODE[errors.UnsafeFileError] and "--allow-torchscript" in err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert _run(capsys, *argv, "--allow-torchscript")[0] == 0


def test_existing_output_untouched(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (files / "H.npy").write_bytes(b"precious")
    code, err = _run(
        capsys,
        "compute",
        "io_models:mlp",
        files / "x.npy",
        "--quantity",
        "laplacian",
        "--batched",
        "--out",
        files / "H.npy",
        "--quiet",
    )
    assert code == CODE[errors.OutputExistsError]
    _one_line(err)
    code, err = _run(
        capsys,
        "compute",
        "io_models:mlp",
        files / "x.npy",
        "--quantity",
        "laplacian",
        "--batched",
        "--out",
        files / "H.npy",
        "--quiet",
        "--resume",
    )
    assert code == CODE[errors.OutputExistsError] and "not a resumable" in err
    assert (files / "H.npy").read_bytes() == b"precious"


def test_unwritable_output_folder(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (files / "file.txt").write_text("a file, not a folder")
    out = files / "file.txt" / "sub" / "H.npy"  # unwritable even for root
    code, err = _run(
        capsys,
        "compute",
        "io_models:mlp",
        files / "x.npy",
        "--quantity",
        "laplacian",
        "--batched",
        "--out",
        out,
        "--quiet",
    )
    assert code == CODE[errors.OutputWriteError], err
    _one_line(err)
    assert (files / "file.txt").read_text() == "a file, not a folder"


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_compute_eigs(files: Path, capsys: pytest.CaptureFixture[str], suffix: str) -> None:
    """``--quantity eigs`` writes the top eigenpairs of each sample's logit Hessian."""
    out = files / f"eigs{suffix}"
    code, err = _run(
        capsys, "compute", "io_models:mlp", files / "x.npy", "--weights", files / "w.safetensors",
        "--quantity", "eigs", "--k", "2", "--batched", "--output", "0", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    if suffix == ".npz":
        got = dict(np.load(out))
    else:
        from safetensors.numpy import load_file as load

        got = load(str(out))
    from safetensors.torch import load_file as load_weights

    model = mlp()
    model.load_state_dict(load_weights(str(files / "w.safetensors")))
    x = torch.from_numpy(np.load(files / "x.npy"))
    h = hesse.hessian(model.double(), x.double(), batched=True, output=0, flat=True)
    want = torch.linalg.eigvalsh(h)[:, -2:]
    np.testing.assert_allclose(np.sort(got["values"], axis=-1), want.numpy(), rtol=1e-4, atol=1e-6)
    assert got["vectors"].shape == (5, 2, 6) and got["residuals"].shape == (5, 2)
    code, err = _run(
        capsys, "compute", "io_models:mlp", files / "x.npy", "--weights", files / "w.safetensors",
        "--quantity", "eigs", "--batched", "--output", "0", "--out", out,
    )  # fmt: skip
    assert code != 0 and "exists" in err
    _one_line(err)
