"""Piecewise-linear models: second derivatives that are exactly zero almost everywhere.

When every op between the input and the output of a captured graph is linear (Linear,
convolutions, reshapes, sums, eval-mode BatchNorm, products with constants) or piecewise
linear (ReLU, Hardtanh, max pooling, ...), the model is piecewise linear in its input: its
Hessian, diagonal, Laplacian and Hessian-vector products are zero wherever they exist.
The rules of the graph tell: :func:`piecewise_linear_ops` reads them without running
anything, so the front can return exact zeros at once.
"""

from __future__ import annotations

import torch.fx as fx
from torch.utils._pytree import tree_flatten

from .graph import Graph
from .rules.affine import ConvRule, LinearRule
from .rules.bilinear import BilinearRule
from .rules.elementwise import PiecewiseLinearRule

# Ops registered as linear that are only piecewise linear (named in the warning)
_PIECEWISE_NAMES = ("max_pool", "adaptive_max_pool")
# Ops whose results carry no derivative (shapes)
_SHAPES = {"size", "dim", "numel", "getattr", "type", "__len__"}


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        stack.extend(current.all_input_nodes)
    return seen


def piecewise_linear_ops(graph: Graph) -> tuple[str, ...] | None:
    """The piecewise-linear ops of a graph that is piecewise linear in its input, or None.

    Every op on the way from the input to the output must be linear or piecewise linear;
    None if some op has curvature. An empty tuple is a linear model. Conservative: an op
    without a rule (the generic rule), a product of two varying values or a smooth
    activation gives None.
    """
    used = _ancestors(graph.output_node)
    varying = {graph.input_node}
    names: list[str] = []
    for step in graph.steps:
        node = step.node
        if node not in used or step.constant:
            continue
        leaves, _ = tree_flatten((node.args, node.kwargs))
        positions = tuple(
            i for i, leaf in enumerate(leaves) if isinstance(leaf, fx.Node) and leaf in varying
        )
        if not positions:
            continue
        varying.add(node)
        rule, name = step.rule, step.label.split(" (")[0]
        if getattr(step.call, "__name__", "") in _SHAPES:
            continue
        if isinstance(rule, PiecewiseLinearRule):
            names.append(rule.name)
        elif isinstance(rule, BilinearRule):
            one = len(positions) == 1
            if not one or rule.linear_positions not in (None, positions):
                return None
        elif isinstance(rule, (LinearRule, ConvRule)) and positions != (0,):
            return None  # a weight that depends on x: bilinear, not linear
        elif not rule.linear:
            return None
        elif any(p in str(getattr(step.call, "__name__", name)) for p in _PIECEWISE_NAMES):
            names.append(getattr(step.call, "__name__", name))
    if graph.output_node not in varying:
        return ()
    return tuple(sorted(set(names)))
