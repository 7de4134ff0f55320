"""Lazy imports of the optional ``[io]`` dependencies (zarr, safetensors)."""

from __future__ import annotations

import importlib
from types import ModuleType

from hesse.errors import MissingDependencyError

_EXTRA = {"zarr": "io", "safetensors": "io", "tqdm": "io"}


def require(module: str, caller: str = "hesse.io") -> ModuleType:
    """Import ``module`` or raise a typed error naming the extra that installs it.

    Args:
        module: Dotted module name, e.g. ``"zarr"`` or ``"safetensors.numpy"``.
        caller: The public call, for the message.

    Returns:
        The imported module.

    Raises:
        MissingDependencyError: The module is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = _EXTRA.get(module.split(".")[0], "io")
        raise MissingDependencyError(
            f"{caller}: {module.split('.')[0]} is not installed; pip install 'hesse[{extra}]'"
        ) from exc
