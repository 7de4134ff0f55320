"""Adversarial suite of issue 9, part 2: models hesse must refuse or still get right.

Categories 5-9: samples that couple only in larger batches, ``@once_differentiable``,
random ops, autocast, ``.detach()``, operators that one strategy cannot run (GRU,
``Tensor.chunk``), ``torch.utils.checkpoint`` and fused attention. Every result is right
in float64 or the call raises the typed error named in each test.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import hesse
from reference import tolerances
from trust_cases import (
    ALL,
    STRATEGIES,
    B,
    D,
    call,
    check_calls,
    close,
    mlp,
    schedules,
    seeded_randn,
    strategy_error_or_result,
    want,
)
from trust_models import (
    CenterTail,
    Checkpointed,
    Chunked,
    Detached,
    FunctionalDropout,
    GRULast,
    MixAtFour,
    OnceDifferentiable,
    RandNoise,
    SelfAttention,
    attention_settings,
    encoder_layer,
)

# 5. ------------------------------------------------------------------------------------


@schedules
@pytest.mark.parametrize("model_cls", [MixAtFour, CenterTail], ids=["mix_at_4", "center_tail"])
def test_coupling_only_in_larger_batches(model_cls, strategy: str, before: int) -> None:
    """Fine at B=2; at B=5 sample 3 mixes into sample 0 (or samples 2..4 are centred
    together, so x[:2] alone shows nothing): BatchCouplingError on every quantity, every
    call, also after earlier calls at B=2 have succeeded. (An explicit strategy that
    declines the model at B=2 with a StrategyError naming another may decline at B=5 too.)"""
    model = model_cls().eval()
    small, big = seeded_randn(2, D, seed=30), seeded_randn(5, D, seed=31)
    refs = {q: want(q, model, small) for q in ("hessian", "laplacian")}
    outcomes = set()
    for i in range(before + 1):
        for q, expect in refs.items():
            if strategy == "auto":
                close(call(q, model, small, "auto", batched=True), expect, f"B=2, call {i + 1}")
            else:
                outcomes.add(
                    strategy_error_or_result(q, model, small, strategy, expect, batched=True)
                )
    errors = (hesse.BatchCouplingError,)
    if outcomes - {"ok"}:
        errors += (hesse.StrategyError,)
    for _ in range(3):
        for quantity in ("hessian", "laplacian", "jacobian"):
            with pytest.raises(errors):
                call(quantity, model, big, strategy, batched=True)
    for q, expect in refs.items():
        if strategy == "auto":
            close(call(q, model, small, "auto", batched=True), expect, "B=2 again")


# 6. ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("strategy", "calls"), [(s, 2) for s in STRATEGIES] + [("auto", 10)])
def test_once_differentiable_never_zero(strategy: str, calls: int) -> None:
    """Second derivatives through a ``@once_differentiable`` backward: a typed HesseError
    or the right result (never the silent zeros of a missing double backward)."""
    model = OnceDifferentiable().eval()
    x = seeded_randn(B, D, seed=32)
    plain = OnceDifferentiable(custom=False).eval()
    refs = {q: want(q, plain, x) for q in ("hessian", "laplacian", "hessian_diag")}
    assert float(refs["hessian"].abs().max()) > 0.1
    for i in range(calls):
        for q, expect in refs.items():
            try:
                got = call(q, model, x, strategy, batched=True)
            except hesse.HesseError:
                continue
            close(got, expect, f"call {i + 1}: {q} through once_differentiable")


@pytest.mark.parametrize("strategy", ALL)
def test_once_differentiable_first_order_works(strategy: str) -> None:
    """First derivatives through ``@once_differentiable`` are fine: ``auto`` gives them;
    an explicit strategy gives them or names one that does."""
    model = OnceDifferentiable().eval()
    x = seeded_randn(B, D, seed=33)
    expect = want("jacobian", OnceDifferentiable(custom=False).eval(), x)
    for _ in range(3):
        if strategy == "auto":
            close(call("jacobian", model, x, "auto", batched=True), expect, "jacobian")
        else:
            strategy_error_or_result("jacobian", model, x, strategy, expect, batched=True)


@pytest.mark.parametrize(("strategy", "calls"), [(s, 2) for s in STRATEGIES] + [("auto", 10)])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "single"])
@pytest.mark.parametrize("model_cls", [FunctionalDropout, RandNoise], ids=["dropout", "rand_like"])
def test_random_forward_refused(model_cls, batched: bool, strategy: str, calls: int) -> None:
    """``F.dropout(training=True)`` (not an nn.Dropout module) and ``x + rand_like(x)``:
    NonDeterministicModelError on every call, for every quantity (with batched=True not
    mistaken for batch coupling)."""
    model = model_cls().eval()
    x = seeded_randn(B, D, seed=34) if batched else seeded_randn(D, seed=34)
    for _ in range(calls):
        for quantity in ("hessian", "laplacian", "jacobian"):
            with pytest.raises(hesse.NonDeterministicModelError):
                call(quantity, model, x, strategy, batched=batched)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("strategy", ALL)
def test_autocast_region(strategy: str, dtype: torch.dtype) -> None:
    """Inside ``torch.autocast("cpu", bfloat16)``: the result is as precise as outside it
    (float64: 1e-10; float32: float32's 1e-4 against the float64 reference of the same
    weights), or hesse raises a HesseError or warns a HesseWarning (not FallbackWarning).
    The autocast region is still active afterwards."""
    model64 = mlp()
    x64 = seeded_randn(B, D, seed=35)
    expect = want("hessian", model64, x64)
    model, x = mlp().to(dtype), x64.to(dtype)
    for i in range(3 if strategy == "auto" else 1):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    got = hesse.hessian(model, x, batched=True, strategy=strategy)
                except hesse.HesseError:
                    got = None
            assert torch.is_autocast_enabled("cpu")
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        warned = [
            w
            for w in caught
            if issubclass(w.category, hesse.HesseWarning)
            and not issubclass(w.category, hesse.FallbackWarning)
        ]
        if got is None or warned:
            continue
        assert got.dtype == dtype
        rtol, atol = (1e-10, 1e-10) if dtype == torch.float64 else tolerances(dtype, expect)
        close_tol = {"rtol": rtol, "atol": atol * max(1.0, float(expect.abs().max()))}
        from reference import assert_close

        assert_close(got, expect, name=f"call {i + 1} under autocast, {dtype}", **close_tol)


# 7. ------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ALL)
def test_detach_every_call(strategy: str) -> None:
    """``.detach()`` inside forward: right on every one of 10 calls (auto switches
    strategy during them)."""
    model = Detached().eval()
    check_calls(model, seeded_randn(B, D, seed=36), strategy, 10, label="detach")


# 8. ------------------------------------------------------------------------------------

TRICKY = {"gru": (GRULast, (B, 3, 2)), "chunk": (Chunked, (B, D))}


@pytest.mark.parametrize("kind", list(TRICKY))
def test_auto_never_leaks_a_strategy_error(kind: str) -> None:
    """GRU and ``Tensor.chunk`` with batched=True: 10 calls in a row with ``auto``, all
    right (FallbackWarning allowed)."""
    cls, shape = TRICKY[kind]
    model = cls().eval()
    check_calls(model, seeded_randn(*shape, seed=37), "auto", 10, label=kind)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", list(TRICKY))
def test_explicit_strategy_runs_or_names_one_that_does(kind: str, strategy: str) -> None:
    """An explicit strategy gives the right result, or a StrategyError naming another
    strategy, which then does give it."""
    cls, shape = TRICKY[kind]
    model = cls().eval()
    x = seeded_randn(*shape, seed=38)
    for q in ("hessian", "laplacian"):
        expect = want(q, model, x)
        for _ in range(3):
            strategy_error_or_result(q, model, x, strategy, expect, batched=True)


# 9. ------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("strategy", ALL)
@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_checkpoint_inside_forward(reentrant: bool, strategy: str) -> None:
    """``torch.utils.checkpoint`` in forward: the derivatives of the same model without
    it. Non-reentrant: ``auto`` is right, an explicit strategy is right or names one that
    is. Reentrant (incompatible with ``torch.autograd.grad``): right, or a HesseError."""
    model = Checkpointed(reentrant).eval()
    x = seeded_randn(B, D, seed=39)
    for q in ("hessian", "laplacian"):
        expect = want(q, Checkpointed(reentrant, use=False).eval(), x)
        for _ in range(5 if strategy == "auto" else 2):
            if reentrant:
                try:
                    got = call(q, model, x, strategy, batched=True)
                except hesse.HesseError:
                    continue
                close(got, expect, f"{q} through reentrant checkpoint")
            elif strategy == "auto":
                close(call(q, model, x, strategy, batched=True), expect, q)
            else:
                strategy_error_or_result(q, model, x, strategy, expect, batched=True)


ATTENTION = {"encoder_layer": encoder_layer, "multihead_attention": SelfAttention}


def _math_reference(quantity: str, model, x: torch.Tensor, output) -> torch.Tensor:
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            return want(quantity, model, x, output=output)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


@pytest.mark.parametrize("strategy", ALL)
@pytest.mark.parametrize("kind", list(ATTENTION))
def test_attention_in_eval_mode(kind: str, strategy: str) -> None:
    """TransformerEncoderLayer and MultiheadAttention in eval mode (fused kernels without
    double backward): the math backend's derivatives; the user's fast-path and SDPA
    switches are unchanged afterwards. An explicit strategy may name one that runs."""
    model = ATTENTION[kind]().eval()
    x = seeded_randn(2, 3, 4, seed=40)
    output = [0, 5, 11]
    settings = attention_settings()
    for q in ("hessian", "laplacian"):
        expect = _math_reference(q, model, x, output)
        assert attention_settings() == settings
        for _ in range(4 if strategy == "auto" else 1):
            if strategy == "auto":
                close(call(q, model, x, "auto", batched=True, output=output), expect, q)
            else:
                strategy_error_or_result(q, model, x, strategy, expect, batched=True, output=output)
            assert attention_settings() == settings, "hesse changed the global switches"


@pytest.mark.parametrize("strategy", ALL)
def test_attention_settings_of_the_caller_respected(strategy: str) -> None:
    """A caller who turned the fast path off and chose the math backend keeps both,
    during and after the call."""
    model = SelfAttention().eval()
    x = seeded_randn(2, 3, 4, seed=41)
    expect = _math_reference("hessian", model, x, [1])
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            inside = attention_settings()
            if strategy == "auto":
                close(call("hessian", model, x, "auto", batched=True, output=[1]), expect, "H")
            else:
                strategy_error_or_result(
                    "hessian", model, x, strategy, expect, batched=True, output=[1]
                )
            assert attention_settings() == inside
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
