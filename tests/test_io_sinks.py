"""hesse.io.compute_to: every sink and block layout against in-memory hesse calls (float64)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import hesse
import hesse.io
from hesse import errors
from io_models import cnn, mlp

zarr = pytest.importorskip("zarr")  # zarr 3 needs Python 3.11

QUANTITIES = ["jacobian", "hessian", "hessian_diag", "laplacian"]
SINKS = [".npy", ".zarr", ".safetensors"]


def _read(handle: object, quantity: str) -> np.ndarray:
    if isinstance(handle, Path):
        return load_file(str(handle))[quantity]
    return np.asarray(handle[...])


@pytest.fixture
def data() -> tuple[torch.nn.Module, torch.Tensor]:
    return mlp().double(), torch.randn(7, 6, dtype=torch.float64)


@pytest.mark.parametrize("quantity", QUANTITIES)
def test_every_sink_matches_memory(quantity: str, data: tuple, tmp_path: Path) -> None:
    model, x = data
    ref = getattr(hesse, quantity)(model, x, output=1, batched=True).numpy()
    arrays = []
    for ext in SINKS:  # 3 samples per block: 3 blocks, the last one short
        out = tmp_path / f"r{ext}"
        handle = hesse.io.compute_to(
            quantity,
            model,
            x.numpy(),
            out,
            output=1,
            batched=True,
            max_memory=3000,
            progress=False,
        )
        arr = _read(handle, quantity)
        np.testing.assert_allclose(arr, ref, rtol=1e-12, atol=1e-14)
        arrays.append(arr)
        manifest = json.loads(Path(f"{out}.manifest.json").read_text())
        assert manifest["complete"] and len(manifest["done"]) == manifest["config"]["blocks"]
    mem = hesse.io.compute_to(
        quantity, model, x, None, output=1, batched=True, max_memory=3000, progress=False
    )
    for arr in arrays:  # the same blocks, the same strategy: the same bytes
        assert arr.tobytes() == mem.numpy().tobytes()


@pytest.mark.parametrize("ext", SINKS)
def test_hessian_row_blocks(ext: str, tmp_path: Path) -> None:
    model = cnn().double()
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    ref = hesse.hessian(model, x, output=2, batched=True)  # (2, 1, 6, 6, 1, 6, 6)
    budget = 36 * 36 * 8  # one sample's Hessian takes the whole budget: row blocks
    handle = hesse.io.compute_to(
        "hessian",
        model,
        x,
        tmp_path / f"H{ext}",
        output=2,
        batched=True,
        max_memory=budget,
        progress=False,
    )
    arr = _read(handle, "hessian")
    config = json.loads(Path(f"{tmp_path / f'H{ext}'}.manifest.json").read_text())["config"]
    assert config["row_mode"] and config["blocks"] > 2
    np.testing.assert_allclose(arr.reshape(ref.shape), ref.numpy(), rtol=1e-10, atol=1e-12)


def test_unbatched_row_blocks_match_hessian(tmp_path: Path) -> None:
    model = mlp().double()
    x = torch.randn(6, dtype=torch.float64)
    H = hesse.io.compute_to(
        "hessian", model, x, tmp_path / "H.npy", output=0, max_memory=400, progress=False
    )
    np.testing.assert_allclose(H, hesse.hessian(model, x, output=0).numpy(), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("quantity", ["hessian", "hessian_diag", "laplacian"])
def test_dataset_mode_matches_per_sample_calls(quantity: str, tmp_path: Path) -> None:
    model = cnn().double()
    x = np.random.default_rng(0).standard_normal((9, 1, 6, 6))
    np.save(tmp_path / "x.npy", x)
    z = zarr.create_array(
        store=str(tmp_path / "x.zarr"), shape=x.shape, chunks=(4, 1, 6, 6), dtype="float64"
    )
    z[...] = x
    for src in (
        np.load(tmp_path / "x.npy", mmap_mode="r"),
        zarr.open_array(str(tmp_path / "x.zarr")),
    ):
        out = tmp_path / f"{quantity}{len(list(tmp_path.iterdir()))}.zarr"
        got = _read(
            hesse.io.compute_to(
                quantity,
                model,
                src,
                out,
                output=None if quantity != "hessian" else 1,
                batched=True,
                flat=True,
                max_memory="200kB",
                progress=False,
            ),
            quantity,
        )
        for i in range(len(x)):
            xi = torch.from_numpy(x[i])
            ref = getattr(hesse, quantity)(
                model,
                xi[None],
                output=None if quantity != "hessian" else 1,
                batched=True,
                flat=True,
            )[0]
            np.testing.assert_allclose(got[i], ref.numpy(), rtol=1e-10, atol=1e-13)


def test_resume_with_other_inputs_is_refused(data: tuple, tmp_path: Path) -> None:
    model, x = data
    out = tmp_path / "H.npy"
    hesse.io.compute_to("hessian", model, x, out, output=1, batched=True, progress=False)
    with pytest.raises(errors.ResumeMismatchError, match="input"):
        hesse.io.compute_to(
            "hessian", model, x + 1, out, output=1, batched=True, resume=True, progress=False
        )
    with pytest.raises(errors.OutputExistsError):
        hesse.io.compute_to("hessian", model, x, out, output=1, batched=True, progress=False)


def test_resume_recomputes_blocks_whose_bytes_changed(data: tuple, tmp_path: Path) -> None:
    model, x = data
    out = tmp_path / "H.npy"
    first = np.array(
        hesse.io.compute_to(
            "hessian", model, x, out, output=1, batched=True, max_memory=3000, progress=False
        )
    )
    manifest = Path(f"{out}.manifest.json")
    body = json.loads(manifest.read_text())
    body["complete"] = False
    manifest.write_text(json.dumps(body))
    mm = np.load(out, mmap_mode="r+")
    mm[5] = 0.0  # damage a block behind the manifest's back
    mm.flush()
    del mm
    again = hesse.io.compute_to(
        "hessian",
        model,
        x,
        out,
        output=1,
        batched=True,
        max_memory=3000,
        resume=True,
        progress=False,
    )
    assert np.asarray(again).tobytes() == first.tobytes()


def test_corrupt_manifest_is_a_typed_error(data: tuple, tmp_path: Path) -> None:
    model, x = data
    out = tmp_path / "H.npy"
    hesse.io.compute_to("laplacian", model, x, out, batched=True, progress=False)
    Path(f"{out}.manifest.json").write_text("{not json")
    with pytest.raises(errors.FileFormatError, match="manifest"):
        hesse.io.compute_to("laplacian", model, x, out, batched=True, resume=True, progress=False)


def test_missing_extra_names_it(
    monkeypatch: pytest.MonkeyPatch, data: tuple, tmp_path: Path
) -> None:
    import builtins

    real = builtins.__import__

    def no_zarr(name: str, *args: object, **kwargs: object) -> object:
        if name.split(".")[0] == "zarr":
            raise ImportError("no zarr")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_zarr)
    monkeypatch.delitem(__import__("sys").modules, "zarr")
    model, x = data
    with pytest.raises(errors.MissingDependencyError, match=r"hesse\[io\]"):
        hesse.io.compute_to(
            "laplacian", model, x, tmp_path / "L.zarr", batched=True, progress=False
        )


@pytest.mark.parametrize("quantity", ["hessian", "hessian_diag", "laplacian", "jacobian"])
def test_public_out_equals_in_memory(tmp_path, quantity):
    """``hesse.<quantity>(..., out="R.npy")`` streams the same numbers into a file."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)
    ).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    fn = getattr(hesse, quantity)
    want = fn(model, x, batched=True, output=1, flat=True)
    handle = fn(model, x, batched=True, output=1, flat=True, out=tmp_path / "R.npy")
    np.testing.assert_allclose(np.asarray(handle), want.numpy(), rtol=1e-12, atol=1e-14)
