"""Public API against independent float64 references (docs/api-contract.md)."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import re
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import hesse
from cases import (
    CASE_MODES,
    CASES,
    MaxPoolNet,
    ReluNet,
    SquaredLoss,
    WeightedSquare,
    case_by_id,
    cnn28,
    mlp,
    mode_id,
    seeded,
)
from reference import (
    QUANTITIES,
    SECOND_ORDER,
    Ref,
    assert_close,
    assert_symmetric,
    expected,
    expected_shape,
    fd_hessian,
    func_reference,
    grad_loop_hessian,
    param_grad_of_hessian_sum,
    reference,
    third_derivative_of_sum,
    tolerances,
)

STRATEGIES = hesse.available_strategies()
ALL_STRATEGIES = (*STRATEGIES, "auto")
# The contract's general-purpose strategies must run every model they can differentiate;
# any other registered strategy (e.g. a rule-based one) may refuse with a StrategyError.
CORE = ("vmap", "reverse", "loop")
MODE_PARAMS = [pytest.param(c, b, id=mode_id(c, b)) for c, b in CASE_MODES]
VMAP_MODE_PARAMS = [pytest.param(c, b, id=mode_id(c, b)) for c, b in CASE_MODES if c.vmap_ok]
# flat=True is checked on the cases whose shapes make flattening non-trivial
FLAT_CASES = {
    "linear",
    "squared-loss",
    "weighted-square-out2",
    "cnn-avgpool",
    "multi-output-2x3",
    "noncontig-transposed",
    "assumes-batch-dim",
    "item-call",
    "custom-fn-old-style",
}
MATRIX_PARAMS = [
    pytest.param(c, b, flat, id=f"{mode_id(c, b)}-{'flat' if flat else 'shaped'}")
    for c, b in CASE_MODES
    for flat in (False, True)
    if not flat or c.id in FLAT_CASES
]
FLOAT32_CASES = {
    "mlp-tanh",
    "mlp-gelu",
    "mlp-silu",
    "residual-mlp",
    "cnn-avgpool",
    "layernorm",
    "multi-output-2x3",
    "batchnorm-eval",
    "squared-loss",
}
FLOAT32_PARAMS = [p for p in VMAP_MODE_PARAMS if p.values[0].id in FLOAT32_CASES]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def call(quantity: str, f: Any, x: torch.Tensor, v: torch.Tensor | None = None, **kw: Any):
    """``hesse.<quantity>(f, x, **kw)``; ``hvp`` gets ``v`` as third argument."""
    if quantity == "hvp":
        return hesse.hvp(f, x, v, **kw)
    return getattr(hesse, quantity)(f, x, **kw)


def direction(x: torch.Tensor) -> torch.Tensor:
    """A fixed random ``v`` shaped like ``x`` (contiguous)."""
    with seeded(1234):
        return torch.randn(x.shape, dtype=x.dtype)


def check(
    quantity: str,
    got: Any,
    ref: Ref,
    flat: bool,
    v: torch.Tensor | None,
    *,
    dtype: torch.dtype = torch.float64,
    rtol: float | None = None,
    atol: float | None = None,
) -> None:
    """Compares a result with the reference: type, exact shape, dtype, device, values."""
    want = expected(quantity, ref, flat, v)
    if quantity == "derivatives":
        assert isinstance(got, tuple) and len(got) == 3, f"derivatives returned {type(got)}"
        for name, g, w in zip(("value", "jacobian", "hessian"), got, want, strict=True):
            assert_close(g, w, rtol=rtol, atol=atol, name=f"derivatives.{name}", check_dtype=dtype)
            assert g.device.type == "cpu"
            assert not g.requires_grad, "results must be detached"
        return
    assert_close(got, want, rtol=rtol, atol=atol, name=quantity, check_dtype=dtype)
    assert got.device.type == "cpu"
    assert not got.requires_grad, "results must be detached"


@functools.cache
def case_ref(case_id: str, batched: bool, dtype_tag: str = "float64") -> Ref:
    """Cached reference of a case (float32 tag: the float32 model's weights in float64)."""
    case = case_by_id(case_id)
    model, x = case.build(batched)
    if dtype_tag == "float32":
        model, x = copy.deepcopy(model).float().double(), x.float().double()
    return reference(model, x, batched, case.output)


def _strategy_may_refuse(strategy: str) -> bool:
    return strategy not in ("loop", "auto")


def allow_refusal(test):
    """Decorator: like :func:`refusal_allowed` around a whole test with a ``strategy``."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        strategy = kwargs.get("strategy")
        try:
            return test(*args, **kwargs)
        except hesse.StrategyError as err:
            if strategy in (None, "auto", *CORE):
                raise
            assert re.match(r"^hesse\.\w+: ", str(err)), str(err)
            pytest.skip(f"strategy {strategy!r} refused: {str(err)[:160]}")

    return wrapper


@contextlib.contextmanager
def refusal_allowed(strategy: str, api: str):
    """A non-core strategy may refuse a model with a StrategyError (reported as a skip)."""
    try:
        yield
    except hesse.StrategyError as err:
        if strategy in CORE or strategy == "auto":
            raise
        assert str(err).startswith(f"hesse.{api}: "), str(err)
        pytest.skip(f"strategy {strategy!r} refused: {str(err)[:160]}")


# --------------------------------------------------------------------------------------
# the references agree with each other (so that a failure below is hesse's)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "batched"), MODE_PARAMS)
def test_references_agree(case, batched):
    model, x = case.build(batched)
    ref = case_ref(case.id, batched)
    if case.vmap_ok:
        other = func_reference(model, x, batched, case.output)
        assert_close(other.value, ref.value, name="func value")
        assert_close(other.jacobian, ref.jacobian, name="func jacobian")
        assert_close(other.hessian, ref.hessian, name="func hessian")
    assert_close(grad_loop_hessian(model, x, batched, case.output), ref.hessian, name="grad loop")
    assert_close(
        fd_hessian(model, x, batched, case.output), ref.hessian, rtol=1e-3, atol=1e-5, name="FD"
    )


# --------------------------------------------------------------------------------------
# the main matrix: case x strategy x quantity x flat
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@pytest.mark.parametrize(("case", "batched", "flat"), MATRIX_PARAMS)
def test_matches_reference(case, batched, flat, strategy, quantity):
    model, x = case.build(batched)
    ref = case_ref(case.id, batched)
    v = direction(x) if quantity == "hvp" else None
    kw = {"output": case.output, "batched": batched, "flat": flat, "strategy": strategy}
    if case.vmap_ok:
        with refusal_allowed(strategy, quantity):
            got = call(quantity, model, x, v, **kw)
    elif strategy == "auto":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = call(quantity, model, x, v, **kw)
        unexpected = [w for w in caught if not issubclass(w.category, hesse.FallbackWarning)]
        assert not unexpected, [str(w.message) for w in unexpected]
    elif _strategy_may_refuse(strategy):
        # a vmap-based strategy may refuse this model, but only with a StrategyError
        try:
            got = call(quantity, model, x, v, **kw)
        except hesse.StrategyError as err:
            assert str(err).startswith(f"hesse.{quantity}: "), str(err)
            return
    else:
        got = call(quantity, model, x, v, **kw)
    check(quantity, got, ref, flat, v)


@pytest.mark.parametrize("quantity", ["jacobian", "hessian", "laplacian", "hvp"])
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@pytest.mark.parametrize(("case", "batched"), FLOAT32_PARAMS)
def test_float32_close_to_float64_reference(case, batched, strategy, quantity):
    model, x = case.build(batched)
    model, x = model.float(), x.float()
    ref = case_ref(case.id, batched, "float32")
    v = direction(x) if quantity == "hvp" else None
    with refusal_allowed(strategy, quantity):
        got = call(quantity, model, x, v, output=case.output, batched=batched, strategy=strategy)
    check(quantity, got, ref, False, v, dtype=torch.float32)


# --------------------------------------------------------------------------------------
# closed forms
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@allow_refusal
def test_linear_layer_zero_hessian(strategy, batched):
    model, x = case_by_id("linear").build(batched)
    lead = (x.shape[0],) if batched else ()
    jac = hesse.jacobian(model, x, batched=batched, strategy=strategy)
    assert_close(jac, model.weight.detach().expand(*lead, 3, 4), rtol=1e-14, atol=1e-14)
    hess = hesse.hessian(model, x, batched=batched, strategy=strategy)
    assert hess.shape == (*lead, 3, 4, 4)
    assert torch.count_nonzero(hess) == 0, "a linear model has an exactly zero Hessian"
    for quantity in ("hessian_diag", "laplacian", "hvp"):
        v = direction(x) if quantity == "hvp" else None
        out = call(quantity, model, x, v, batched=batched, strategy=strategy)
        assert out.shape == expected_shape(quantity, case_ref("linear", batched), False)
        assert torch.count_nonzero(out) == 0, quantity
    value, jac2, hess2 = hesse.derivatives(model, x, batched=batched, strategy=strategy)
    assert torch.count_nonzero(hess2) == 0
    assert_close(jac2, jac, rtol=1e-14, atol=1e-14)
    assert_close(value, model(x).detach(), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@allow_refusal
def test_squared_loss_closed_form(strategy, batched):
    with seeded(5):
        model = SquaredLoss()
        x = torch.randn(2, 4) if batched else torch.randn(4)
    w = model.weight.detach()
    hess = hesse.hessian(model, x, batched=batched, strategy=strategy)
    want = 2 * w.T @ w
    assert_close(hess, want.expand(2, 4, 4) if batched else want, rtol=1e-12, atol=1e-12)
    grad = hesse.jacobian(model, x, batched=batched, strategy=strategy)
    want_grad = 2 * (x @ w.T - model.target) @ w
    assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)
    lap = hesse.laplacian(model, x, batched=batched, strategy=strategy)
    assert_close(lap, torch.trace(want).expand(2) if batched else torch.trace(want))


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@allow_refusal
def test_weighted_square_output_2(strategy):
    model = WeightedSquare()
    x = torch.tensor([0.5, -1.0, 2.0, 3.0])
    hess = hesse.hessian(model, x, output=2, strategy=strategy)
    want = torch.zeros(4, 4)
    want[2, 2] = 2 * 2.0
    assert_close(hess, want, rtol=1e-14, atol=1e-14)
    jac = hesse.jacobian(model, x, output=2, strategy=strategy)
    assert_close(jac, torch.tensor([0.0, 0.0, 2 * 2.0 * 2.0, 0.0]), rtol=1e-14, atol=1e-14)
    diag = hesse.hessian_diag(model, x, strategy=strategy)  # all outputs: Q = (4,)
    assert_close(diag, torch.diag(2 * torch.arange(4.0)), rtol=1e-14, atol=1e-14)


@functools.lru_cache(maxsize=1)
def _cnn28_ref() -> torch.Tensor:
    model, x = cnn28()
    return reference(model, x, output=3).hessian.reshape(784, 784)


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@allow_refusal
def test_cnn_class_logit_784x784(strategy):
    model, x = cnn28()
    hess = hesse.hessian(model, x, output=3, flat=True, strategy=strategy)
    assert hess.shape == (784, 784)
    assert_close(hess, _cnn28_ref())
    assert_symmetric(hess, 784)


def test_cnn_class_logit_shaped_and_batched():
    model, x = cnn28()
    hess = hesse.hessian(model, x, output=3)
    assert hess.shape == (1, 28, 28, 1, 28, 28)
    assert_close(hess.reshape(784, 784), _cnn28_ref())
    xb = torch.stack([x, x.flip(-1)])
    hb = hesse.hessian(model, xb, output=3, flat=True, batched=True)
    assert hb.shape == (2, 784, 784)
    assert_close(hb[0], _cnn28_ref())
    diag = hesse.hessian_diag(model, xb, output=3, flat=True, batched=True)
    assert_close(diag[0], torch.diagonal(_cnn28_ref()))


# --------------------------------------------------------------------------------------
# chunking, memory budgets, progress
# --------------------------------------------------------------------------------------

CHUNKED = ("jacobian", "hessian", "hessian_diag", "laplacian", "derivatives")


@pytest.mark.parametrize("quantity", CHUNKED)
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@allow_refusal
def test_chunk_size_does_not_change_result(strategy, quantity):
    case = case_by_id("multi-output-2x3")
    model, x = case.build(True)
    ref = case_ref(case.id, True)
    results = {}
    for chunk in (None, 1, 7):
        got = call(quantity, model, x, batched=True, strategy=strategy, chunk_size=chunk)
        check(quantity, got, ref, False, None)
        results[chunk] = got if isinstance(got, tuple) else (got,)
    for chunk in (1, 7):
        for a, b in zip(results[chunk], results[None], strict=True):
            assert_close(a, b, rtol=1e-12, atol=1e-13, name=f"chunk {chunk} vs None")


@pytest.mark.parametrize("max_memory", ["1MB", "512KiB", "2GB", "0.5 MiB", 10**6])
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@allow_refusal
def test_max_memory_budgets_that_fit(strategy, max_memory):
    case = case_by_id("residual-mlp")
    model, x = case.build(True)
    ref = case_ref(case.id, True)
    got = hesse.hessian(model, x, batched=True, strategy=strategy, max_memory=max_memory)
    check("hessian", got, ref, False, None)
    got = hesse.hessian_diag(model, x, batched=True, strategy=strategy, max_memory=max_memory)
    check("hessian_diag", got, ref, False, None)


_SIZE = re.compile(r"\d+(?:\.\d+)?\s*(?:B|bytes|kB|KB|KiB|MB|MiB|GB|GiB|TB|TiB)\b")


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@allow_refusal
def test_hessian_over_budget_raises_with_sizes(strategy):
    model, x = cnn28()  # 784 x 784 float64 = 4.9 MB
    with pytest.raises(hesse.MemoryBudgetError, match=r"^hesse\.hessian: ") as info:
        hesse.hessian(model, x, output=3, strategy=strategy, max_memory="1MB")
    assert isinstance(info.value, MemoryError)
    sizes = _SIZE.findall(str(info.value))
    assert len(sizes) >= 2, f"message should state needed size and budget: {info.value}"


def test_huge_hessian_refused_before_allocating():
    x = torch.zeros(100_000)  # dense Hessian: 80 GB in float64

    def f(z):
        return torch.sin(z).sum()

    with pytest.raises(hesse.MemoryBudgetError, match=r"^hesse\.hessian: ") as info:
        hesse.hessian(f, x, max_memory="1GB")
    assert len(_SIZE.findall(str(info.value))) >= 2, str(info.value)


@pytest.mark.parametrize("quantity", CHUNKED)
def test_progress_bar_same_result(quantity, capsys):
    case = case_by_id("mlp-tanh")
    model, x = case.build(True)
    got = call(quantity, model, x, batched=True, progress=True)
    capsys.readouterr()
    check(quantity, got, case_ref(case.id, True), False, None)


# --------------------------------------------------------------------------------------
# symmetry, output selection
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@pytest.mark.parametrize(("case", "batched"), VMAP_MODE_PARAMS)
@allow_refusal
def test_hessian_symmetric(case, batched, strategy):
    model, x = case.build(batched)
    hess = hesse.hessian(model, x, batched=batched, strategy=strategy, output=case.output)
    n = math.prod(x.shape[1:] if batched else x.shape)
    assert_symmetric(hess, n)


OUTPUTS = {
    "None": None,
    "int4": 4,
    "int0": 0,
    "tuple(1,2)": (1, 2),
    "list[0,5,3]": [0, 5, 3],
    "list[2]": [2],
    "LongTensor[5,1]": torch.tensor([5, 1]),
    "slice(1,5)": slice(1, 5),
    "slice(::2)": slice(None, None, 2),
}


@functools.cache
def _selection_ref(output_id: str, batched: bool) -> Ref:
    model, x = case_by_id("multi-output-2x3").build(batched)
    return reference(model, x, batched, OUTPUTS[output_id])


@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize(
    ("batched", "flat"),
    [(False, False), (True, True)],
    ids=["single-shaped", "batched-flat"],
)
@pytest.mark.parametrize("output_id", list(OUTPUTS))
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@allow_refusal
def test_output_selection(strategy, output_id, batched, flat, quantity):
    model, x = case_by_id("multi-output-2x3").build(batched)
    output = OUTPUTS[output_id]
    ref = _selection_ref(output_id, batched)
    v = direction(x) if quantity == "hvp" else None
    got = call(quantity, model, x, v, output=output, batched=batched, flat=flat, strategy=strategy)
    check(quantity, got, ref, flat, v)


@pytest.mark.parametrize("output", [None, 0], ids=["None", "int0"])
@pytest.mark.parametrize("flat", [False, True], ids=["shaped", "flat"])
def test_scalar_output_shapes(output, flat):
    case = case_by_id("squared-loss")
    model, x = case.build(False)  # f(x) is 0-d: Q = ()
    ref = reference(model, x, False, output)
    assert ref.q == ()
    for quantity in QUANTITIES:
        v = direction(x) if quantity == "hvp" else None
        check(quantity, call(quantity, model, x, v, output=output, flat=flat), ref, flat, v)


# --------------------------------------------------------------------------------------
# purity: the caller's model and tensors are left alone
# --------------------------------------------------------------------------------------


def _snapshot(model: nn.Module):
    return {
        "params": {k: (p.detach().clone(), p.requires_grad) for k, p in model.named_parameters()},
        "buffers": {k: (b.clone(), b._version) for k, b in model.named_buffers()},
        "training": [m.training for m in model.modules()],
    }


def _frozen_first(model: nn.Module) -> nn.Module:
    next(iter(model.parameters())).requires_grad_(False)
    return model


PURITY_MODELS = {
    "batchnorm-eval": lambda: case_by_id("batchnorm-eval").build(True)[0],
    "mlp-train-mode": lambda: mlp(4, (5,), 2, nn.Tanh).train(),
    "mlp-frozen-param": lambda: _frozen_first(mlp(4, (5,), 2, nn.Softplus)),
}


PURITY_PARAMS = [
    pytest.param(m, k, id=f"{m}-{k}")
    for m in PURITY_MODELS
    for k in ("plain", "leaf-requires-grad", "non-leaf")
    if m == "batchnorm-eval" or k == "leaf-requires-grad"
]


@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@pytest.mark.parametrize(("model_id", "x_kind"), PURITY_PARAMS)
@allow_refusal
def test_caller_state_untouched(model_id, strategy, quantity, x_kind):
    model = PURITY_MODELS[model_id]()
    source = torch.randn(3, 4, requires_grad=x_kind != "plain")
    x = source * 2 if x_kind == "non-leaf" else source
    before = _snapshot(model)
    x_value, x_version, x_flag = x.detach().clone(), x._version, x.requires_grad
    v = direction(x).detach() if quantity == "hvp" else None
    got = call(quantity, model, x, v, batched=True, strategy=strategy)
    parts = got if isinstance(got, tuple) else (got,)
    assert all(not p.requires_grad for p in parts), "results must be detached by default"
    # input
    assert torch.equal(x.detach(), x_value) and x._version == x_version
    assert x.requires_grad == x_flag
    assert source.grad is None
    # model
    after = _snapshot(model)
    assert after["training"] == before["training"], "model.train()/eval() state changed"
    for name, p in model.named_parameters():
        value, flag = before["params"][name]
        assert p.grad is None, f"{name}.grad was set"
        assert p.requires_grad == flag, f"{name}.requires_grad changed"
        assert torch.equal(p.detach(), value), f"{name} changed"
    for name, b in model.named_buffers():
        value, version = before["buffers"][name]
        assert torch.equal(b, value) and b._version == version, f"buffer {name} mutated"


# --------------------------------------------------------------------------------------
# create_graph
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@allow_refusal
def test_create_graph_backprop_through_hessian(strategy, batched):
    case = case_by_id("mlp-softplus")
    model, x0 = case.build(batched)
    x = x0.clone().requires_grad_(True)
    hess = hesse.hessian(model, x, batched=batched, strategy=strategy, create_graph=True)
    check_value = case_ref(case.id, batched).hessian
    assert_close(hess, check_value)
    assert hess.requires_grad, "create_graph=True must keep the graph"
    total = hess.sum()
    (gx,) = torch.autograd.grad(total, x, retain_graph=True)
    assert_close(gx, third_derivative_of_sum(model, x0, batched), name="d sum(H) / dx")
    names = [k for k, _ in model.named_parameters()]
    grads = torch.autograd.grad(total, [p for _, p in model.named_parameters()], allow_unused=True)
    want = param_grad_of_hessian_sum(model, x0, batched)
    for name, g in zip(names, grads, strict=True):
        g = torch.zeros_like(want[name]) if g is None else g
        assert_close(g, want[name], name=f"d sum(H) / d {name}")
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@allow_refusal
def test_create_graph_matches_finite_differences(strategy):
    """d/dx sum(H) against central differences of sum(H) computed by the reference."""
    model, x0 = case_by_id("mlp-tanh").build(False)
    x = x0.clone().requires_grad_(True)
    hess = hesse.hessian(model, x, strategy=strategy, create_graph=True)
    (gx,) = torch.autograd.grad(hess.sum(), x)
    eps = 1e-5
    fd = torch.zeros_like(x0)
    for j in range(x0.numel()):
        e = torch.zeros_like(x0)
        e[j] = eps
        up = reference(model, x0 + e).hessian.sum()
        down = reference(model, x0 - e).hessian.sum()
        fd[j] = (up - down) / (2 * eps)
    assert_close(gx, fd, rtol=1e-3, atol=1e-5, name="FD of sum(H)")


# --------------------------------------------------------------------------------------
# precision, zeros, warnings
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantity", ["hessian", "jacobian", "laplacian"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@allow_refusal
def test_low_precision_module_upcast(strategy, dtype, quantity):
    case = case_by_id("mlp-softplus")
    model, x = case.build(True)
    model, x = model.to(dtype), x.to(dtype)
    with pytest.warns(hesse.PrecisionWarning, match=r"float32"):
        got = call(quantity, model, x, batched=True, strategy=strategy)
    ref = reference(copy.deepcopy(model).double(), x.double(), True)
    check(quantity, got, ref, False, None, dtype=torch.float32)
    assert all(p.dtype == dtype for p in model.parameters()), "caller's model was cast"
    assert x.dtype == dtype


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@allow_refusal
def test_float16_input_function(strategy):
    x = torch.randn(5).half()

    def f(z):
        return (torch.sin(z) * z).sum()

    with pytest.warns(hesse.PrecisionWarning):
        got = hesse.hessian(f, x, strategy=strategy)
    ref = reference(f, x.double())
    check("hessian", got, ref, False, None, dtype=torch.float32)


@pytest.mark.parametrize("quantity", SECOND_ORDER)
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@pytest.mark.parametrize("net", ["relu-mlp", "maxpool-cnn"])
@allow_refusal
def test_piecewise_linear_zero_with_warning(net, strategy, quantity):
    with seeded(3):
        model = ReluNet() if net == "relu-mlp" else MaxPoolNet()
        x = torch.randn(2, 4) if net == "relu-mlp" else torch.randn(2, 1, 6, 6)
    v = direction(x) if quantity == "hvp" else None
    with pytest.warns(hesse.PiecewiseLinearWarning):
        got = call(quantity, model, x, v, batched=True, strategy=strategy)
    second = got[2] if quantity == "derivatives" else got
    assert torch.count_nonzero(second) == 0
    ref = reference(model, x, True)
    check(quantity, got, ref, False, v)


class Constant(nn.Module):
    """Ignores its input (a closure over module attributes)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c.expand(*x.shape[:-1], 3) * 1.0


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@allow_refusal
def test_constant_model_gives_zeros(strategy, quantity, batched):
    model = Constant()
    x = torch.randn(2, 4) if batched else torch.randn(4)
    v = direction(x) if quantity == "hvp" else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = call(quantity, model, x, v, batched=batched, strategy=strategy)
    categories = [w.category for w in caught]
    assert all(issubclass(c, hesse.HesseWarning) for c in categories), categories
    if quantity in ("jacobian", "derivatives"):
        assert hesse.ZeroDerivativeWarning in categories, "all-zero Jacobian must warn"
    check(quantity, got, reference(model, x, batched), False, v)
    parts = got[1:] if quantity == "derivatives" else (got,)
    assert all(torch.count_nonzero(p) == 0 for p in parts)


# --------------------------------------------------------------------------------------
# models vmap cannot run: loop handles them, auto falls back and says so
# --------------------------------------------------------------------------------------

# the FallbackWarning must name what failed: the Function / the missing rule
FALLBACK = {
    "custom-fn-old-style": (QUANTITIES, r"Cube|autograd\.Function|setup_context"),
    "custom-fn-no-jvp": (SECOND_ORDER, r"Cube|autograd\.Function|jvp|forward"),
}
FALLBACK_PARAMS = [
    pytest.param(cid, q, id=f"{cid}-{q}") for cid, (qs, _) in FALLBACK.items() for q in qs
]


@pytest.mark.parametrize(("case_id", "quantity"), FALLBACK_PARAMS)
def test_auto_falls_back_with_warning(case_id, quantity):
    case = case_by_id(case_id)
    model, x = case.build(True)
    v = direction(x) if quantity == "hvp" else None
    with pytest.warns(hesse.FallbackWarning) as record:
        got = call(quantity, model, x, v, batched=True)
    text = " ".join(str(w.message) for w in record)
    assert text.startswith(f"hesse.{quantity}: "), text
    assert re.search(FALLBACK[case_id][1], text), f"warning should name the operator: {text}"
    check(quantity, got, case_ref(case_id, True), False, v)


MUST_RUN = [
    pytest.param(cid, s, q, id=f"{cid}-{s}-{q}")
    for cid in ("item-call", "inplace-write", "custom-fn-old-style", "custom-fn-no-jvp")
    for s in (("loop", "reverse") if cid == "custom-fn-no-jvp" else ("loop",))
    for q in QUANTITIES
]


@pytest.mark.parametrize(("case_id", "strategy", "quantity"), MUST_RUN)
def test_autograd_strategies_run_vmap_unfriendly_models(case_id, strategy, quantity):
    case = case_by_id(case_id)
    model, x = case.build(True)
    v = direction(x) if quantity == "hvp" else None
    got = call(quantity, model, x, v, batched=True, strategy=strategy)
    check(quantity, got, case_ref(case_id, True), False, v)


# --------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantity", QUANTITIES)
def test_plan_prints_and_names_strategy(quantity, capsys):
    model, x = case_by_id("mlp-tanh").build(True)
    p = hesse.plan(model, x, quantity, batched=True)
    assert isinstance(p, hesse.Plan)
    text = str(p)
    assert any(s in text for s in STRATEGIES), text
    print(p)
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_plan_respects_explicit_strategy(strategy):
    model, x = case_by_id("mlp-tanh").build(False)
    text = str(hesse.plan(model, x, "hessian", strategy=strategy))
    assert strategy in text, text


def test_available_strategies_registry():
    names = hesse.available_strategies()
    assert isinstance(names, tuple) and names
    assert "auto" not in names
    assert {"vmap", "reverse", "loop"} <= set(names)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_case_factories_are_deterministic(case):
    batched = case.modes[0]
    (m1, x1), (m2, x2) = case.build(batched), case.build(batched)
    assert torch.equal(x1, x2)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert tolerances(torch.float64, x1)[0] <= 1e-5
