"""The structured engine: every registered rule and whole models against nested torch.func.

Rules are tested through the registry itself: every elementwise name registered is looked
up in torch and checked, so a new elementwise rule is tested without new test code; every
other registered op name must have an example in ``OP_EXAMPLES`` (a test fails if one is
missing), and every module type registered must be constructible here.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian, jacrev, vmap

import hesse
from hesse.engine import graph_cost, structured_pass
from hesse.engine.rules import (
    BILINEAR_OPS,
    DIVISION_OPS,
    LINEAR_OPS,
    PIECEWISE_LINEAR,
    PIECEWISE_QUADRATIC,
    RULES,
    SMOOTH_ELEMENTWISE,
    TUPLE_OPS,
)
from hesse.planning.capture import capture


def _pass(f, x: torch.Tensor, batch: int, want, mode: str, index=None) -> dict:
    """The engine on ``f`` captured at ``x`` (the model's layout), ``batch`` samples."""
    bound = capture(f, x)
    flat = x.reshape(batch, -1)
    return structured_pass(
        bound.graph, bound.inputs, flat, lambda t: t.reshape(x.shape), batch, index, want, mode
    )


DT = torch.float64
QUANTITIES = ("hessian", "hessian_diag", "laplacian", "jacobian")


def _torch_op(name: str):
    for space in (torch, F, torch.special):
        if hasattr(space, name):
            return getattr(space, name)
    raise AssertionError(f"registered elementwise op {name!r} is not a torch function")


def _inner(x: torch.Tensor) -> torch.Tensor:
    """A smooth map into (1.2, 2.2) so that log, sqrt, reciprocal are defined: (b, 3) -> (b, 4)."""
    w = torch.linspace(-1, 1, 12, dtype=x.dtype).reshape(3, 4)
    return 1.2 + torch.sigmoid(x @ w)


def _reference(f, x: torch.Tensor, quantity: str, ref=None) -> torch.Tensor:
    """Per-sample flat references, ``(b, m, n[, n])``, by nested torch.func on one sample.

    ``ref``: the same function written with ops torch can differentiate twice.
    """
    f = ref or f
    shape = x.shape[1:]
    one = lambda z: f(z.reshape(1, *shape)).reshape(-1)  # noqa: E731
    flat = x.reshape(x.shape[0], -1)
    if quantity == "jacobian":
        return vmap(jacrev(one))(flat)
    h = vmap(hessian(one))(flat)  # (b, m, n, n)
    if quantity == "hessian":
        return h
    diag = h.diagonal(dim1=-2, dim2=-1)
    return diag if quantity == "hessian_diag" else diag.sum(-1)


def _check(f, x: torch.Tensor, quantities=QUANTITIES, ref=None, rtol: float = 1e-10) -> None:
    for quantity in quantities:
        with warnings.catch_warnings():  # all-zero results of piecewise-linear ops warn
            warnings.simplefilter("ignore", hesse.PiecewiseLinearWarning)
            warnings.simplefilter("ignore", hesse.ZeroDerivativeWarning)
            got = getattr(hesse, quantity)(f, x, batched=True, strategy="structured", flat=True)
        want = _reference(f, x, quantity, ref)
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol / 100, msg=quantity)
    _check_modes(f, x, ref, rtol)


ENGINE_MODES = (  # (mode, what is asked) for every way the engine computes second order
    ("gram", "hessian"),
    ("gram", "diag"),
    ("gram", "laplacian"),
    ("sweep", "hessian"),
    ("taylor", "hessian"),
    ("taylor", "diag"),
    ("taylor", "laplacian"),
)


def _check_modes(f, x: torch.Tensor, ref=None, rtol: float = 1e-10) -> None:
    """Every engine mode on its own (``auto`` picks one per call) against the reference."""
    h = _reference(f, x, "hessian", ref)
    diag = h.diagonal(dim1=-2, dim2=-1)
    refs = {"hessian": h, "diag": diag, "laplacian": diag.sum(-1)}
    for mode, key in ENGINE_MODES:
        out = _pass(f, x, x.shape[0], frozenset({key}), mode)
        torch.testing.assert_close(
            out[key], refs[key], rtol=rtol, atol=rtol / 100, msg=f"{mode} {key}"
        )


EXTRA_ARGS = {"threshold": (1.6, 0.0), "hardtanh": (-0.5, 0.5)}
# Ops torch cannot differentiate twice, written with ops it can (the same values)
TWICE_DIFFERENTIABLE = {
    "hardswish": lambda a: a * F.hardtanh(a + 3.0, 0.0, 6.0) / 6.0,
    "hardsigmoid": lambda a: F.hardtanh(a + 3.0, 0.0, 6.0) / 6.0,
}
# Inputs scaled so that every piece of the piecewise ops is visited (|a| up to ~5)
SPREAD = {"hardswish": 4.0, "hardsigmoid": 4.0}
# torch's float64 hardsigmoid_backward multiplies by a float32 1/6 (relative error 3e-8):
# the engine's adjoints come from autograd's backward, its closed form is exact
RTOL = {"hardsigmoid": 1e-7}


@pytest.mark.filterwarnings("ignore:An output with one or more elements was resized")
@pytest.mark.parametrize("name", SMOOTH_ELEMENTWISE + PIECEWISE_QUADRATIC + PIECEWISE_LINEAR)
def test_every_elementwise_rule(name: str) -> None:
    op, extra = _torch_op(name), EXTRA_ARGS.get(name, ())
    twin = TWICE_DIFFERENTIABLE.get(name)
    spread = SPREAD.get(name)
    torch.manual_seed(0)
    x = torch.randn(3, 3, dtype=DT)

    def arg(z: torch.Tensor) -> torch.Tensor:
        return (_inner(z) - 1.7) * spread if spread else _inner(z) * 1.3 - 1.0

    ref = None if twin is None else lambda z: twin(arg(z)) * _inner(z)
    _check(lambda z: op(arg(z), *extra) * _inner(z), x, ref=ref, rtol=RTOL.get(name, 1e-10))
    if twin is not None:  # the reference itself must be the op
        a = torch.linspace(-5, 5, 101, dtype=DT)
        torch.testing.assert_close(op(a), twin(a), rtol=0, atol=1e-15)


def test_hardswish_curvature_is_a_third_inside() -> None:
    """Piecewise quadratic: phi'' = 1/3 on (-3, 3) and 0 outside, through the public API."""
    a = torch.tensor([-4.0, -2.0, 0.5, 2.9, 3.5], dtype=DT)
    diag = hesse.hessian_diag(lambda t: F.hardswish(t).sum(), a, strategy="structured")
    torch.testing.assert_close(diag, torch.tensor([0.0, 1 / 3, 1 / 3, 1 / 3, 0.0], dtype=DT))
    grad = hesse.jacobian(lambda t: F.hardswish(t).sum(), a, strategy="structured")
    torch.testing.assert_close(grad, torch.tensor([0.0, -1 / 6, 2 / 3, 2.9 / 3 + 0.5, 1.0]))


OP_EXAMPLES = {
    "add": lambda a: a + torch.sin(a),
    "iadd": lambda a: a + 1.0,
    "sub": lambda a: a - a.exp(),
    "isub": lambda a: a - 2.0,
    "neg": lambda a: -torch.sin(a),
    "view": lambda a: torch.sin(a.view(a.shape[0], 2, 2)),
    "reshape": lambda a: torch.sin(a.reshape(-1, 2, 2)),
    "flatten": lambda a: torch.sin(a.reshape(-1, 2, 2).flatten(1)),
    "unflatten": lambda a: torch.sin(a.unflatten(1, (2, 2))),
    "permute": lambda a: torch.sin(a.reshape(-1, 2, 2).permute(0, 2, 1)) * a.reshape(-1, 2, 2),
    "transpose": lambda a: torch.sin(a.reshape(-1, 2, 2).transpose(1, 2)) * a.reshape(-1, 2, 2),
    "t": lambda a: torch.sin(a) * a,
    "contiguous": lambda a: torch.sin(a.contiguous()),
    "squeeze": lambda a: torch.sin(a[:, None].squeeze(1)),
    "unsqueeze": lambda a: torch.sin(a.unsqueeze(1)),
    "getitem": lambda a: torch.sin(a[:, 1:3]) * a[:, :2],
    "cat": lambda a: torch.sin(torch.cat([a, a * a], 1)),
    "chunk": lambda a: torch.sin(a.chunk(2, 1)[0]) * a.chunk(2, dim=-1)[1],
    "split": lambda a: torch.sin(a.split([1, 3], 1)[1]) * torch.split(a, 2, -1)[0].sum(1, True),
    "unbind": lambda a: torch.stack([torch.sin(u) * a.unbind(1)[0] for u in a.unbind(1)], 1),
    "tensor_split": lambda a: torch.sin(torch.tensor_split(a, (1, 3), dim=1)[1]) * a[:, :2],
    "stack": lambda a: torch.sin(torch.stack([a, a * 2], 1)),
    "sum": lambda a: torch.sin(a.sum(1, keepdim=True)) * a,
    "mean": lambda a: torch.sin(a.mean(1, keepdim=True)) * a,
    "avg_pool1d": lambda a: torch.sin(F.avg_pool1d(a[:, None], 2)),
    "avg_pool2d": lambda a: torch.sin(F.avg_pool2d(a.reshape(-1, 1, 2, 2), 2)),
    "avg_pool3d": lambda a: torch.sin(F.avg_pool3d(a.reshape(-1, 1, 1, 2, 2), (1, 2, 2))),
    "adaptive_avg_pool1d": lambda a: torch.sin(F.adaptive_avg_pool1d(a[:, None], 2)),
    "adaptive_avg_pool2d": lambda a: torch.sin(F.adaptive_avg_pool2d(a.reshape(-1, 1, 2, 2), 1)),
    "adaptive_avg_pool3d": lambda a: torch.sin(F.adaptive_avg_pool3d(a.reshape(-1, 1, 1, 2, 2), 1)),
    "pad": lambda a: torch.sin(F.pad(a, (1, 1), value=0.5)),
    "dropout": lambda a: torch.sin(F.dropout(a, 0.5, training=False)),
    "identity": lambda a: torch.sin(a),
    "max_pool1d": lambda a: torch.sin(F.max_pool1d(a[:, None], 2)),
    "max_pool2d": lambda a: torch.sin(F.max_pool2d(a.reshape(-1, 1, 2, 2), 2)),
    "max_pool3d": lambda a: torch.sin(F.max_pool3d(a.reshape(-1, 1, 1, 2, 2), (1, 2, 2))),
    "adaptive_max_pool2d": lambda a: torch.sin(F.adaptive_max_pool2d(a.reshape(-1, 1, 2, 2), 1)),
    "expand": lambda a: torch.sin(a[:, :, None].expand(-1, -1, 2)),
    "repeat": lambda a: torch.sin(a.repeat(1, 2)),
    "flip": lambda a: torch.sin(a.flip(1)) * a,
    "roll": lambda a: torch.sin(a.roll(1, 1)) * a,
    "narrow": lambda a: torch.sin(a.narrow(1, 1, 2)),
    "select": lambda a: torch.sin(a.select(1, 2)[:, None] * a),
    "movedim": lambda a: torch.sin(a.reshape(-1, 2, 2).movedim(2, 1)),
    "float": lambda a: torch.sin(a.double()),
    "double": lambda a: torch.sin(a.double()),
    "to": lambda a: torch.sin(a.to(torch.float64)),
    "clone": lambda a: torch.sin(a.clone()),
    "mul": lambda a: torch.sin(a) * a * 3.0,
    "imul": lambda a: torch.sin(a) * 2.0,
    "matmul": lambda a: torch.sin(a[:, None, :] @ a[:, :, None]).flatten(1),
    "mm": lambda a: torch.sin(a) * 1.0,
    "bmm": lambda a: torch.tanh(torch.bmm(a[:, None, :], a[:, :, None])).flatten(1),
    "einsum": lambda a: torch.tanh(torch.einsum("bi,bi->b", a, a))[:, None],
    "outer": lambda a: torch.sin(a) * 1.5,
    "truediv": lambda a: torch.sin(a) / (a * a + 1.0) + a / 3.0,
    "div": lambda a: torch.div(torch.sin(a), a + 3.0),
    "true_divide": lambda a: torch.true_divide(a, a * a + 1.0),
    "linear": lambda a: torch.tanh(F.linear(a, torch.ones(2, 4, dtype=a.dtype))),
    "conv1d": lambda a: torch.tanh(
        F.conv1d(a[:, None, :], torch.ones(2, 1, 2, dtype=a.dtype), None, 1, 1)
    ).flatten(1),
    "conv2d": lambda a: torch.tanh(
        F.conv2d(a.reshape(-1, 1, 2, 2), torch.ones(3, 1, 2, 2, dtype=a.dtype), padding=1)
    ).flatten(1),
    "conv3d": lambda a: torch.tanh(
        F.conv3d(a.reshape(-1, 1, 1, 2, 2), torch.ones(2, 1, 1, 2, 2, dtype=a.dtype))
    ).flatten(1),
    "batch_norm": lambda a: torch.tanh(
        F.batch_norm(a, torch.zeros(4, dtype=a.dtype), torch.ones(4, dtype=a.dtype) * 2.0)
    ),
}
ARGUMENT_RULES = ("linear", "conv1d", "conv2d", "conv3d", "batch_norm")


@pytest.mark.parametrize(
    "name", LINEAR_OPS + TUPLE_OPS + BILINEAR_OPS + DIVISION_OPS + ARGUMENT_RULES
)
def test_every_op_rule(name: str) -> None:
    assert name in RULES, f"{name} is not registered"
    example = OP_EXAMPLES[name]  # a KeyError here means: add an example for the new rule
    torch.manual_seed(1)
    x = torch.randn(3, 3, dtype=DT)
    _check(lambda z: example(_inner(z)), x)


def test_every_registered_name_has_a_test() -> None:
    names = {k for k in RULES if isinstance(k, str)}
    tested = set(SMOOTH_ELEMENTWISE) | set(PIECEWISE_LINEAR) | set(OP_EXAMPLES)
    tested |= set(PIECEWISE_QUADRATIC)
    assert names <= tested, f"rules without a test: {sorted(names - tested)}"


def _image(shape: tuple[int, ...]) -> nn.Module:
    return nn.Unflatten(1, shape)


MODULES = {  # module type -> a small layer taking (b, 4) inputs
    nn.Linear: lambda: nn.Linear(4, 4),
    nn.Conv1d: lambda: nn.Sequential(_image((1, 4)), nn.Conv1d(1, 2, 2, padding=1)),
    nn.Conv2d: lambda: nn.Sequential(
        _image((1, 2, 2)), nn.Conv2d(1, 4, 2, padding=1, stride=2, dilation=2)
    ),
    nn.Conv3d: lambda: nn.Sequential(_image((1, 1, 2, 2)), nn.Conv3d(1, 2, (1, 2, 2))),
    nn.Threshold: lambda: nn.Threshold(1.6, 0.0),
    nn.Hardtanh: lambda: nn.Hardtanh(-0.5, 2.0),
    nn.Unflatten: lambda: nn.Unflatten(1, (2, 2)),
    nn.AvgPool1d: lambda: nn.Sequential(_image((1, 4)), nn.AvgPool1d(2)),
    nn.AvgPool2d: lambda: nn.Sequential(_image((1, 2, 2)), nn.AvgPool2d(2)),
    nn.AvgPool3d: lambda: nn.Sequential(_image((1, 1, 2, 2)), nn.AvgPool3d((1, 2, 2))),
    nn.AdaptiveAvgPool1d: lambda: nn.Sequential(_image((1, 4)), nn.AdaptiveAvgPool1d(2)),
    nn.AdaptiveAvgPool2d: lambda: nn.Sequential(_image((1, 2, 2)), nn.AdaptiveAvgPool2d(1)),
    nn.MaxPool1d: lambda: nn.Sequential(_image((1, 4)), nn.MaxPool1d(2)),
    nn.MaxPool2d: lambda: nn.Sequential(_image((1, 2, 2)), nn.MaxPool2d(2)),
    nn.MaxPool3d: lambda: nn.Sequential(_image((1, 1, 2, 2)), nn.MaxPool3d((1, 2, 2))),
}


MODULE_TYPES = [
    *MODULES, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.GELU, nn.SiLU, nn.ELU, nn.SELU, nn.CELU,
    nn.Mish, nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, nn.ReLU, nn.ReLU6, nn.LeakyReLU,
    nn.Flatten, nn.Identity, nn.Dropout,
]  # fmt: skip


@pytest.mark.parametrize("module_type", MODULE_TYPES)
def test_every_module_rule(module_type: type) -> None:
    layer = MODULES[module_type]() if module_type in MODULES else module_type()
    model = nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(2)).to(DT).eval()
    torch.manual_seed(2)
    x = torch.randn(3, 3, dtype=DT)
    with torch.no_grad():
        model(_inner(x))  # materialise the lazy layer
    _check(lambda z: torch.tanh(model(_inner(z))) * _inner(z)[:, :2], x)


class Coupling(nn.Module):
    """An affine coupling layer: a split's halves through different branches, then cat."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        s, t = self.net(x1).split(3, dim=-1)
        x3, *rest = x2.unbind(-1)
        y2 = x2 * torch.exp(torch.tanh(s)) + t * x3.unsqueeze(-1)
        return torch.cat([x1 * rest[0].unsqueeze(-1), y2], dim=-1)


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_tuple_ops_in_the_engine(batched: bool) -> None:
    """Tuple-valued splits through every quantity and engine mode, one sample or a batch."""
    torch.manual_seed(3)
    model = Coupling().to(DT)
    x = torch.randn(3, 6, dtype=DT)
    h = _reference(model, x, "hessian")
    j = _reference(model, x, "jacobian")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback: the engine runs it
        for mode, key in ENGINE_MODES:
            if batched:
                out = _pass(model, x, 3, frozenset({key}), mode)[key]
            else:
                out = torch.stack([_pass(model, z, 1, frozenset({key}), mode)[key][0] for z in x])
            want = {"hessian": h, "diag": h.diagonal(dim1=-2, dim2=-1)}.get(key)
            want = h.diagonal(dim1=-2, dim2=-1).sum(-1) if want is None else want
            torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12, msg=f"{mode} {key}")
        got = hesse.jacobian(model, x if batched else x[0], batched=batched, strategy="structured")
    torch.testing.assert_close(got, j if batched else j[0], rtol=1e-10, atol=1e-12)


class _Twin(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return TWICE_DIFFERENTIABLE[self.name](a)


@pytest.mark.parametrize(
    "layer, twin",
    [
        (lambda: nn.Hardswish(), lambda: _Twin("hardswish")),
        (lambda: nn.Hardsigmoid(), lambda: _Twin("hardsigmoid")),
        (lambda: nn.Hardswish(inplace=True), lambda: _Twin("hardswish")),
        (lambda: nn.Hardsigmoid(inplace=True), lambda: _Twin("hardsigmoid")),
        (lambda: nn.ReLU(inplace=True), lambda: nn.ReLU()),
        (lambda: nn.ReLU6(inplace=True), lambda: nn.ReLU6()),
        (lambda: nn.Hardtanh(-0.5, 0.5, inplace=True), lambda: nn.Hardtanh(-0.5, 0.5)),
        (lambda: nn.LeakyReLU(0.1, inplace=True), lambda: nn.LeakyReLU(0.1)),
        (lambda: nn.ELU(inplace=True), lambda: nn.ELU()),
        (lambda: nn.SiLU(inplace=True), lambda: nn.SiLU()),
    ],
    ids=[
        "Hardswish",
        "Hardsigmoid",
        "Hardswish-inplace",
        "Hardsigmoid-inplace",
        "ReLU-inplace",
        "ReLU6-inplace",
        "Hardtanh-inplace",
        "LeakyReLU-inplace",
        "ELU-inplace",
        "SiLU-inplace",
    ],
)
def test_hard_activation_modules(layer, twin) -> None:
    """Modules torch cannot differentiate twice (or that work in place), in the engine."""
    torch.manual_seed(2)
    lin, head = nn.Linear(4, 4).to(DT), nn.Linear(4, 2).to(DT)
    with torch.no_grad():
        lin.weight.mul_(4.0)  # pre-activations over every piece
    model = nn.Sequential(lin, layer(), head)
    ref = nn.Sequential(lin, twin(), head)
    x = torch.randn(3, 3, dtype=DT)
    _check(
        lambda z: torch.tanh(model(_inner(z))) * _inner(z)[:, :2],
        x,
        ref=lambda z: torch.tanh(ref(_inner(z))) * _inner(z)[:, :2],
        rtol=1e-7,  # hardsigmoid's backward (see RTOL)
    )


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.norm = nn.Linear(4, 4), nn.Linear(4, 4), nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x)) + x
        return torch.log_softmax(self.norm(h) * torch.sigmoid(self.b(h)), -1)


MODELS = {
    "mlp-tanh": (lambda: nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), (4,)),
    "mlp-bottleneck": (
        lambda: nn.Sequential(
            nn.Linear(12, 5), nn.GELU(), nn.Linear(5, 5), nn.SiLU(), nn.Linear(5, 2)
        ),
        (12,),
    ),
    "residual-layernorm-softmax": (Residual, (4,)),
    "cnn-pool-bn": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 3, 3),
            nn.BatchNorm2d(3),
            nn.Softplus(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(12, 2),
        ).eval(),
        (1, 6, 6),
    ),
}


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "single"])
@pytest.mark.parametrize("case", list(MODELS))
def test_models_against_references(case: str, batched: bool) -> None:
    factory, shape = MODELS[case]
    torch.manual_seed(3)
    model = factory().to(DT)
    x = torch.randn(3, *shape, dtype=DT)
    if batched:
        _check(model, x)
        _, jac, hes = hesse.derivatives(model, x, batched=True, strategy="structured", flat=True)
        torch.testing.assert_close(hes, _reference(model, x, "hessian"), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(jac, _reference(model, x, "jacobian"), rtol=1e-10, atol=1e-12)
        return
    one = x[:1]  # a single input in the model's own layout (with its batch axis of 1)
    for quantity in QUANTITIES:
        got = getattr(hesse, quantity)(model, one, output=1, strategy="structured", flat=True)
        want = getattr(hesse, quantity)(model, one, output=1, strategy="reverse", flat=True)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


CONVS = {
    "conv2d-stride-dilation-groups": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, stride=2),
            nn.Tanh(),
            nn.Conv2d(4, 4, 2, stride=2, dilation=2, groups=2),
            nn.Softplus(),
            nn.Flatten(),
            nn.LazyLinear(3),
        ),
        (2, 9, 9),
    ),
    "conv1d-padding": (
        lambda: nn.Sequential(
            nn.Conv1d(2, 4, 3, padding=2, stride=2), nn.Tanh(), nn.Flatten(), nn.LazyLinear(2)
        ),
        (2, 7),
    ),
    "conv3d-stride": (
        lambda: nn.Sequential(
            nn.Conv3d(1, 2, 2, stride=(1, 2, 1)), nn.Tanh(), nn.Flatten(), nn.LazyLinear(2)
        ),
        (1, 3, 4, 3),
    ),
    "conv2d-same-circular": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 2, 3, padding="same", padding_mode="circular"),
            nn.Tanh(),
            nn.Flatten(),
            nn.LazyLinear(2),
        ),
        (1, 4, 4),
    ),
}


def _engine_hessian(case: str, mode: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(engine's Hessian in ``mode`` at ``dtype``, float64 reference) on a model of the zoo."""
    factory, shape = {**MODELS, **CONVS}[case]
    torch.manual_seed(7)
    model = factory().to(dtype)
    x = torch.randn(2, *shape, dtype=dtype)
    with torch.no_grad():
        model(x)  # materialise lazy layers
    want = frozenset({"hessian", "gradient"})
    out = _pass(model, x, 2, want, mode)
    return out["hessian"], _reference(model.to(DT), x.to(DT), "hessian")


@pytest.mark.parametrize("mode", ["gram", "sweep", "taylor"])
@pytest.mark.parametrize("case", list(MODELS) + list(CONVS))
def test_every_engine_mode(case: str, mode: str) -> None:
    got, want = _engine_hessian(case, mode, DT)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_float32_matches_float64() -> None:
    torch.manual_seed(4)
    model = MODELS["mlp-bottleneck"][0]()
    x = torch.randn(5, 12)
    got = hesse.hessian(model, x, batched=True, strategy="structured", flat=True)
    want = _reference(model.to(DT), x.to(DT), "hessian")
    torch.testing.assert_close(got.to(DT), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("case", list(CONVS))
def test_conv_sweep_in_float32(case: str) -> None:
    """float32 convolutions pull back through oneDNN's transposed convolution, float64
    through the convolution's backward kernel: both against the float64 reference."""
    got, want = _engine_hessian(case, "sweep", torch.float32)
    scale = want.abs().max().item()
    torch.testing.assert_close(got.to(DT), want, rtol=1e-4, atol=1e-5 * scale)


def test_chunked_equals_unchunked() -> None:
    torch.manual_seed(5)
    model = MODELS["mlp-tanh"][0]().to(DT)
    x = torch.randn(7, 4, dtype=DT)
    whole = hesse.hessian(model, x, batched=True, strategy="structured")
    for chunk in (1, 7, 13):
        part = hesse.hessian(model, x, batched=True, strategy="structured", chunk_size=chunk)
        torch.testing.assert_close(part, whole, rtol=0, atol=1e-14)


def test_untraceable_model_falls_back_and_plan_says_why() -> None:
    def branchy(x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: TorchDynamo cannot capture one graph
            return torch.tanh(x).sum()
        return torch.sin(x).sum()

    x = torch.randn(4, dtype=DT)
    plan = hesse.plan(branchy, x)
    notes = dict(plan.estimates)
    assert plan.strategy != "structured"
    assert notes["structured"].startswith("n/a: TorchDynamo could not capture the model")
    assert "structured" in str(plan)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: declining is not a fallback
        got = hesse.hessian(branchy, x)
    torch.testing.assert_close(got, hessian(branchy)(x), rtol=1e-10, atol=1e-12)
    with pytest.raises(hesse.StrategyError, match="strategy 'structured' cannot compute this"):
        hesse.hessian(branchy, x, strategy="structured")


class _InPlace(nn.Module):
    """In-place ops on intermediates and on a buffer: the engine runs them out of place."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 1)
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x), inplace=True) + torch.tanh(self.a(x))
        h.mul_(self.scale)
        h += torch.sin(x).sum(-1, keepdim=True)
        return self.b(torch.nn.functional.softplus(h).flatten(1))


def test_inplace_ops_run_out_of_place() -> None:
    torch.manual_seed(3)
    model = _InPlace().to(DT)
    x = torch.randn(2, 3, dtype=DT)
    notes = dict(hesse.plan(model, x, batched=True).estimates)
    assert "MAC" in notes["structured"], notes["structured"]
    got = hesse.hessian(model, x, batched=True, strategy="structured")
    torch.testing.assert_close(got, _reference(model, x, "hessian"), rtol=1e-10, atol=1e-12)
    assert torch.equal(model.scale, torch.ones(4, dtype=DT))


def test_write_through_a_view_declines() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x)
        y[0].mul_(2.0)  # changes y through a view: not run out of place
        return y.sum()

    notes = dict(hesse.plan(f, torch.randn(3, dtype=DT)).estimates)
    assert "view" in notes["structured"], notes["structured"]


@pytest.mark.parametrize("quantity", ["hessian", "hessian_diag", "laplacian"])
def test_create_graph_through_the_engine(quantity: str) -> None:
    """Gradients of the engine's result to the input and the weights, against torch.func."""
    model = MODELS["mlp-tanh"][0]().to(DT)
    x = torch.randn(3, 4, dtype=DT, requires_grad=True)
    fn = getattr(hesse, quantity)
    got = fn(model, x, batched=True, strategy="structured", create_graph=True)
    params = dict(model.named_parameters())

    def reference(p: dict, z: torch.Tensor) -> torch.Tensor:
        f = lambda zz: torch.func.functional_call(model, p, (zz,))  # noqa: E731
        h = vmap(hessian(f))(z)
        if quantity == "hessian":
            return h
        diag = h.diagonal(dim1=-2, dim2=-1)
        return diag if quantity == "hessian_diag" else diag.sum(-1)

    want = reference(params, x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    weights = torch.randn_like(want)
    inputs = [x, *params.values()]
    kw = {"allow_unused": True, "materialize_grads": True}
    grads = torch.autograd.grad((got * weights).sum(), inputs, **kw)
    wants = torch.autograd.grad((want * weights).sum(), inputs, **kw)
    for g, w in zip(grads, wants, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("mlp-784-bottleneck", "structured"),
        ("pinn-mlp-d8", "structured"),
        ("cnn-28x28", "structured"),  # by the rule-based reverse sweep
    ],
)
def test_planner_choices_on_fixed_shapes(case: str, expected: str) -> None:
    torch.manual_seed(6)
    if case == "mlp-784-bottleneck":
        model = nn.Sequential(nn.Linear(784, 256), nn.Softplus(), nn.Linear(256, 10))
        x, kw = torch.randn(784), {"output": 3}
    elif case == "pinn-mlp-d8":
        model = nn.Sequential(
            nn.Linear(8, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 1)
        )
        x, kw = torch.randn(64, 8), {"batched": True}
    else:
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3),
            nn.Tanh(),
            nn.Conv2d(16, 32, 3, stride=2),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(4608, 10),
        )
        x, kw = torch.randn(1, 1, 28, 28), {"batched": True, "output": 3}
    assert hesse.plan(model, x, **kw).strategy == expected


def test_taylor_mode_runs_without_fallback_on_closed_forms() -> None:
    """Elementwise ops and products of two branches have exact Taylor rules of their own."""
    from hesse.engine.modes import _taylor
    from hesse.engine.tangents import Seed

    torch.manual_seed(8)
    lin = nn.Linear(3, 5).to(DT)
    f = lambda z: torch.tanh(lin(z)) * torch.sigmoid(lin(z)) + lin(z).exp()  # noqa: E731
    x = torch.randn(4, 3, dtype=DT)
    bound = capture(f, x)
    seed = Seed(bound.graph.input_node, 3, None)
    h = _reference(f, x, "hessian")
    for key in ("hessian", "diag", "laplacian"):
        env = bound.graph.env(bound.inputs, x)
        out = _taylor(bound.graph, env, seed, 4, None, frozenset({key}), False)
        ref = {"hessian": h, "diag": h.diagonal(dim1=-2, dim2=-1)}.get(key)
        ref = h.diagonal(dim1=-2, dim2=-1).sum(-1) if ref is None else ref
        torch.testing.assert_close(out[key], ref, rtol=1e-10, atol=1e-12)


def test_taylor_mode_declines_ops_without_closed_form() -> None:
    from hesse.engine.modes import _taylor
    from hesse.engine.rules.base import NoTaylorRule
    from hesse.engine.tangents import Seed

    norm = nn.LayerNorm(4).to(DT)  # torch's forward-over-forward of layer_norm is wrong
    x0 = torch.randn(2, 4, dtype=DT)
    bound = capture(lambda z: norm(torch.tanh(z)), x0)
    env = bound.graph.env(bound.inputs, x0)
    with pytest.raises(NoTaylorRule):
        _taylor(bound.graph, env, Seed(bound.graph.input_node, 4, None), 2, None, {"diag"}, False)
    x = torch.randn(2, 4, dtype=DT)
    got = hesse.laplacian(lambda z: norm(torch.tanh(z)), x, batched=True, strategy="structured")
    want = _reference(lambda z: norm(torch.tanh(z)), x, "laplacian")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("quantity", "outputs", "mode"),
    [
        ("laplacian", 3, "taylor"),  # no per-output backward pass
        ("hessian", 3, "taylor"),  # d = 3: six coefficients beat three backward passes
        ("hessian_diag", 1, "gram"),  # d = 8 coefficients cost more than one backward pass
        ("hessian", 1, "gram"),
    ],
)
def test_cost_model_picks_the_engine_mode(quantity: str, outputs: int, mode: str) -> None:
    d = 3 if outputs == 3 else 8
    model = nn.Sequential(
        nn.Linear(d, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, outputs)
    )
    x1 = torch.randn(1, d)
    bound = capture(model, x1)
    cost = graph_cost(bound.graph, bound.inputs, x1, d, 1)
    assert cost.best(quantity, outputs)[0] == mode
    notes = dict(hesse.plan(model, torch.randn(16, d), quantity, batched=True).estimates)
    assert notes["structured"].endswith(f"MAC ({mode} mode)")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inductor's own imports
def test_compiled_kernels_match_the_reference() -> None:
    from hesse.engine import kernels

    torch.manual_seed(9)
    model = nn.Sequential(
        nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 6), nn.Softplus(), nn.Linear(6, 2)
    )
    model = model.to(DT)
    x = torch.randn(5, 3, dtype=DT)
    kernels._COMPILED.clear()
    try:
        with warnings.catch_warnings(), hesse.settings(compile=True):
            warnings.simplefilter("error", hesse.HesseWarning)  # compiling must not fail
            _check_modes(model, x)
        assert {k[0] for k in kernels._COMPILED} == set(kernels.KERNELS)  # all were compiled
    finally:
        kernels._COMPILED.clear()


def test_failed_compile_warns_once_and_runs_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    from hesse.engine import kernels

    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no C++ compiler found")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    kernels._COMPILED.clear()
    kernels._FAILED.clear()
    try:
        t, d2 = torch.randn(3, 2, 4, dtype=DT), torch.randn(2, 4, dtype=DT)
        with hesse.settings(compile=True):
            with pytest.warns(hesse.HesseWarning, match="no C\\+\\+ compiler found.*eagerly"):
                got = kernels.run("taylor_first", d2, t)
            torch.testing.assert_close(got, d2 * (t * t).sum(0, keepdim=True))
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no second warning: the kernel runs eagerly
                kernels.run("taylor_first", d2, t)
    finally:
        kernels._COMPILED.clear()
        kernels._FAILED.clear()


@pytest.mark.parametrize("quantity", ["hessian", "hessian_diag", "laplacian", "jacobian"])
def test_derivative_program_matches_interpretation(quantity: str) -> None:
    """From the third call of a request on, the engine runs its emitted program."""
    from hesse.strategies.structured import PROGRAM_AFTER

    torch.manual_seed(5)
    model = MODELS["mlp-tanh"][0]().to(DT)
    x = torch.randn(4, 4, dtype=DT)
    fn = getattr(hesse, quantity)
    want = fn(model, x, batched=True, strategy="structured")  # interpreted
    for call in range(PROGRAM_AFTER + 3):
        got = fn(model, x, batched=True, strategy="structured")
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13, msg=f"call {call}")
    from hesse.engine.compiling import CompiledRunner

    facts = capture(model, x).capture.facts.values()
    key = {"hessian_diag": "diag"}.get(quantity, quantity)
    runners = [v for v in facts if isinstance(v, CompiledRunner)]
    programs = [r.program for r in runners if r.program.keys == (key,)]
    assert len(programs) == 1 and programs[0].nodes > 0  # it ran a program, not a fallback
    with torch.no_grad():  # the program reads the weights at every call
        model[0].weight.mul_(1.5)
    ref = _reference(model, x, {"hessian_diag": "diag"}.get(quantity, quantity))
    if quantity == "jacobian":
        ref = vmap(jacrev(lambda z: model(z[None])[0]))(x)
    elif quantity == "hessian_diag":
        ref = _reference(model, x, "hessian").diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(fn(model, x, batched=True, strategy="structured"), ref)
    got = fn(model, x, batched=True, strategy="structured", output=[1])  # another program
    torch.testing.assert_close(got, ref[:, 1:2], rtol=1e-10, atol=1e-12)


def test_derivative_program_keeps_the_graph() -> None:
    """``create_graph=True`` through the emitted program: gradients to x and the weights."""
    model = MODELS["mlp-tanh"][0]().to(DT)
    x = torch.randn(3, 4, dtype=DT, requires_grad=True)
    params = dict(model.named_parameters())
    f = lambda p, z: torch.func.functional_call(model, p, (z,))  # noqa: E731
    for _ in range(4):  # the last calls run the program
        got = hesse.laplacian(model, x, batched=True, strategy="structured", create_graph=True)
    want = vmap(hessian(lambda z: f(params, z[None])[0]))(x).diagonal(dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    inputs = [x, *params.values()]
    kw = {"allow_unused": True, "materialize_grads": True}
    grads = torch.autograd.grad(got.sum(), inputs, **kw)
    wants = torch.autograd.grad(want.sum(), inputs, **kw)
    for g, w in zip(grads, wants, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("op", ["linear", "conv1d"])
def test_affine_layer_with_a_weight_computed_from_x(op: str) -> None:
    """``F.linear(a, W(x))`` is bilinear: the engine gives it the generic rule."""
    torch.manual_seed(4)
    lin = nn.Linear(4, 4).to(DT)

    def f(z: torch.Tensor) -> torch.Tensor:  # one sample, (3,) -> (2,) or (6,)
        a = _inner(z[None])[0]
        w = torch.sin(lin(a))
        if op == "linear":
            return F.linear(torch.tanh(a), w.reshape(-1, 4)[:2] * 1.0)
        return F.conv1d(torch.tanh(a)[None], w.reshape(-1, 1, 2)[:2]).flatten()

    x = torch.randn(3, dtype=DT)
    want = hessian(f)(x)
    got = hesse.hessian(f, x, strategy="structured")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for mode, key in ENGINE_MODES:
        if key == "hessian":
            out = _pass(f, x, 1, frozenset({key}), mode)[key][0]
            torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12, msg=mode)


def test_plan_says_how_the_engine_runs_the_request() -> None:
    """Interpreted for the first calls, then a derivative program; compiled when it pays."""
    from hesse.strategies.structured import PROGRAM_AFTER

    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(3, 7), nn.Softplus(), nn.Linear(7, 1)).to(DT)
    x = torch.randn(5, 3, dtype=DT)
    kw = {"batched": True, "strategy": "structured"}
    notes = []
    for _ in range(PROGRAM_AFTER + 2):
        notes.append(hesse.plan(model, x, "laplacian", **kw).program)
        hesse.laplacian(model, x, **kw)
    assert notes[0] == (
        f"interpreted for {PROGRAM_AFTER} more call(s), then a derivative program "
        "(compiled whole when that pays (settings(compile='auto')))"
    )
    assert notes[-1].startswith("derivative program of ") and "not compiled yet" in notes[-1]
    with hesse.settings(compile=False):
        eager = hesse.plan(model, x, "laplacian", **kw).program
    assert eager.endswith("then a derivative program (not compiled)")
    with hesse.settings(compile=True):
        compiled = hesse.plan(model, x, "laplacian", **kw).program
    assert compiled.endswith("(compiled whole (settings(compile=True)))")
    assert "program" in str(hesse.plan(model, x, "laplacian", **kw))
