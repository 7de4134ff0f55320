"""The structured engine: Hessians as sums of per-layer terms, ``H = sum_k J_k^T M_k J_k``.

One pass evaluates the captured graph on a sub-batch while carrying, for every value that
depends on the input, its Jacobian ``J = da/dx`` as ``(d, *a.shape)``; linear layers move
it as ``d`` extra samples. One backward pass per selected output gives every node's
adjoint ``g``, and each nonlinear node adds its term (see :mod:`.rules.base`). Value,
gradient, Jacobian, Hessian, its diagonal and the Laplacian all come from the same
pieces; the diagonal never forms ``H``.

NOTE: [bottleneck] When the input only feeds (through reshapes) a Linear layer with fewer
outputs ``n1`` than inputs ``n`` (an MLP on images), tangents start at that layer's output
instead (``d = n1``): the Hessian with respect to ``z1 = W x + b`` is ``n1 x n1`` and the
input Hessian is ``W^T H_z1 W``, at a fraction of the cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .capture import Captured, CaptureError, Step, start_env
from .rules import Site
from .rules.affine import LinearRule

RESHAPES = {"flatten", "view", "reshape", "contiguous", "identity"}


@dataclass
class Seed:
    """Where tangents start: the input (``matrix`` is None) or a narrowing Linear layer."""

    node: fx.Node
    d: int
    matrix: torch.Tensor | None  # (n1, n): dz1/dx for the bottleneck


def find_seed(captured: Captured, n: int) -> Seed:
    """The input node, or the first Linear layer if it narrows ``n`` to fewer features."""
    node = next(iter(captured.module.graph.nodes))
    steps = {s.node: s for s in captured.steps}
    start = node
    while len(node.users) == 1:
        user = next(iter(node.users))
        step = steps.get(user)
        if step is None:
            break
        if step.rule.name in RESHAPES and user.args and user.args[0] is node:
            node = user
            continue
        if isinstance(step.rule, LinearRule) and isinstance(step.call, nn.Linear):
            weight = step.call.weight
            if weight.shape[0] < n and weight.shape[1] == n:
                return Seed(user, weight.shape[0], weight)
        break
    return Seed(start, n, None)


@dataclass
class Record:
    """An evaluated node that depends on the input, kept for the backward sweeps.

    Attributes:
        step: The captured step.
        site: Its values, tangents and rule state.
        inputs: The nodes of its varying inputs, in the order of ``site.inputs``.
    """

    step: Step
    site: Site
    inputs: tuple[fx.Node, ...]


SHAPE_QUERIES = {"size", "dim", "numel", "getattr", "type", "__len__"}


def _inputs(step: Step, env: dict, tangents: dict):
    """Values of the node's arguments, which of them carry tangents, and those tangents."""
    leaves, spec = tree_flatten((step.node.args, step.node.kwargs))
    values = [env[leaf] if isinstance(leaf, fx.Node) else leaf for leaf in leaves]
    varying = [i for i, leaf in enumerate(leaves) if isinstance(leaf, fx.Node) and leaf in tangents]
    nodes = tuple(leaves[i] for i in varying)
    return values, spec, varying, [tangents[node] for node in nodes], nodes


def _check_tensor_output(step: Step, out: object) -> None:
    """A varying op must return one tensor (or a shape); anything else loses derivatives."""
    name = getattr(step.call, "__name__", "")
    if isinstance(out, torch.Tensor) or name in SHAPE_QUERIES:
        return
    raise CaptureError(f"op {step.label} returns {type(out).__name__}, not one tensor")


def _site(step: Step, values: list, spec, varying: list[int], tangents: list, output) -> Site:
    def fn(*dep: torch.Tensor) -> torch.Tensor:
        full = list(values)
        for i, t in zip(varying, dep, strict=True):
            full[i] = t
        args, kwargs = tree_unflatten(full, spec)
        return step.call(*args, **kwargs)

    inputs = tuple(values[i] for i in varying)
    extra = len(values) - len(varying)
    return Site(fn, inputs, tuple(tangents), output, step.call, extra, tuple(varying))


def forward(
    captured: Captured, x: torch.Tensor, seed: Seed, keep_linear: bool = False
) -> tuple[torch.Tensor, torch.Tensor, list[Record], fx.Node]:
    """Evaluates the graph on ``x`` with autograd and pushes tangents through every node.

    Args:
        captured: The captured model.
        x: Input in the model's own layout, requiring grad.
        seed: Where tangents start.
        keep_linear: Record linear nodes too (the reverse sweep needs every node).

    Returns:
        The output value, its tangent, the records of the nonlinear (or all varying)
        nodes in evaluation order, and the node where tangents start.
    """
    placeholder, env = start_env(captured, x)
    tangents: dict[fx.Node, torch.Tensor] = {}
    records: list[Record] = []
    if seed.matrix is None:
        eye = torch.eye(seed.d, dtype=x.dtype, device=x.device)
        per_sample = x.shape if x.numel() == seed.d else x.shape[1:]  # single or batched
        eye = eye.reshape(seed.d, *([1] * (x.dim() - len(per_sample))), *per_sample)
        tangents[placeholder] = eye.expand(seed.d, *x.shape).contiguous()
    for step in captured.steps:
        values, spec, varying, inputs_t, input_nodes = _inputs(step, env, tangents)
        args, kwargs = tree_unflatten(values, spec)
        out = step.call(*args, **kwargs)
        env[step.node] = out
        if step.node is seed.node and seed.matrix is not None:
            eye = torch.eye(seed.d, dtype=x.dtype, device=x.device)
            tangents[step.node] = (
                eye.reshape(seed.d, *([1] * (out.dim() - 1)), seed.d)
                .expand(seed.d, *out.shape)
                .contiguous()
            )
            continue
        if not varying:
            continue
        _check_tensor_output(step, out)
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            continue  # shapes and integer results (argmax, indices) carry no derivative
        site = _site(step, values, spec, varying, inputs_t, out)
        if isinstance(step.rule, LinearRule):
            site.state = step.rule.weight(tuple(values))
        with torch.no_grad():
            tangents[step.node] = step.rule.tangent(site)
        if keep_linear or not step.rule.linear:
            records.append(Record(step, site, input_nodes))
    output = next(n for n in captured.module.graph.nodes if n.op == "output")
    out_node = output.args[0]
    if not isinstance(out_node, fx.Node) or not isinstance(env.get(out_node), torch.Tensor):
        raise CaptureError("the captured model does not return one tensor")
    if out_node not in tangents:
        tangents[out_node] = torch.zeros(seed.d, *env[out_node].shape, dtype=x.dtype)
    start = seed.node if seed.matrix is not None else placeholder
    return env[out_node], tangents[out_node], records, start  # type: ignore[return-value]
