"""The registry of per-op rules: op names (as TorchDynamo's graphs call them) to rules.

A missing entry is not an error: :class:`~hesse.structured.rules.base.Rule` (forward-mode
tangents, Hessian-vector-product terms through ``torch.func``) is exact for any
differentiable op. Entries here are faster closed forms, or declare an op linear (no
second-order term).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .affine import ConvRule, LinearRule
from .base import Rule, Site
from .bilinear import BilinearRule
from .elementwise import ElementwiseRule, PiecewiseLinearRule
from .tuples import ItemRule, SplitRule

__all__ = ["PIECEWISE_QUADRATIC", "RULES", "TUPLE_OPS", "Rule", "Site", "lookup", "register_rule"]


class _Linear(Rule):
    """Ops linear in their inputs (reshapes, sums, pooling by averaging, ...): no term."""

    linear = True

    def __init__(self, name: str):
        self.name = name


# fmt: off
SMOOTH_ELEMENTWISE = (
    "tanh", "sigmoid", "softplus", "gelu", "silu", "elu", "selu", "celu", "mish", "exp",
    "exp2", "expm1", "log", "log1p", "log2", "sin", "cos", "sqrt", "rsqrt", "square",
    "reciprocal", "softsign", "logsigmoid", "tanhshrink", "erf", "sinh", "cosh", "atan",
    "asinh",
)
# C^1, piecewise quadratic: phi'' is a step (closed forms; torch has no double backward)
PIECEWISE_QUADRATIC = ("hardswish",)
PIECEWISE_LINEAR = (
    "relu", "relu6", "leaky_relu", "hardtanh", "threshold", "abs", "hardsigmoid",
)
LINEAR_OPS = (
    "add", "sub", "neg", "iadd", "isub", "view", "reshape", "flatten", "unflatten",
    "permute", "transpose", "t", "contiguous", "squeeze", "unsqueeze", "cat",
    "stack", "sum", "mean", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "pad", "dropout", "identity", "max_pool1d",
    "max_pool2d", "max_pool3d", "adaptive_max_pool2d", "expand", "repeat", "flip", "roll",
    "narrow", "select", "movedim", "float", "double", "to", "clone",
)
# Tuple-valued splits (linear), and indexing into tuples or tensors
SPLIT_OPS = ("chunk", "split", "unbind", "tensor_split")
TUPLE_OPS = (*SPLIT_OPS, "getitem")
# Linear in each argument: no term when only one argument varies (mul by a constant).
BILINEAR_OPS = ("mul", "matmul", "mm", "bmm", "einsum", "outer", "imul")
# Linear in the numerator only.
DIVISION_OPS = ("truediv", "div", "true_divide")
# fmt: on

RULES: dict[str, Callable[..., Rule]] = {}


def register_rule(key: str, factory: Callable[..., Rule], *, overwrite: bool = False) -> None:
    """Registers a rule factory for an op name (as TorchDynamo's graphs call it).

    Args:
        key: The op's name: a torch function's ``__name__`` (``"tanh"``, ``"linear"``,
            ``"conv2d"``) or a tensor method (``"sum"``, ``"view"``).
        factory: Called with the graph node (``factory(node)``; ``None`` outside a graph).
        overwrite: Replace an existing rule.

    Raises:
        ValueError: ``key`` is registered already and ``overwrite`` is false.
    """
    if key in RULES and not overwrite:
        raise ValueError(f"hesse.engine: a rule for {key!r} exists; pass overwrite=True.")
    RULES[key] = factory


for _name in SMOOTH_ELEMENTWISE:
    register_rule(_name, lambda node, name=_name: ElementwiseRule(name))
for _name in PIECEWISE_QUADRATIC:
    register_rule(_name, lambda node, name=_name: ElementwiseRule(name))
for _name in PIECEWISE_LINEAR:
    register_rule(_name, lambda node, name=_name: PiecewiseLinearRule(name))
for _name in LINEAR_OPS:
    register_rule(_name, lambda node, name=_name: _Linear(name))
for _name in BILINEAR_OPS:
    register_rule(_name, lambda node, name=_name: BilinearRule(name))
for _name in DIVISION_OPS:
    register_rule(_name, lambda node, name=_name: BilinearRule(name, linear_positions=(0,)))
for _name in SPLIT_OPS:
    register_rule(_name, lambda node, name=_name: SplitRule(name))
register_rule("getitem", lambda node: ItemRule())
register_rule("linear", LinearRule)
for _conv in ("conv1d", "conv2d", "conv3d"):
    register_rule(_conv, ConvRule)


def _batch_norm(node: Any) -> Rule:
    """Eval-mode batch norm is affine in its input; in training mode it is generic."""
    if node is None:
        return Rule()
    training = node.kwargs.get("training", node.args[5] if len(node.args) > 5 else True)
    return _Linear("batch_norm (eval)") if training is False else Rule()


register_rule("batch_norm", _batch_norm)


def lookup(name: str, node: Any = None) -> Rule:
    """The rule for an op name; the generic rule when none is registered.

    Args:
        name: The op's name.
        node: Its graph node, for rules that depend on the call's arguments.
    """
    factory = RULES.get(name)
    return factory(node) if factory is not None else Rule()
