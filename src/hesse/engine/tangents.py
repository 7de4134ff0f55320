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

from dataclasses import dataclass, replace

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from .graph import CaptureError, Graph, Step
from .rules import Site
from .rules.affine import LinearRule
from .rules.base import Pairs
from .rules.tuples import SplitRule, is_tensors

RESHAPES = {"flatten", "view", "reshape", "contiguous", "identity"}


@dataclass
class Seed:
    """Where tangents start: the input (``matrix`` is None) or a narrowing Linear layer.

    At the input, ``tangent`` (``(d, *x.shape)``) gives the ``d`` directions; ``None``:
    the identity (every input entry).
    """

    node: fx.Node
    d: int
    matrix: torch.Tensor | None  # (n1, n): dz1/dx for the bottleneck
    tangent: torch.Tensor | None = None


def find_seed(graph: Graph, env: dict, n: int) -> Seed:
    """The input node, or the first Linear layer if it narrows ``n`` to fewer features.

    Args:
        graph: The captured model.
        env: Its environment (the weight is read from it).
        n: Inputs per sample.
    """
    node = graph.input_node
    steps = {s.node: s for s in graph.steps}
    start = node
    while len(node.users) == 1:
        user = next(iter(node.users))
        step = steps.get(user)
        if step is None:
            break
        if step.constant:
            break
        if step.rule.name in RESHAPES and user.args and user.args[0] is node:
            node = user
            continue
        if isinstance(step.rule, LinearRule) and user.args and user.args[0] is node:
            weight = env.get(user.args[1]) if len(user.args) > 1 else None
            narrows = isinstance(weight, torch.Tensor) and weight.dim() == 2
            if narrows and weight.shape[0] < n and weight.shape[1] == n:  # type: ignore[union-attr]
                return Seed(user, weight.shape[0], weight)  # type: ignore[union-attr]
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
    """A varying op must return one tensor (or a shape, or a split's tensors)."""
    name = getattr(step.call, "__name__", "")
    if isinstance(out, torch.Tensor) or name in SHAPE_QUERIES:
        return
    if isinstance(step.rule, SplitRule) and is_tensors(out):
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
    chosen = set(varying)
    extras = tuple(v for i, v in enumerate(values) if i not in chosen)
    return Site(fn, inputs, tuple(tangents), output, step.call, len(extras), extras, tuple(varying))


def _identity_tangent(d: int, like: torch.Tensor) -> torch.Tensor:
    """``d/d like`` for a value whose per-sample entries are the ``d`` directions.

    Batched values get batch-major tangents (see NOTE: [batch-major tangents] in
    :mod:`.rules.base`).
    """
    eye = torch.eye(d, dtype=like.dtype, device=like.device)
    per_sample = like.shape if like.numel() == d else like.shape[1:]
    eye = eye.reshape(d, *per_sample)
    if like.numel() == d:
        return eye
    return eye.expand(like.shape[0], *eye.shape).contiguous().transpose(0, 1)


def _needed(graph: Graph, keep_linear: bool, jacobian: bool) -> set[fx.Node]:
    """Nodes whose tangents some rule reads: inputs of curved nodes and their ancestors.

    The tangent of the output is only needed for Jacobians; the reverse sweep needs all.
    """
    needed: set[fx.Node] = {graph.output_node} if jacobian else set()
    for step in reversed(graph.steps):
        if keep_linear or not step.rule.linear or step.node in needed:
            needed.update(step.node.all_input_nodes)
            needed.add(step.node)
    return needed


def _last_uses(graph: Graph) -> dict[fx.Node, list[fx.Node]]:
    """For every step's node, the nodes whose tangents are not read after it."""
    last: dict[fx.Node, fx.Node] = {}
    for step in graph.steps:
        for node in step.node.all_input_nodes:
            last[node] = step.node
    free: dict[fx.Node, list[fx.Node]] = {}
    for node, at in last.items():
        free.setdefault(at, []).append(node)
    return free


@dataclass
class Pass:
    """What one forward pass gives.

    Attributes:
        value: The model's output.
        tangent: Its tangent ``(d, *value.shape)`` (zeros unless requested).
        second: Its second-order coefficients ``(P, *value.shape)`` in Taylor mode.
        records: The nonlinear (or all varying) nodes in evaluation order (not in Taylor
            mode, which needs no backward sweep).
        start: The node where tangents start.
    """

    value: torch.Tensor
    tangent: torch.Tensor
    second: torch.Tensor | None
    records: list[Record]
    start: fx.Node


def forward(
    graph: Graph,
    env: dict,
    seed: Seed,
    keep_linear: bool = False,
    jacobian: bool = True,
    taylor: tuple[Pairs] | None = None,
    differentiable: bool = False,
) -> Pass:
    """Evaluates the graph on ``x`` and pushes tangents through every node.

    Only the tangents some rule reads are computed, and each is dropped after its last
    reader (the records keep those of the curved nodes' inputs).

    Args:
        graph: The captured model.
        env: Its inputs bound (:meth:`Graph.env`): the model's input in its own layout
            (requiring grad for the backward sweeps) and every tensor the graph reads.
        seed: Where tangents start.
        keep_linear: Record linear nodes too (the reverse sweep needs every node).
        jacobian: Whether the caller reads the output's tangent (zeros are returned
            otherwise).
        taylor: ``(pairs,)`` to push second-order coefficients forward too (see NOTE:
            [Taylor mode] in :mod:`.rules.base`); only from the input (no bottleneck).
        differentiable: Keep tangents and coefficients in autograd's graph
            (``create_graph=True``).
    """
    placeholder, out_node = graph.input_node, graph.output_node
    x = env[placeholder]
    tangents: dict[fx.Node, torch.Tensor] = {}
    records: list[Record] = []
    needed = _needed(graph, keep_linear, jacobian)
    free = _last_uses(graph)
    grad_mode = torch.enable_grad if differentiable else torch.no_grad
    identity: set[fx.Node] = set()
    coeffs: dict[fx.Node, torch.Tensor | None] = {}
    if seed.matrix is None and seed.tangent is not None:
        tangents[placeholder] = seed.tangent
    elif seed.matrix is None:
        tangents[placeholder] = _identity_tangent(seed.d, x)
        identity.add(placeholder)
    for step in graph.steps:
        values, spec, varying, inputs_t, input_nodes = _inputs(step, env, tangents)
        args, kwargs = tree_unflatten(values, spec)
        if step.constant:  # a no_grad region of the model: no derivative, to x or weights
            with torch.no_grad():
                out = step.call(*args, **kwargs)
        else:
            out = step.call(*args, **kwargs)
        env[step.node] = out
        if step.node is seed.node and seed.matrix is not None:
            tangents[step.node] = _identity_tangent(seed.d, out)
            continue
        if not varying or step.node not in needed or step.constant:
            continue
        _check_tensor_output(step, out)
        if not is_tensors(out) and not (isinstance(out, torch.Tensor) and out.is_floating_point()):
            continue  # shapes and integer results (argmax, indices) carry no derivative
        site = _site(step, values, spec, varying, inputs_t, out)
        site.identity = len(input_nodes) == 1 and input_nodes[0] in identity
        site.state = step.rule.prepare(args, kwargs)
        with grad_mode():
            tangents[step.node] = _push(step, site)
            if taylor is not None:
                given = tuple(coeffs.get(node) for node in input_nodes)
                coeffs[step.node] = step.rule.second(site, given, taylor[0])
        if (
            site.identity
            and step.rule.name in RESHAPES
            and out.shape[-1:] == (seed.d,)
            and out.dim() <= 2
        ):
            identity.add(step.node)
        if taylor is None and (keep_linear or not step.rule.linear):
            if step.rule.linear:  # the sweep transposes linear ops: their tangents can go
                site = replace(site, tangents=())
            records.append(Record(step, site, input_nodes))
        for node in free.get(step.node, ()):
            if node is not out_node:
                tangents.pop(node, None)
                coeffs.pop(node, None)
    if not isinstance(env.get(out_node), torch.Tensor):
        raise CaptureError("the captured model does not return one tensor")
    value = env[out_node]
    tangent = tangents.get(out_node)
    if tangent is None:
        tangent = value.new_zeros(seed.d, *value.shape)
    second = coeffs.get(out_node)
    if taylor is not None and second is None:
        pairs = taylor[0]
        second = value.new_zeros(1 if pairs is None else len(pairs[0]), *value.shape)
    start = seed.node if seed.matrix is not None else placeholder
    return Pass(value, tangent, second, records, start)


def _push(step: Step, site: Site) -> torch.Tensor:
    """The rule's tangent; retried on contiguous tangents if a view op rejects their strides."""
    try:
        return step.rule.tangent(site)
    except RuntimeError:
        if not all(isinstance(t, torch.Tensor) for t in site.tangents):
            raise
        if all(t.is_contiguous() for t in site.tangents):
            raise
        site.tangents = tuple(t.contiguous() for t in site.tangents)
        return step.rule.tangent(site)
