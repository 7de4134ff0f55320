"""The engine's view of a captured model: its steps in order, each with a rule.

The graph comes from TorchDynamo (see :mod:`hesse.planning.capture`): a ``torch.fx`` graph
of torch functions and tensor methods whose placeholders are the model's input and every
tensor it reads (parameters, buffers, closed-over tensors). Modules are inlined, so hooks
are part of it, and parameters arrive as inputs: their current values are read at every
call. What the graph bakes in (Python attributes, branches, submodule structure) is
guarded by TorchDynamo, which captures again when it changes.

Before the engine uses it, the graph is made functional:

- in-place ops (``relu_``, ``x += y``, ``inplace=True`` by keyword or by position, as
  ``nn.Hardswish(inplace=True)`` passes it) become their out-of-place forms,
  and later readers of the mutated value read the new node: the caller's buffers are
  never written;
- values computed under ``torch.no_grad()`` and ``.detach()`` are constants (no tangent);
- higher-order ops (``autograd.Function``, checkpointing) and writes through indexing are
  refused with :class:`CaptureError`, which sends the call to the general strategies.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from .rules import Rule, lookup
from .rules.affine import ConvRule, LinearRule


class CaptureError(Exception):
    """The model cannot be run by the engine (internal; the general strategies take over)."""


@dataclass(frozen=True)
class Step:
    """One node of the graph.

    Attributes:
        node: The fx node.
        call: What evaluates it: a torch function or a method caller.
        rule: How its tangents and second-order term are computed.
        label: A readable name, e.g. ``"tanh (torch.tanh in '1')"``.
        constant: Its value carries no derivative (``no_grad`` region, ``detach``).
    """

    node: fx.Node
    call: Callable[..., Any]
    rule: Rule
    label: str
    constant: bool = False


@dataclass(frozen=True, eq=False)
class Graph:
    """A captured model ready for the engine.

    Attributes:
        module: The (functionalised) graph module.
        steps: Its computational nodes in order.
        placeholders: The graph's inputs, in the order the values arrive.
        input_node: The placeholder of the model's input ``x`` (``None``: the model does
            not read it, and every derivative is zero).
        output_node: The node of the model's output.
        constants: Values of ``get_attr`` nodes.
        results: Every output of the graph: the model's output, and values TorchDynamo
            returns to store them as state (a buffer reassigned in ``forward``).
    """

    module: fx.GraphModule
    steps: tuple[Step, ...]
    placeholders: tuple[fx.Node, ...]
    input_node: fx.Node | None
    output_node: fx.Node
    constants: dict[fx.Node, Any]
    results: tuple[Any, ...] = ()

    def returning(self, index: int) -> Graph:
        """The graph whose output is result ``index`` (the one the model returns).

        Raises:
            CaptureError: That result is not a tensor of the graph.
        """
        if not 0 <= index < len(self.results) or not isinstance(self.results[index], fx.Node):
            raise CaptureError("the model's output is not a tensor computed by the graph")
        return dataclasses.replace(self, output_node=self.results[index])

    def env(self, inputs: tuple[Any, ...], x: torch.Tensor) -> dict[fx.Node, Any]:
        """An environment with the graph's inputs bound, ``x`` for the model's input."""
        env: dict[fx.Node, Any] = dict(zip(self.placeholders, inputs, strict=True))
        env.update(self.constants)
        if self.input_node is not None:
            env[self.input_node] = x
        return env


_INPLACE_OPERATORS: dict[Callable[..., Any], Callable[..., Any]] = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
    operator.ipow: operator.pow,
}
_REFUSED = {"setitem", "copy_", "index_put_", "scatter_", "masked_fill_", "resize_", "set_"}
_GRAD_MODE = {torch._C._set_grad_enabled}
# ops whose result may share memory with their input: an in-place write through one of
# them (or into a tensor one of them views) changes more than the written node
_VIEWS = {
    "getitem", "view", "view_as", "reshape", "flatten", "unflatten", "transpose", "permute",
    "t", "T", "mT", "select", "narrow", "expand", "expand_as", "squeeze", "unsqueeze",
    "movedim", "unbind", "split", "chunk", "diagonal", "as_strided", "detach", "contiguous",
    "unfold", "real", "imag", "getattr",
}  # fmt: skip


def _name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target))


def _out_of_place_function(node: fx.Node) -> Callable[..., Any] | None:
    """The out-of-place form of an in-place torch function or operator (None: not in place)."""
    target = node.target
    if target in _INPLACE_OPERATORS:
        return _INPLACE_OPERATORS[target]  # type: ignore[index]
    name = _name(node)
    if not name.endswith("_") or name.startswith("_"):
        return None
    for namespace in (torch, torch.nn.functional, torch._C._nn, torch.special):
        base = getattr(namespace, name[:-1], None)
        if callable(base):
            return base
    raise CaptureError(f"in-place op {name} has no out-of-place form")


def _functionalise(gm: fx.GraphModule) -> None:
    """Rewrites in-place ops out of place; later readers of a mutated value read the result."""
    alias: dict[fx.Node, fx.Node] = {}
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if alias:
            node.args = fx.map_arg(node.args, lambda a: alias.get(a, a))
            node.kwargs = fx.map_arg(node.kwargs, lambda a: alias.get(a, a))
        if node.op not in ("call_function", "call_method"):
            continue
        name = _name(node)
        if name in _REFUSED:
            raise CaptureError(f"op {name} writes into a tensor in place")
        mutated = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
        elif (at := _inplace_position(node)) is not None:  # F.hardswish(x, True), ...
            node.args = (*node.args[:at], False, *node.args[at + 1 :])
        elif node.op == "call_method" and name.endswith("_") and not name.startswith("_"):
            if not hasattr(torch.Tensor, name[:-1]):
                raise CaptureError(f"in-place method {name} has no out-of-place form")
            node.target = name[:-1]
        elif node.op == "call_function" and (base := _out_of_place_function(node)) is not None:
            node.target = base
        else:
            continue
        if mutated is not None:
            _check_not_aliased(mutated, node, order)
            alias[mutated] = node
    gm.graph.lint()
    gm.recompile()


def _inplace_position(node: fx.Node) -> int | None:
    """Where a call passes ``inplace=True`` positionally (``nn.Hardswish``, ``nn.ELU``, ...)."""
    if node.op != "call_function" or not callable(node.target):
        return None
    try:
        params = list(inspect.signature(node.target).parameters)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # builtins without a signature
        return None
    at = params.index("inplace") if "inplace" in params else -1
    return at if 0 <= at < len(node.args) and node.args[at] is True else None


def _check_not_aliased(mutated: fx.Node, at: fx.Node, order: dict[fx.Node, int]) -> None:
    """Refuses in-place writes whose effect reaches other nodes through views.

    A write through a view changes its base; a write into a tensor that an earlier node
    views changes that view. Views taken after the write read the new node anyway.
    """
    name = _name(at)
    if mutated.op in ("call_function", "call_method") and _name(mutated) in _VIEWS:
        raise CaptureError(f"in-place op {name} writes through a view ({_name(mutated)})")
    for user in mutated.users:
        viewing = user.op in ("call_function", "call_method") and _name(user) in _VIEWS
        if viewing and order[user] < order[at]:
            raise CaptureError(f"in-place op {name} writes into a tensor viewed before")


def _method_caller(name: str) -> Callable[..., Any]:
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, name)(*args, **kwargs)

    call.__name__ = name
    return call


def _label(node: fx.Node, rule: Rule) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    where = ""
    if stack:
        path, _ = list(stack.values())[-1]
        where = f" in '{path}'"
    kind = "Tensor." if node.op == "call_method" else ""
    return f"{rule.name} ({kind}{_name(node)}{where})"


def build_graph(gm: fx.GraphModule, x_position: int) -> Graph:
    """Makes the captured graph functional and looks up every node's rule.

    Args:
        gm: TorchDynamo's graph of the model.
        x_position: Which placeholder is the model's input.

    Returns:
        The graph.

    Raises:
        CaptureError: The graph holds something the engine cannot run (see the module
            docstring), or the model does not return one tensor.
    """
    _functionalise(gm)
    placeholders = tuple(n for n in gm.graph.nodes if n.op == "placeholder")
    reads_input = 0 <= x_position < len(placeholders)
    constants: dict[fx.Node, Any] = {}
    steps: list[Step] = []
    grad_on = True
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            constants[node] = getattr(gm, str(node.target))
            continue
        if node.op not in ("call_function", "call_method"):
            continue
        if node.target in _GRAD_MODE:
            grad_on = bool(node.args[0])
            continue
        if isinstance(node.target, torch._ops.HigherOrderOperator):
            raise CaptureError(f"higher-order op {_name(node)} (autograd.Function, checkpoint)")
        name = _name(node)
        rule = lookup(name, node)
        call = _method_caller(name) if node.op == "call_method" else node.target
        constant = not grad_on or name == "detach"
        steps.append(Step(node, call, rule, _label(node, rule), constant))  # type: ignore[arg-type]
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    results = output.args[0]
    if not isinstance(results, (tuple, list)) or not results:
        raise CaptureError("the graph returns no tensor")
    first = next((r for r in results if isinstance(r, fx.Node)), None)
    if first is None:
        raise CaptureError("the model's output does not depend on the graph")
    x_node = placeholders[x_position] if reads_input else None
    if x_node is not None:
        steps = _weights_from_input(steps, x_node)
    return Graph(gm, tuple(steps), placeholders, x_node, first, constants, tuple(results))


def _weights_from_input(steps: list[Step], x_node: fx.Node) -> list[Step]:
    """Affine rules for constant weights only: ``F.linear(a, W(x))`` gets the generic rule.

    A weight computed from the input makes the op bilinear, with a second-order term.
    """
    depends = {x_node}
    out = []
    for step in steps:
        node = step.node
        if any(a in depends for a in node.all_input_nodes) and not step.constant:
            depends.add(node)
        if isinstance(step.rule, LinearRule | ConvRule):
            rest = [
                a for a in node.all_input_nodes if a is not (node.args[0] if node.args else None)
            ]
            if any(a in depends for a in rest):
                rule = Rule()
                step = dataclasses.replace(step, rule=rule, label=_label(node, rule))
        out.append(step)
    return out
