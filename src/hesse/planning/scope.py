"""hesse's scope: what a derivative computation needs set around it, and nothing outside.

Every public call runs its work inside :func:`derivative_scope`:

- ``torch.inference_mode`` and ``torch.autocast`` regions of the caller are switched off
  for the call (thread-local settings): derivatives need autograd, and autocast's reduced
  precision would give second derivatives with about three correct digits;
- the fused attention kernels (``nn.MultiheadAttention``'s fast path, flash and
  memory-efficient scaled-dot-product attention) have no double backward, so the math
  kernels are used while any hesse call runs. These switches are process-wide in torch:
  they are set when the first concurrent hesse call enters and put back when the last one
  leaves (a reference count under a lock);
- :func:`preserved` keeps the caller's model as it was: buffers that ``forward`` updates
  in place, and plain Python attributes it reassigns (counters, caches), are put back.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

# torch.func's transforms keep their levels process-wide (forward-mode AD from two threads
# at once fails or mixes), so hesse's calls run one at a time; reentrant for nested calls.
CALLS = threading.RLock()
_LOCK = threading.Lock()
_ACTIVE = 0
_RESTORE: list[Callable[[], None]] = []


def _enter_global() -> None:
    """Switches the fused attention kernels off (first concurrent call only)."""
    global _ACTIVE
    with _LOCK:
        _ACTIVE += 1
        if _ACTIVE > 1:
            return
        mha = torch.backends.mha
        previous = mha.get_fastpath_enabled()
        mha.set_fastpath_enabled(False)
        _RESTORE.append(lambda: mha.set_fastpath_enabled(previous))
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            kernel = sdpa_kernel(SDPBackend.MATH)
            kernel.__enter__()
            _RESTORE.append(lambda: kernel.__exit__(None, None, None))
        except (ImportError, RuntimeError, AttributeError):  # pragma: no cover - old torch
            pass


def _leave_global() -> None:
    """Puts the attention switches back (last concurrent call only)."""
    global _ACTIVE
    with _LOCK:
        _ACTIVE -= 1
        if _ACTIVE == 0:
            while _RESTORE:
                _RESTORE.pop()()


@contextlib.contextmanager
def derivative_scope() -> Iterator[None]:
    """The settings of one hesse call (see the module docstring)."""
    _enter_global()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            for device in ("cpu", "cuda"):
                with contextlib.suppress(RuntimeError, AssertionError):
                    stack.enter_context(torch.autocast(device_type=device, enabled=False))
            yield
    finally:
        _leave_global()


def _plain(value: Any) -> bool:
    """Values a forward may reassign as state: numbers, strings, None, tensors."""
    return value is None or isinstance(value, (bool, int, float, str, torch.Tensor))


def _snapshot(model: nn.Module) -> list[tuple[nn.Module, dict[str, Any], dict[str, Any]]]:
    state = []
    for module in model.modules():
        if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
            continue  # its first forward initialises it: that change is meant to stay
        attrs = {k: v for k, v in vars(module).items() if not k.startswith("_") and _plain(v)}
        buffers = {
            k: (b, b._version, b.detach().clone())
            for k, b in module._buffers.items()
            if b is not None
        }
        state.append((module, attrs, buffers))
    return state


def _restore(state: list[tuple[nn.Module, dict[str, Any], dict[str, Any]]]) -> None:
    for module, attrs, buffers in state:
        for key, value in attrs.items():
            if module.__dict__.get(key, _MISSING) is not value:
                module.__dict__[key] = value
        for key, (buf, version, copy) in buffers.items():
            # `in` and `[]`: a ScriptModule's buffers are an OrderedDictWrapper (no .get)
            current = module._buffers[key] if key in module._buffers else None  # noqa: SIM401
            if current is not buf:
                module._buffers[key] = buf
            if buf._version != version:
                with torch.no_grad():
                    buf.copy_(copy)


_MISSING = object()


@contextlib.contextmanager
def preserved(f: Callable[..., Any]) -> Iterator[None]:
    """Puts a module's buffers and plain attributes back after the block.

    Args:
        f: The caller's model; plain functions are left alone (nothing to restore).
    """
    if not isinstance(f, nn.Module):
        yield
        return
    state = _snapshot(f)
    try:
        yield
    finally:
        _restore(state)


F = TypeVar("F", bound=Callable[..., Any])


def serialised(fn: F) -> F:
    """Runs a public function under :data:`CALLS` (one hesse call at a time)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with CALLS:
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
