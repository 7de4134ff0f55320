"""Registry of the benchmarked methods: name -> how to prepare it for a case instance.

A method's ``prepare(inst)`` does the one-off work (building a JAX/hessQuik model, jit
wrappers) and returns a zero-argument callable that computes the case's quantity and
returns it as a torch tensor or an array (numpy/JAX) in the common layout of
:mod:`benchmarks.cases`. It raises :class:`Unsupported` for a case the method cannot express
and :class:`MissingDependency` when an optional package is not installed.

Modules register their methods on import; :func:`methods` imports them all once.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..cases import Instance

Prepared = Callable[[], Any]
EVAL = ("hessian", "hessian_diag", "laplacian")  # what a method computes unless it says


class Unsupported(Exception):
    """The method cannot compute this case (recorded as "unsupported")."""


class MissingDependency(Exception):
    """An optional package of the method is not installed (recorded as "skipped")."""


@dataclass(frozen=True)
class Method:
    """A benchmarked method.

    Attributes:
        name: Registry key, used on the command line and in the tables.
        label: Readable description for the report.
        group: Peer family ("seed", "torch.autograd", "torch.func", "jax", "hessQuik",
            "hesse").
        prepare: Instance -> zero-argument callable returning the result.
        slow: Pathologically slow on big batches (left out on batched cases by ``--quick``).
        quantities: The case quantities it computes; others are recorded "unsupported".
        randomized: It returns a randomized estimate: verified for shape and finiteness
            only (its error against the exact reference is recorded, not enforced).
    """

    name: str
    label: str
    group: str
    prepare: Callable[[Instance], Prepared]
    slow: bool = False
    quantities: tuple[str, ...] = EVAL
    randomized: bool = False


_REGISTRY: dict[str, Method] = {}
_MODULES = (
    "torch_peers",
    "jax_peers",
    "hessquik_peers",
    "train_peers",
    "folx_peers",
    "jet_peers",
    "hesse_peers",
)
_loaded = False


def register(method: Method, *, overwrite: bool = False) -> Method:
    """Adds a method to the registry; refuses a silent override of an existing name."""
    if method.name in _REGISTRY and not overwrite:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def methods() -> dict[str, Method]:
    """All registered methods, in registration order (peers first, hesse last)."""
    global _loaded
    if not _loaded:
        for module in _MODULES:
            importlib.import_module(f"{__name__}.{module}")
        _loaded = True
    return dict(_REGISTRY)


def get(name: str) -> Method:
    """The method named ``name``; a miss lists the valid names."""
    table = methods()
    if name not in table:
        raise KeyError(f"unknown method {name!r}; valid: {', '.join(table)}")
    return table[name]
