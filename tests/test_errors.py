"""Every error row of docs/api-contract.md: exception class, builtin base and message.

Messages must start with the call (``hesse.hessian: ``), say what was expected / got, and
give a fix. Each case asserts the class with ``pytest.raises(..., match=...)`` and then the
other parts of the message with separate regexes, so a failure says which part is missing.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from torch import nn

import hesse
from cases import case_by_id
from reference import QUANTITIES, SECOND_ORDER, reference

STRATEGIES = hesse.available_strategies()


def call(quantity: str, f: Any, x: Any, v: Any = None, **kw: Any):
    if quantity == "hvp":
        if v is None:
            v = torch.ones_like(x, dtype=torch.float64) if isinstance(x, torch.Tensor) else x
        return hesse.hvp(f, x, v, **kw)
    return getattr(hesse, quantity)(f, x, **kw)


def raises(quantity: str, exc: type[Exception], builtin: type[Exception], *parts: str):
    """Context manager: ``exc`` whose message starts with the call and matches ``parts``."""
    return _Raises(quantity, exc, builtin, parts)


class _Raises:
    def __init__(self, quantity, exc, builtin, parts):
        # "hesse.hessian: ..."; plan may spell its call out: "hesse.plan('hessian'): ..."
        start = r"^hesse\.plan(\(.*?\))?: " if quantity == "plan" else rf"^hesse\.{quantity}: "
        self.ctx = pytest.raises(exc, match=start)
        self.builtin, self.parts = builtin, parts

    def __enter__(self):
        self.info = self.ctx.__enter__()
        return self.info

    def __exit__(self, *exc_info):
        handled = self.ctx.__exit__(*exc_info)
        if not handled:  # another exception type: let it propagate unchanged
            return False
        err = self.info.value
        assert isinstance(err, hesse.HesseError)
        assert isinstance(err, self.builtin), f"{type(err).__name__} is not a {self.builtin}"
        for part in self.parts:
            assert re.search(part, str(err)), f"message lacks /{part}/: {err}"
        return handled


def _shape(shape: tuple[int, ...]) -> str:
    """Regex for a shape written as (1, 4), [1, 4] or torch.Size([1, 4])."""
    return r"[\[(]" + r",\s*".join(str(d) for d in shape) + r",?[\])]"


def linear() -> nn.Module:
    return nn.Linear(4, 3)


# --------------------------------------------------------------------------------------
# UnsupportedInputError
# --------------------------------------------------------------------------------------

BAD_DTYPES = [
    pytest.param(lambda: torch.arange(4), r"int64", id="int64"),
    pytest.param(lambda: torch.arange(4, dtype=torch.int32), r"int32", id="int32"),
    pytest.param(lambda: torch.tensor([True, False, True, True]), r"bool", id="bool"),
    pytest.param(lambda: torch.randn(4, dtype=torch.complex128), r"complex", id="complex128"),
]


@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize(("make_x", "dtype_text"), BAD_DTYPES)
def test_non_floating_input(make_x, dtype_text, quantity):
    x = make_x()
    v = torch.ones(4)
    fix = r"float|double|real|view_as_real"
    with raises(quantity, hesse.UnsupportedInputError, TypeError, dtype_text, fix):
        call(quantity, linear(), x, v)


@pytest.mark.parametrize("quantity", QUANTITIES)
def test_non_tensor_input(quantity):
    with raises(quantity, hesse.UnsupportedInputError, TypeError, r"list", r"[Tt]ensor"):
        call(quantity, linear(), [1.0, 2.0, 3.0, 4.0], torch.ones(4))


@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize(
    ("shape", "batched"),
    [((0,), False), ((3, 0), True), ((2, 0, 4), True)],
    ids=["single-(0,)", "batched-(3,0)", "batched-(2,0,4)"],
)
def test_empty_per_sample_input(shape, batched, quantity):
    x = torch.zeros(shape)
    per_sample = _shape(shape[batched:])
    with raises(quantity, hesse.UnsupportedInputError, TypeError, r"empty", per_sample):
        call(quantity, lambda z: z.sum(-1), x, torch.zeros(shape), batched=batched)


@pytest.mark.parametrize("quantity", QUANTITIES)
def test_batched_zero_dim_input(quantity):
    x = torch.tensor(1.5)
    with raises(quantity, hesse.UnsupportedInputError, TypeError, r"0-d|batch", r"batched=False"):
        call(quantity, torch.sin, x, torch.tensor(1.0), batched=True)


@pytest.mark.parametrize(
    ("x_shape", "v_shape", "batched"),
    [((4,), (5,), False), ((4,), (1, 4), False), ((3, 4), (4,), True), ((3, 4), (2, 4), True)],
    ids=["v5-x4", "v1x4-x4", "v4-x3x4-batched", "v2x4-x3x4-batched"],
)
def test_hvp_bad_v_shape(x_shape, v_shape, batched):
    x, v = torch.randn(x_shape), torch.randn(v_shape)
    with raises("hvp", hesse.UnsupportedInputError, TypeError, _shape(v_shape), _shape(x_shape)):
        hesse.hvp(linear(), x, v, batched=batched)


# --------------------------------------------------------------------------------------
# NonFiniteError
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_nan_inf_input(batched, quantity):
    x = torch.randn(3, 4)
    x[1, 2] = float("nan")
    x[2, 0] = float("nan")
    x[2, 3] = float("inf")  # 3 bad entries, first at (1, 2)
    with raises(
        quantity, hesse.NonFiniteError, ValueError, r"\b3\b", r"1,\s*2", r"NaN|nan|Inf|inf"
    ):
        call(quantity, linear(), x, torch.ones(3, 4), batched=batched)


# --------------------------------------------------------------------------------------
# UnsupportedModelError
# --------------------------------------------------------------------------------------


def _boom(x):
    raise ValueError("boom: the model rejects this input")


BAD_MODELS = [
    pytest.param(lambda z: (z, z), False, (r"tuple", r"[Tt]ensor"), id="returns-tuple"),
    pytest.param(lambda z: [z.sum()], False, (r"list", r"[Tt]ensor"), id="returns-list"),
    pytest.param(lambda z: float(z.sum()), False, (r"float", r"[Tt]ensor"), id="returns-float"),
    pytest.param(
        lambda z: z.to(torch.complex128), False, (r"complex", r"real"), id="returns-complex"
    ),
    pytest.param(lambda z: (z > 0).long(), False, (r"int64", r"float"), id="returns-int"),
    pytest.param(lambda z: z.sum(), True, (r"\bB\b|batch", r"shape"), id="batched-returns-0d"),
    pytest.param(lambda z: z.sum(0), True, (r"\bB\b|batch", r"shape"), id="batched-sums-batch"),
    pytest.param(_boom, False, (r"boom: the model rejects this input", r"ValueError"), id="raises"),
]


@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize(("f", "batched", "parts"), BAD_MODELS)
def test_bad_model_output(f, batched, parts, quantity):
    x = torch.randn(3, 4)
    with raises(quantity, hesse.UnsupportedModelError, TypeError, *parts):
        call(quantity, f, x, torch.ones(3, 4), batched=batched)


# --------------------------------------------------------------------------------------
# OutputSelectionError (per-sample output shape (2, 3): 6 elements)
# --------------------------------------------------------------------------------------

BAD_OUTPUTS = [
    pytest.param(6, (r"\b6\b",), id="int-6"),
    pytest.param(100, (r"100",), id="int-100"),
    pytest.param((2, 0), (r"\(2, 0\)", r"\(2, 3\)"), id="tuple-(2,0)"),
    pytest.param((0, 3), (r"\(0, 3\)", r"\(2, 3\)"), id="tuple-(0,3)"),
    pytest.param((1,), (r"\(1,\)", r"\(2, 3\)"), id="tuple-too-short"),
    pytest.param([0, 7], (r"\b7\b",), id="list-[0,7]"),
    pytest.param(torch.tensor([9]), (r"\b9\b",), id="tensor-[9]"),
    pytest.param(torch.tensor([[0, 1]]), (r"1-D|shape",), id="tensor-2d"),
    pytest.param(torch.tensor([0.5]), (r"float|Long|int",), id="tensor-float"),
    pytest.param(1.5, (r"float",), id="float"),
    pytest.param("first", (r"str",), id="str"),
]


@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize(("output", "parts"), BAD_OUTPUTS)
@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_bad_output_selection(batched, output, parts, quantity):
    model, x = case_by_id("multi-output-2x3").build(batched)
    with raises(quantity, hesse.OutputSelectionError, IndexError, *parts):
        call(quantity, model, x, torch.ones_like(x), output=output, batched=batched)


# --------------------------------------------------------------------------------------
# DeviceMismatchError (the "meta" device stands in for a GPU)
# --------------------------------------------------------------------------------------


class BufferOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(4, device="meta"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.scale).sum(-1)


@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize(
    "make_model",
    [lambda: nn.Linear(4, 3, device="meta"), BufferOnly],
    ids=["meta-parameters", "meta-buffer"],
)
def test_device_mismatch(make_model, quantity):
    model = make_model()
    x = torch.randn(4)
    with raises(quantity, hesse.DeviceMismatchError, ValueError, r"meta", r"cpu", r"\.to\("):
        call(quantity, model, x)


# --------------------------------------------------------------------------------------
# training-mode modules and sample coupling
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_dropout_in_training_mode(batched, quantity):
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Tanh(), nn.Linear(5, 2)).train()
    x = torch.randn(3, 4)
    with raises(quantity, hesse.NonDeterministicModelError, RuntimeError, r"Dropout", r"eval\(\)"):
        call(quantity, model, x, torch.ones(3, 4), batched=batched)
    assert model.training


def test_dropout_p0_or_eval_is_fine():
    x = torch.randn(3, 4)
    for model in (
        nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.0), nn.Tanh(), nn.Linear(5, 2)).train(),
        nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Tanh(), nn.Linear(5, 2)).eval(),
    ):
        got = hesse.hessian(model, x, batched=True)
        torch.testing.assert_close(got, reference(model, x, True).hessian)


@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_batchnorm_in_training_mode(batched, quantity):
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)).train()
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    x = torch.randn(3, 4)
    with raises(quantity, hesse.BatchCouplingError, RuntimeError, r"BatchNorm", r"eval\(\)"):
        call(quantity, model, x, torch.ones(3, 4), batched=batched)
    for k, b in model.named_buffers():
        assert torch.equal(b, buffers[k]), f"running statistic {k} was updated"
    assert model.training


class MixesSamples(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x - x.mean(0)))


@pytest.mark.parametrize("quantity", QUANTITIES)
def test_sample_mixing_model_batched(quantity):
    x = torch.randn(3, 4)
    with raises(
        quantity, hesse.BatchCouplingError, RuntimeError, r"batched=False|one sample|independent"
    ):
        call(quantity, MixesSamples(), x, torch.ones(3, 4), batched=True)


def test_sample_mixing_model_as_one_sample_is_fine():
    """With batched=False the whole (3, 4) block is one input: a valid request."""
    model, x = MixesSamples(), torch.randn(3, 4)
    got = hesse.hessian(model, x)
    torch.testing.assert_close(got, reference(model, x).hessian)


# --------------------------------------------------------------------------------------
# MemoryBudgetError
# --------------------------------------------------------------------------------------

_SIZE = r"\d+(?:\.\d+)?\s*(?:B|bytes|kB|KB|KiB|MB|MiB|GB|GiB)\b"


@pytest.mark.parametrize("quantity", ["jacobian", "hessian", "hessian_diag", "derivatives"])
def test_result_over_budget(quantity):
    x = torch.zeros(100_000)  # Jacobian / diagonal alone: 800 kB in float64

    def f(z):
        return torch.sin(z).sum()

    with raises(quantity, hesse.MemoryBudgetError, MemoryError, _SIZE):
        call(quantity, f, x, max_memory="100kB")


# --------------------------------------------------------------------------------------
# StrategyError / StrategyMismatchError
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize("name", ["vamp", "Loop", "", "auto "])
def test_unknown_strategy(name, quantity):
    names = [rf"\b{re.escape(n)}\b" for n in STRATEGIES]
    with raises(quantity, hesse.StrategyError, ValueError, re.escape(repr(name)), r"auto", *names):
        call(quantity, linear(), torch.randn(4), strategy=name)


def test_unknown_strategy_in_plan():
    with raises("plan", hesse.StrategyError, ValueError, r"vamp", *STRATEGIES):
        hesse.plan(linear(), torch.randn(4), "hessian", strategy="vamp")


REFUSALS = [
    pytest.param("custom-fn-old-style", s, q, id=f"custom-fn-old-style-{s}-{q}")
    for s in ("vmap", "reverse")
    for q in QUANTITIES
] + [
    pytest.param("custom-fn-no-jvp", "vmap", q, id=f"custom-fn-no-jvp-vmap-{q}")
    for q in SECOND_ORDER
]


@pytest.mark.parametrize(("case_id", "strategy", "quantity"), REFUSALS)
def test_named_strategy_cannot_run_model(case_id, strategy, quantity):
    model, x = case_by_id(case_id).build(True)
    with raises(
        quantity, hesse.StrategyError, ValueError, re.escape(strategy), r"strategy='?\w+'?"
    ):
        call(quantity, model, x, batched=True, strategy=strategy)


class NoGradInside(nn.Module):
    """A scale computed under torch.no_grad(): reverse mode treats it as a constant,
    forward mode does not (pytorch#128600)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        with torch.no_grad():
            scale = torch.tanh(h) + 1.5
        return scale * h * h


@pytest.mark.parametrize("quantity", SECOND_ORDER)
@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_no_grad_inside_model_with_forward_mode(batched, quantity):
    model, x = NoGradInside(), torch.randn(3, 4)
    with raises(
        quantity,
        hesse.StrategyMismatchError,
        RuntimeError,
        r"no_grad",
        r"detach|strategy='?(reverse|loop)'?",
    ):
        call(quantity, model, x, torch.randn(3, 4), batched=batched, strategy="vmap")


@pytest.mark.parametrize("strategy", ["reverse", "loop"])
def test_no_grad_inside_model_reverse_strategies_follow_autograd(strategy):
    """Reverse-mode strategies agree with autograd's reading (the scale is a constant)."""
    model, x = NoGradInside(), torch.randn(3, 4)
    got = hesse.hessian(model, x, batched=True, strategy=strategy)
    torch.testing.assert_close(got, reference(model, x, True).hessian)


def test_error_classes_subclass_builtins():
    pairs = {
        hesse.UnsupportedInputError: TypeError,
        hesse.NonFiniteError: ValueError,
        hesse.UnsupportedModelError: TypeError,
        hesse.OutputSelectionError: IndexError,
        hesse.DeviceMismatchError: ValueError,
        hesse.NonDeterministicModelError: RuntimeError,
        hesse.BatchCouplingError: RuntimeError,
        hesse.MemoryBudgetError: MemoryError,
        hesse.StrategyError: ValueError,
        hesse.StrategyMismatchError: RuntimeError,
    }
    for cls, base in pairs.items():
        assert issubclass(cls, hesse.HesseError) and issubclass(cls, base), cls
    for w in (
        hesse.PiecewiseLinearWarning,
        hesse.ZeroDerivativeWarning,
        hesse.FallbackWarning,
        hesse.PrecisionWarning,
        hesse.NonFiniteResultWarning,
    ):
        assert issubclass(w, hesse.HesseWarning) and issubclass(w, UserWarning), w
