"""The registry of per-op rules: module types and op names to rules.

A missing entry is not an error: :class:`~hesse.structured.rules.base.Rule` (forward-mode
tangents, Hessian-vector-product terms through ``torch.func``) is exact for any
differentiable op. Entries here are faster closed forms, or declare an op linear (no
second-order term).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .affine import ConvRule, LinearRule
from .base import Rule, Site
from .elementwise import ElementwiseRule, PiecewiseLinearRule
from .products import BilinearRule

__all__ = ["RULES", "Rule", "Site", "lookup", "register_rule"]


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
PIECEWISE_LINEAR = ("relu", "relu6", "leaky_relu", "hardtanh", "threshold", "abs")
LINEAR_OPS = (
    "add", "sub", "neg", "iadd", "isub", "view", "reshape", "flatten", "unflatten",
    "permute", "transpose", "t", "contiguous", "squeeze", "unsqueeze", "getitem", "cat",
    "stack", "sum", "mean", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "pad", "dropout", "identity", "max_pool1d",
    "max_pool2d", "max_pool3d", "adaptive_max_pool2d", "expand", "repeat", "flip", "roll",
    "narrow", "select", "movedim", "float", "double", "to", "clone",
)
# Linear in each argument: no term when only one argument varies (mul by a constant).
BILINEAR_OPS = ("mul", "matmul", "mm", "bmm", "einsum", "outer", "imul")
# Linear in the numerator only.
DIVISION_OPS = ("truediv", "div", "true_divide")
# fmt: on

RULES: dict[type | str, Callable[..., Rule]] = {}


def register_rule(key: type | str, factory: Callable[..., Rule], *, overwrite: bool = False):
    """Registers a rule factory for a module type (called with the module) or an op name.

    Raises:
        ValueError: ``key`` is registered already and ``overwrite`` is false.
    """
    if key in RULES and not overwrite:
        raise ValueError(f"hesse.structured: a rule for {key!r} exists; pass overwrite=True.")
    RULES[key] = factory


for _name in SMOOTH_ELEMENTWISE:
    register_rule(_name, lambda name=_name: ElementwiseRule(name))
for _name in PIECEWISE_LINEAR:
    register_rule(_name, lambda name=_name: PiecewiseLinearRule(name))
for _name in LINEAR_OPS:
    register_rule(_name, lambda name=_name: _Linear(name))
for _name in BILINEAR_OPS:
    register_rule(_name, lambda name=_name: BilinearRule(name))
for _name in DIVISION_OPS:
    register_rule(_name, lambda name=_name: BilinearRule(name, linear_positions=(0,)))
register_rule("linear", LinearRule)
register_rule(nn.Linear, LinearRule)
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_rule(_conv, ConvRule)

# Modules named after their functional op (nn.Tanh -> "tanh", nn.AvgPool2d -> avg_pool2d).
MODULE_NAMES: dict[type, str] = {
    nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Softplus: "softplus", nn.GELU: "gelu",
    nn.SiLU: "silu", nn.ELU: "elu", nn.SELU: "selu", nn.CELU: "celu", nn.Mish: "mish",
    nn.Softsign: "softsign", nn.LogSigmoid: "logsigmoid", nn.Tanhshrink: "tanhshrink",
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.LeakyReLU: "leaky_relu", nn.Hardtanh: "hardtanh",
    nn.Threshold: "threshold", nn.Flatten: "flatten", nn.Unflatten: "unflatten",
    nn.Identity: "identity", nn.Dropout: "dropout", nn.AvgPool1d: "avg_pool1d",
    nn.AvgPool2d: "avg_pool2d", nn.AvgPool3d: "avg_pool3d",
    nn.AdaptiveAvgPool1d: "adaptive_avg_pool1d", nn.AdaptiveAvgPool2d: "adaptive_avg_pool2d",
    nn.MaxPool1d: "max_pool1d", nn.MaxPool2d: "max_pool2d", nn.MaxPool3d: "max_pool3d",
}  # fmt: skip


def lookup(key: nn.Module | str) -> Rule:
    """The rule for a module or an op name; the generic rule when none is registered."""
    if isinstance(key, nn.Module):
        for cls in type(key).__mro__:
            if cls in RULES:
                return RULES[cls](key)
        name = MODULE_NAMES.get(type(key))
        if name is not None and name in RULES:
            return RULES[name]()
        if isinstance(key, nn.modules.batchnorm._BatchNorm) and not key.training:
            return _Linear("batch_norm (eval)")
        return Rule()
    factory = RULES.get(key)
    return factory() if factory is not None else Rule()
