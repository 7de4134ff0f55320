"""Sink objects for ``out=``: a user's own memmap, a callback, a sink that fails (float64).

Every result is compared with the in-memory call and with a per-sample torch.func
reference; a failing sink must give a typed error and leave a manifest that lists only
the blocks it really wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import hesse
import hesse.io
from hesse import errors
from io_models import mlp


class MemmapSink(hesse.io.Sink):
    """A user's own ``.npy`` memmap, written block by block, resumable (it has a path)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def exists(self) -> bool:
        return self.path.exists()

    def open(self, layout, blocks, create) -> None:
        mode = "w+" if create else "r+"
        self.mm = np.lib.format.open_memmap(
            self.path, mode=mode, dtype=layout.dtype, shape=layout.shape
        )
        self.work = self.mm.reshape(layout.work_shape)

    def write(self, block, data) -> None:
        self.work[block.s0 : block.s1, block.r0 : block.r1] = data

    def read(self, block):
        return np.array(self.work[block.s0 : block.s1, block.r0 : block.r1])

    def result(self):
        self.mm.flush()
        return np.load(self.path, mmap_mode="r")


class Failing(MemmapSink):
    """Raises on its ``fail_at``-th write."""

    def __init__(self, path: Path, fail_at: int, exc: Exception) -> None:
        super().__init__(path)
        self.fail_at, self.exc, self.writes = fail_at, exc, 0

    def write(self, block, data) -> None:
        self.writes += 1
        if self.writes == self.fail_at:
            raise self.exc
        super().write(block, data)


def _torch_func_hessians(model: torch.nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    """Per-sample Hessians of output ``k``, nested torch.func, looped over samples."""
    with torch.no_grad():
        return torch.stack([torch.func.hessian(lambda z: model(z)[k])(xi) for xi in x])


@pytest.fixture
def data() -> tuple[torch.nn.Module, torch.Tensor]:
    return mlp().double(), torch.randn(7, 6, dtype=torch.float64)


def test_memmap_sink_object(data: tuple, tmp_path: Path) -> None:
    model, x = data
    handle = hesse.hessian(
        model, x, output=1, batched=True, out=MemmapSink(tmp_path / "mine.npy"), max_memory=3000
    )
    ref = _torch_func_hessians(model, x, 1)
    np.testing.assert_allclose(np.asarray(handle), ref.numpy(), rtol=1e-10, atol=1e-12)
    manifest = json.loads((tmp_path / "mine.npy.manifest.json").read_text())
    assert manifest["complete"] and manifest["config"]["sink"] == "MemmapSink"
    assert manifest["config"]["blocks"] > 1  # several blocks really went through write


def test_callback_sink_sees_every_block(data: tuple) -> None:
    model, x = data
    got = np.zeros((7, 6, 6))
    seen: list[int] = []

    def keep(block: hesse.io.Block, values: np.ndarray) -> None:
        seen.append(block.id)
        got[block.s0 : block.s1] = values.reshape(block.s1 - block.s0, 6, 6)

    sink = hesse.io.CallbackSink(keep)
    out = hesse.io.compute_to(
        "hessian", model, x, sink, output=1, batched=True, block_size=2, progress=False
    )
    assert out is sink and sorted(seen) == [0, 1, 2, 3]
    ref = _torch_func_hessians(model, x, 1)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "exc", [ValueError("no room in the queue"), OSError(28, "No space left on device")]
)
def test_failing_sink_is_typed_and_manifest_sound(data: tuple, tmp_path: Path, exc) -> None:
    model, x = data
    out = tmp_path / "mine.npy"
    with pytest.raises(errors.OutputWriteError, match="failed to write block 2") as info:
        hesse.io.compute_to(
            "hessian",
            model,
            x,
            Failing(out, fail_at=3, exc=exc),
            output=1,
            batched=True,
            block_size=2,
            progress=False,
        )
    assert "\n" not in str(info.value)
    from hesse.io import manifest as mf

    merged = mf.read_all(out)  # valid JSON, the right blocks, each checksum true
    assert merged is not None and set(merged.done) == {0, 1} and not merged.complete
    again = hesse.io.compute_to(
        "hessian",
        model,
        x,
        Failing(out, fail_at=0, exc=exc),  # the same kind of sink, now with room
        output=1,
        batched=True,
        block_size=2,
        resume=True,
        progress=False,
    )
    want = hesse.io.compute_to(
        "hessian", model, x, None, output=1, batched=True, block_size=2, progress=False
    )
    assert np.asarray(again).tobytes() == want.numpy().tobytes()


def test_not_a_sink_is_refused(data: tuple) -> None:
    model, x = data
    with pytest.raises(errors.UnsupportedInputError, match=r"hesse\.io\.Sink"):
        hesse.hessian(model, x, batched=True, out=[])
    with pytest.raises(errors.UnsupportedInputError, match="resume=True needs"):
        hesse.io.compute_to(
            "laplacian",
            model,
            x,
            hesse.io.CallbackSink(lambda b, d: None),
            batched=True,
            resume=True,
            progress=False,
        )
