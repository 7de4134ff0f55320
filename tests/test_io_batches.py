"""Dataset mode over iterables of batches (generators, lists, DataLoaders), float64.

Results against per-sample torch.func references; an interrupted run resumed over the same
batches equals an uninterrupted one byte for byte; other batches on resume are refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import hesse
import hesse.io
from hesse import errors
from io_models import mlp

zarr = pytest.importorskip("zarr")  # zarr 3 needs Python 3.11

K = 1  # the differentiated output


def _per_sample(quantity: str, model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """torch.func, one sample at a time, output K (laplacian: all outputs)."""

    def one(xi: torch.Tensor) -> torch.Tensor:
        if quantity == "jacobian":
            return torch.func.jacrev(lambda z: model(z)[K])(xi)
        if quantity == "hessian":
            return torch.func.hessian(lambda z: model(z)[K])(xi)
        H = torch.func.hessian(model)(xi)  # (m, n, n)
        diag = torch.diagonal(H, dim1=-2, dim2=-1)  # (m, n)
        return diag[K] if quantity == "hessian_diag" else diag.sum(-1)

    with torch.no_grad():
        return torch.stack([one(xi) for xi in x]).numpy()


def _batches(x: torch.Tensor, sizes: list[int], labels: bool = False) -> Iterator:
    s0 = 0
    for b in sizes:
        part = x[s0 : s0 + b]
        yield (part, torch.zeros(b)) if labels else part
        s0 += b


def _read(handle: object, quantity: str) -> np.ndarray:
    if isinstance(handle, Path):
        return load_file(str(handle))[quantity]
    return np.asarray(handle[...])


@pytest.fixture
def data() -> tuple[torch.nn.Module, torch.Tensor]:
    return mlp().double(), torch.randn(11, 6, dtype=torch.float64)


@pytest.mark.parametrize("quantity", ["jacobian", "hessian", "hessian_diag", "laplacian"])
@pytest.mark.parametrize("ext", [".zarr", ".safetensors", None])
def test_iterable_matches_torch_func(quantity: str, ext: str | None, data, tmp_path) -> None:
    model, x = data
    out = None if ext is None else tmp_path / f"R{ext}"
    output = None if quantity == "laplacian" else K
    handle = hesse.io.compute_to(
        quantity,
        model,
        _batches(x, [4, 4, 3], labels=True),  # (x, y) tuples: x is differentiated
        out,
        output=output,
        batched=True,
        block_size=3,  # batches of 4 are cut into blocks of 3 and 1
        progress=False,
    )
    got = handle.numpy() if ext is None else _read(handle, quantity)
    ref = _per_sample(quantity, model, x)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
    if out is not None:
        manifest = json.loads(Path(f"{out}.manifest.json").read_text())
        assert manifest["complete"] and len(manifest["inputs"]) == len(manifest["done"]) == 5


def test_dataloader_and_public_function(data, tmp_path) -> None:
    model, x = data
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, torch.arange(11)), batch_size=4
    )
    H = hesse.hessian(model, loader, output=K, batched=True, out=tmp_path / "H.zarr")
    np.testing.assert_allclose(
        np.asarray(H[...]), _per_sample("hessian", model, x), rtol=1e-10, atol=1e-12
    )
    # .npy needs the length up front
    with pytest.raises(errors.UnsupportedInputError, match="num_samples"):
        hesse.io.compute_to(
            "laplacian", model, loader, tmp_path / "L.npy", batched=True, progress=False
        )
    L = hesse.io.compute_to(
        "laplacian", model, loader, tmp_path / "L.npy", batched=True, num_samples=11,
        progress=False,
    )  # fmt: skip
    np.testing.assert_allclose(L, _per_sample("laplacian", model, x), rtol=1e-10, atol=1e-12)
    with pytest.raises(errors.UnsupportedInputError, match="gave 11 samples"):
        hesse.io.compute_to(
            "laplacian", model, loader, tmp_path / "L2.npy", batched=True, num_samples=12,
            progress=False,
        )  # fmt: skip


class _Stop(Exception):
    pass


def _interrupted(model, x, out: Path, after: int) -> None:
    """A run whose batches stop (as a kill would) after ``after`` batches."""

    def gen() -> Iterator[torch.Tensor]:
        for i, part in enumerate(_batches(x, [3, 3, 3, 2])):
            if i == after:
                raise _Stop
            yield part

    with pytest.raises(_Stop):
        hesse.io.compute_to(
            "hessian", model, gen(), out, output=K, batched=True, block_size=3, progress=False
        )


@pytest.mark.parametrize("ext", [".zarr", ".safetensors"])
def test_resume_is_byte_identical(ext: str, data, tmp_path) -> None:
    model, x = data
    full = hesse.io.compute_to(
        "hessian", model, _batches(x, [3, 3, 3, 2]), tmp_path / f"full{ext}", output=K,
        batched=True, block_size=3, progress=False,
    )  # fmt: skip
    out = tmp_path / f"R{ext}"
    _interrupted(model, x, out, after=2)
    assert set(json.loads(Path(f"{out}.manifest.json").read_text())["done"]) == {"0", "1"}
    again = hesse.io.compute_to(
        "hessian", model, _batches(x, [3, 3, 3, 2]), out, output=K, batched=True,
        resume=True, progress=False,
    )  # fmt: skip
    assert _read(again, "hessian").tobytes() == _read(full, "hessian").tobytes()


def test_resume_with_other_batches_is_refused(data, tmp_path) -> None:
    model, x = data
    out = tmp_path / "R.zarr"
    _interrupted(model, x, out, after=2)
    changed = x.clone()
    changed[4, 0] += 1.0  # sample 4 is in block 1, which the interrupted run finished
    with pytest.raises(errors.ResumeMismatchError, match="samples 3:6"):
        hesse.io.compute_to(
            "hessian", model, _batches(changed, [3, 3, 3, 2]), out, output=K, batched=True,
            resume=True, progress=False,
        )  # fmt: skip
    with pytest.raises(errors.OutputExistsError):
        hesse.io.compute_to(
            "hessian", model, _batches(x, [3, 3, 3, 2]), out, output=K, batched=True,
            progress=False,
        )  # fmt: skip
