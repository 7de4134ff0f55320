"""Models TorchDynamo refused to capture, so that the next call does not try again.

A model TorchDynamo cannot capture as one graph (a GRU, ``.item()``, a data-dependent
branch) costs a failed trace on every call: about 28 ms of a 40 ms GRU Hessian call. The
refusal is kept per model object (weakly; ``args=`` wrappers count as the model they
wrap) under the model's *structure*: its module tree (types, training flags, hook counts,
an overridden ``forward``), its parameters' and buffers' names, shapes and dtypes, a
function's code and closure cells, and the input's shape, dtype and device type. Any
change there tries the capture again.

It only decides whether hesse tries the capture; a refused model runs on the general
strategies, which call the model itself, so a stale entry can cost speed but never a
number.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Hashable

import torch
from torch import nn

from .arguments import WithArguments, unwrap

_REFUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _module_structure(model: nn.Module) -> tuple:
    modules = tuple(
        (
            name,
            type(m),
            m.training,
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            m.__dict__.get("forward"),
        )
        for name, m in model.named_modules()
    )
    tensors = tuple(
        (name, _shape(t), t.dtype)
        for name, t in (*model.named_parameters(), *model.named_buffers())
    )
    return modules, tensors


def _shape(t: torch.Tensor) -> tuple | None:
    """The shape, or None for a lazy module's uninitialised parameter."""
    return None if isinstance(t, nn.parameter.UninitializedTensorMixin) else tuple(t.shape)


def _function_structure(f: Callable) -> tuple:
    code = getattr(f, "__code__", None)
    cells = getattr(f, "__closure__", None) or ()
    return code, tuple(id(c.cell_contents) for c in cells if _filled(c))


def _filled(cell: object) -> bool:
    try:
        _ = cell.cell_contents  # type: ignore[attr-defined]
    except ValueError:  # an empty cell
        return False
    return True


def _owner_and_key(f: Callable, x: torch.Tensor) -> tuple[object, Hashable] | None:
    """The object to keep the refusal on and the structure it is keyed under."""
    extra: tuple = ()
    while isinstance(f, WithArguments):
        extra += tuple(
            (tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else id(a)
            for a in (*f.args, *f.kwargs.values())
        )
        f = f.f
    structure = _module_structure(f) if isinstance(f, nn.Module) else _function_structure(f)
    key = (structure, extra, tuple(x.shape), x.dtype, x.device.type)
    try:
        hash(key)
    except TypeError:  # an unhashable overridden forward: do not remember
        return None
    return f, key


def known_refusal(f: Callable, x: torch.Tensor) -> str | None:
    """Why TorchDynamo refused this model in this structure before (None: not known).

    The structure is read only for models refused before: a captured model's calls pay
    one dictionary lookup here.
    """
    with _LOCK:
        try:
            refused = _REFUSED.get(unwrap(f))
        except TypeError:  # not weak-referenceable
            return None
    if not refused:
        return None
    found = _owner_and_key(f, x)
    return None if found is None else refused.get(found[1])


def remember_refusal(f: Callable, x: torch.Tensor, reason: str) -> None:
    """Keeps TorchDynamo's refusal of this model in this structure."""
    found = _owner_and_key(f, x)
    if found is None:
        return
    owner, key = found
    with _LOCK, contextlib.suppress(TypeError):  # not weak-referenceable: try again
        _REFUSED.setdefault(owner, {})[key] = reason
