"""Graph capture: the caller's model as a list of steps with known rules.

hesse captures with :func:`torch.fx.symbolic_trace` rather than ``make_fx``:

- it fails loudly on data-dependent control flow (``if x.sum() > 0``), where ``make_fx``
  would bake in the branch taken by one example and give silently wrong results for
  other inputs; a failed capture simply sends the call to the general strategies;
- its nodes are the model's own modules and functions (``nn.Linear '0'``, ``F.gelu``), so
  the plan can name the layer it could not handle;
- tracing costs a few milliseconds once per model; the result is cached.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .rules import Rule, lookup


class CaptureError(Exception):
    """The model could not be captured as a graph of known ops (internal; triggers fallback)."""


@dataclass(frozen=True)
class Step:
    """One node of the captured graph.

    Attributes:
        node: The fx node.
        call: What evaluates it: a module, a function, or a method caller.
        rule: How its tangents and second-order term are computed.
        label: A readable name for plans and messages, e.g. ``"tanh (nn.Tanh '1')"``.
    """

    node: fx.Node
    call: Callable[..., Any]
    rule: Rule
    label: str


@dataclass(frozen=True)
class Captured:
    """A captured model: the traced module and its computational steps in order."""

    module: fx.GraphModule
    steps: tuple[Step, ...]


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def start_env(captured: Captured, x: torch.Tensor) -> tuple[fx.Node, dict[fx.Node, object]]:
    """The input node and an environment holding ``x`` and every constant of the graph."""
    nodes = iter(captured.module.graph.nodes)
    placeholder = next(nodes)
    env: dict[fx.Node, object] = {placeholder: x}
    for node in nodes:
        if node.op == "get_attr":  # parameters, buffers and closed-over tensors
            value: object = captured.module
            for part in str(node.target).split("."):
                value = getattr(value, part)
            env[node] = value
    return placeholder, env


def _method_caller(name: str) -> Callable[..., Any]:
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, name)(*args, **kwargs)

    call.__name__ = name
    return call


def _check_inplace(gm: fx.GraphModule, node: fx.Node) -> None:
    """In-place ops would change values that rules read later: refuse them."""
    if node.op == "call_module":
        if getattr(gm.get_submodule(str(node.target)), "inplace", False):
            raise CaptureError(f"module '{node.target}' works in place (inplace=True)")
        return
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    if (name.endswith("_") and not name.startswith("__")) or node.kwargs.get("inplace"):
        raise CaptureError(f"op '{name}' works in place")


def _resolve(gm: fx.GraphModule, node: fx.Node) -> tuple[Callable[..., Any], Rule, str]:
    _check_inplace(gm, node)
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        rule = lookup(module)
        return module, rule, f"{rule.name} (nn.{type(module).__name__} '{node.target}')"
    if node.op == "call_method":
        name = str(node.target)
        rule = lookup(name)
        return _method_caller(name), rule, f"{rule.name} (Tensor.{name})"
    target = node.target
    name = getattr(target, "__name__", str(target))
    rule = lookup(name)
    return target, rule, f"{rule.name} ({name})"  # type: ignore[return-value]


def capture(model: Callable[..., Any]) -> Captured:
    """Traces ``model`` into steps; cached per model object.

    Args:
        model: An ``nn.Module`` or a function of one tensor.

    Returns:
        The captured graph.

    Raises:
        CaptureError: fx cannot trace it (data-dependent control flow, non-torch code).
    """
    key = _state(model)
    try:
        cached_key, cached = _CACHE[model]
        if cached_key == key:
            return cached
    except (KeyError, TypeError):
        pass
    try:
        gm = fx.symbolic_trace(model if isinstance(model, nn.Module) else _Wrap(model))
    except Exception as exc:
        raise CaptureError(
            f"torch.fx could not trace the model ({type(exc).__name__}: {exc})"
        ) from exc
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise CaptureError(f"expected a model of one tensor, found {len(placeholders)} inputs")
    steps = []
    for node in gm.graph.nodes:
        if node.op in ("call_module", "call_function", "call_method"):
            steps.append(Step(node, *_resolve(gm, node)))
    captured = Captured(gm, tuple(steps))
    with contextlib.suppress(TypeError):
        _CACHE[model] = (key, captured)
    return captured


def _state(model: Callable[..., Any]) -> tuple[bool, ...]:
    """What a trace bakes in besides the code: the training flags of the modules."""
    if isinstance(model, nn.Module):
        return tuple(m.training for m in model.modules())
    return ()


class _Wrap(nn.Module):
    """Lets fx trace a plain function (closed-over tensors become constants).

    Modules the function reaches through its closure or its globals are registered as
    submodules, so ``lambda x: model(x[None])[0]`` traces through ``model``'s layers.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn
        code = getattr(fn, "__code__", None)
        cells = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())]
        names = code.co_names if code is not None else ()
        found = cells + [getattr(fn, "__globals__", {}).get(name) for name in names]
        for i, obj in enumerate(found):
            if isinstance(obj, nn.Module):
                self.add_module(f"reached_{i}", obj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)
