"""Loading models and tensors from files without running code from them.

- Inputs: ``.npy`` (memory-mapped, ``allow_pickle=False``), ``.npz`` (``allow_pickle=False``),
  ``.safetensors``, or ``.pt`` through ``torch.load(weights_only=True)``.
- Models: a ``torch.export`` archive (``.pt2``), checked first so that
  :func:`torch.export.load` never reaches one of its pickle paths; or
  ``package.module:factory`` with weights from ``.safetensors`` (or a ``.pt`` state_dict
  through ``weights_only=True``). TorchScript only when explicitly allowed.

Formats are recognised by content (magic bytes), and a file whose content disagrees with
its suffix is refused. Every failure is a typed error: :class:`~hesse.FileFormatError`
(truncated, corrupt, unsupported) or :class:`~hesse.UnsafeFileError` (needs pickle or
TorchScript).
"""

from __future__ import annotations

import importlib
import io
import json
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hesse.errors import FileFormatError, UnsafeFileError, UnsupportedModelError

from ._deps import require

_PT2_PICKLED = ("custom_obj", "opaque_obj")


def sniff(path: Path) -> str:
    """The format of a file from its first bytes.

    Returns:
        ``"npy"``, ``"zip"``, ``"safetensors"``, ``"pickle"`` or ``"unknown"``.

    Raises:
        FileFormatError: The file cannot be read.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
            size = path.stat().st_size
    except OSError as exc:
        raise FileFormatError(f"hesse compute: cannot read {path}: {exc.strerror}") from exc
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


def _expect(path: Path, found: str, wanted: str) -> None:
    if found == "pickle":
        raise UnsafeFileError(
            f"hesse compute: {path} is a pickle, which can run code when loaded; refused. "
            "Save tensors as .safetensors or .npy instead"
        )
    if found != wanted:
        raise FileFormatError(
            f"hesse compute: {path} does not look like a {wanted} file (its content looks "
            f"like {found}); it may be truncated or corrupt"
        )


def load_inputs(path: Path, key: str | None = None) -> Any:
    """Load the input array: a read-only memmap for ``.npy``, else an in-memory array.

    Args:
        path: ``.npy``, ``.npz``, ``.safetensors`` or ``.pt`` file.
        key: Which array of an ``.npz`` / ``.safetensors`` / ``.pt`` dict (optional when
            there is one).

    Returns:
        A NumPy array (or memmap) or a tensor, of a real floating dtype.
    """
    suffix, kind = path.suffix.lower(), sniff(path)
    try:
        if suffix == ".npy":
            _expect(path, kind, "npy")
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        elif suffix == ".npz":
            _expect(path, kind, "zip")
            with np.load(path, allow_pickle=False) as npz:
                arr = npz[_pick(path, list(npz.files), key)]
        elif suffix == ".safetensors":
            _expect(path, kind, "safetensors")
            st = require("safetensors.numpy", "hesse compute")
            tensors = st.load_file(str(path))
            arr = tensors[_pick(path, list(tensors), key)]
        elif suffix in (".pt", ".pth"):
            obj = _torch_load(path, kind)
            if isinstance(obj, dict):
                obj = obj[_pick(path, [str(k) for k in obj], key)]
            if not isinstance(obj, torch.Tensor):
                raise FileFormatError(f"hesse compute: {path} holds no tensor")
            arr = obj
        else:
            raise FileFormatError(
                f"hesse compute: cannot read inputs from {path.name!r}; use .npy, .npz, "
                ".safetensors or .pt"
            )
    except (FileFormatError, UnsafeFileError):
        raise
    except ValueError as exc:
        if "pickle" in str(exc) or "Python objects" in str(exc):
            raise UnsafeFileError(
                f"hesse compute: {path} holds object arrays, which need pickle; refused"
            ) from exc
        raise FileFormatError(f"hesse compute: {path} is truncated or corrupt ({exc})") from exc
    except Exception as exc:  # zip, safetensors and numpy errors of damaged files
        raise FileFormatError(
            f"hesse compute: {path} is truncated or corrupt ({type(exc).__name__}: {exc})"
        ) from exc
    if np.dtype(str(arr.dtype).removeprefix("torch.")).kind != "f":
        raise FileFormatError(f"hesse compute: {path} holds {arr.dtype}, not real floats")
    return arr


def _pick(path: Path, keys: list[str], key: str | None) -> str:
    if key is not None:
        if key not in keys:
            raise FileFormatError(f"hesse compute: {path} has no array {key!r}; it has {keys}")
        return key
    if len(keys) != 1:
        raise FileFormatError(
            f"hesse compute: {path} holds {len(keys)} arrays {keys[:5]}; choose one with "
            "--input-key"
        )
    return keys[0]


def _torch_load(path: Path, kind: str) -> Any:
    """``torch.load(weights_only=True)``: tensors and containers only, never code."""
    if kind not in ("zip", "pickle"):
        raise FileFormatError(f"hesse compute: {path} is not a torch.save file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(
            f"hesse compute: {path} needs more than tensors to load (pickled code or "
            "objects); refused. Save a state_dict or use .safetensors"
        ) from exc
    except RuntimeError as exc:
        if "TorchScript" in str(exc) or "weights_only" in str(exc):
            raise UnsafeFileError(
                f"hesse compute: {path} is a TorchScript archive; refused"
            ) from exc
        raise FileFormatError(f"hesse compute: {path} is truncated or corrupt") from exc
    except Exception as exc:
        raise FileFormatError(
            f"hesse compute: {path} is truncated or corrupt ({type(exc).__name__})"
        ) from exc


def load_model(
    model: str, weights: Path | None = None, *, allow_torchscript: bool = False
) -> torch.nn.Module:
    """Load ``MODEL``: a ``.pt2`` archive, TorchScript (if allowed) or ``module:factory``.

    Raises:
        UnsafeFileError: A pickled module, TorchScript without ``allow_torchscript``, or a
            ``.pt2`` archive whose loading would unpickle something.
        FileFormatError: A missing, truncated or corrupt file.
        UnsupportedModelError: The factory fails or the weights do not fit it.
    """
    path = Path(model)
    if not path.exists() and ":" in model:
        return _from_factory(model, weights)
    if weights is not None:
        raise FileFormatError("hesse compute: --weights goes with a package.module:factory model")
    kind = sniff(path)
    if kind != "zip":
        _expect(path, kind, "zip archive (.pt2)")
    try:
        names = zipfile.ZipFile(path).namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise FileFormatError(f"hesse compute: {path} is truncated or corrupt") from exc
    if any(n.endswith("/archive_format") for n in names):
        return _load_pt2(path, names)
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        if not allow_torchscript:
            raise UnsafeFileError(
                f"hesse compute: {path} is TorchScript, which runs its own code; pass "
                "--allow-torchscript if you trust it"
            )
        try:
            return torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as exc:
            raise FileFormatError(f"hesse compute: cannot load TorchScript {path}") from exc
    raise UnsafeFileError(
        f"hesse compute: {path} is a torch.save checkpoint, not a model archive; pass the "
        "model as package.module:factory and the checkpoint (a state_dict) with --weights"
    )


def _load_pt2(path: Path, names: list[str]) -> torch.nn.Module:
    """``torch.export.load`` after checking that no member would be unpickled."""
    zf = zipfile.ZipFile(path)
    try:
        for name in names:
            if name.endswith(".pt"):  # sample inputs, legacy weights: must load tensor-only
                torch.load(io.BytesIO(zf.read(name)), map_location="cpu", weights_only=True)
            elif name.endswith("_config.json") and "/data/" in name:
                config = json.loads(zf.read(name)).get("config", {})
                for meta in config.values():
                    if meta.get("use_pickle") or str(meta.get("path_name", "")).startswith(
                        _PT2_PICKLED
                    ):
                        raise UnsafeFileError(
                            f"hesse compute: {path} stores pickled objects ({name}); refused"
                        )
    except UnsafeFileError:
        raise
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(f"hesse compute: {path} holds a pickle payload; refused") from exc
    except Exception as exc:
        raise FileFormatError(f"hesse compute: {path} is truncated or corrupt ({exc})") from exc
    try:
        return torch.export.load(path).module()
    except Exception as exc:
        raise FileFormatError(
            f"hesse compute: torch.export.load failed on {path} ({type(exc).__name__})"
        ) from exc


def _from_factory(spec: str, weights: Path | None) -> torch.nn.Module:
    mod_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
        model = factory()
    except Exception as exc:
        raise UnsupportedModelError(
            f"hesse compute: cannot build the model {spec} ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedModelError(f"hesse compute: {spec}() returned no nn.Module")
    if weights is not None:
        state = load_weights(weights)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise UnsupportedModelError(
                f"hesse compute: {weights} does not fit {spec}: {first}"
            ) from exc
    return model.eval()


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from ``.safetensors``, or ``.pt`` through ``weights_only=True``."""
    kind = sniff(path)
    if path.suffix.lower() == ".safetensors":
        _expect(path, kind, "safetensors")
        st = require("safetensors.torch", "hesse compute")
        try:
            return st.load_file(str(path))
        except Exception as exc:
            raise FileFormatError(f"hesse compute: {path} is truncated or corrupt") from exc
    if path.suffix.lower() in (".pt", ".pth"):
        state = _torch_load(path, kind)
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise FileFormatError(f"hesse compute: {path} is not a state_dict of tensors")
        return state
    raise FileFormatError(f"hesse compute: weights must be .safetensors or .pt, got {path.name}")


def static_batch(model: torch.nn.Module) -> tuple[int, ...] | None:
    """The input shape an exported program was traced with, if its batch size is static."""
    graph = getattr(model, "graph", None)
    if graph is None or not hasattr(model, "_in_spec"):
        return None
    for node in graph.nodes:
        if node.op == "placeholder" and not node.name.startswith(("p_", "b_", "c_")):
            val = node.meta.get("val")
            shape = getattr(val, "shape", None)
            if shape and isinstance(shape[0], int):
                return tuple(int(s) for s in shape)
    return None
