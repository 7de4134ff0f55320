"""Adversarial suite of issue 9, part 1: the same object called again after it changed.

Categories 1-4 of the issue: a model (or function) changed between calls, hooks added and
removed, the caller's state, and ``output=`` varying between calls. Every strategy, and
``auto`` before tuning, mid-rotation and settled (see :mod:`trust_cases`). Each result is
compared in float64 with a reference computed on the object as it is at that moment.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hesse
from trust_cases import (
    AFTER,
    STRATEGIES,
    B,
    D,
    assert_same_state,
    call,
    check_calls,
    close,
    deep,
    hooks,
    mlp,
    model_changes,
    schedules,
    seeded_randn,
    state_of,
    strategy_error_or_result,
    want,
)
from trust_models import (
    STATEFUL,
    CoupledOutput,
    NoGradOutput,
)

CHANGES = model_changes()


# 1. ------------------------------------------------------------------------------------


@schedules
@pytest.mark.parametrize("change", list(CHANGES))
def test_change_between_calls(change: str, strategy: str, before: int) -> None:
    """Swapped or widened layers, reassigned Parameters and buffers, attributes and flags
    read by forward, rebound globals and closures, in-place weight changes: every call
    after the change gives the new model's derivatives."""
    f, mutate = CHANGES[change]()
    x = seeded_randn(B, D, seed=20)
    check_calls(f, x, strategy, before, label=f"{change}, before the change,")
    mutate()
    check_calls(f, x, strategy, AFTER, label=f"{change}, after the change,")


OTHER_QUANTITIES = ("jacobian", "hessian_diag", "hvp", "derivatives")


@schedules
@pytest.mark.parametrize("change", ["swap_submodule", "widen_output", "python_attribute"])
def test_change_between_calls_other_quantities(change: str, strategy: str, before: int) -> None:
    """The same for jacobian, hessian_diag, hvp and derivatives."""
    f, mutate = CHANGES[change]()
    x = seeded_randn(B, D, seed=26)
    check_calls(f, x, strategy, before, quantities=OTHER_QUANTITIES, label=f"{change}, before,")
    mutate()
    check_calls(f, x, strategy, AFTER, quantities=OTHER_QUANTITIES, label=f"{change}, after,")


# 2. ------------------------------------------------------------------------------------


@schedules
@pytest.mark.parametrize("hook", list(hooks(mlp())))
def test_hook_added_then_removed(hook: str, strategy: str, before: int) -> None:
    """Forward hooks and pre-hooks on the model and on submodules, registered after
    earlier calls and removed later: the result follows the model as it is called."""
    model = mlp()
    x = seeded_randn(B, D, seed=21)
    check_calls(model, x, strategy, before, label=f"{hook}: before registering,")
    handle = hooks(model)[hook]()
    try:
        check_calls(model, x, strategy, AFTER, label=f"{hook}: registered,")
    finally:
        handle.remove()
    check_calls(model, x, strategy, AFTER, label=f"{hook}: removed,")


# 3. ------------------------------------------------------------------------------------


@schedules
@pytest.mark.parametrize("x_grad", [False, True], ids=["x", "x_requires_grad"])
@pytest.mark.parametrize("kind", list(STATEFUL))
def test_caller_state_left_alone(kind: str, x_grad: bool, strategy: str, before: int) -> None:
    """A forward that updates a buffer in place (counter, running mean) or a Python int
    counter: the caller's buffers and parameters keep their values and identities, no
    ``.grad`` appears, ``requires_grad`` (one parameter frozen) and ``x`` are unchanged.
    An explicit strategy may decline with a StrategyError naming one that runs."""
    model = STATEFUL[kind]().eval()
    model.lin.bias.requires_grad_(False)
    x = seeded_randn(B, D, seed=22).requires_grad_(x_grad)
    x0 = x.detach().clone()
    refs = {q: want(q, deep(model), x0) for q in ("hessian", "laplacian")}
    state = state_of(model)
    ids = {k: id(t) for k, t in [*model.named_buffers(), *model.named_parameters()]}
    for i in range(before + AFTER):
        for q, expect in refs.items():
            label = f"{kind}, call {i + 1} ({q})"
            if strategy == "auto":
                close(call(q, model, x, strategy, batched=True), expect, label)
            else:
                strategy_error_or_result(q, model, x, strategy, expect, batched=True)
            assert_same_state(state, model, label)
            now = {k: id(t) for k, t in [*model.named_buffers(), *model.named_parameters()]}
            assert now == ids, f"{label}: the caller's tensors were replaced"
            assert x.requires_grad == x_grad and x.grad is None, f"{label}: x changed"
            assert torch.equal(x.detach(), x0), f"{label}: x's values changed"


# 4. ------------------------------------------------------------------------------------

OUTPUTS = [0, 1, None, [2, 0], 0, slice(1, 3), 1, (2,)]


@schedules
def test_output_sequence(strategy: str, before: int) -> None:
    """output=0, then 1, None, a list, a slice, a tuple: each call's answer is its own."""
    model = mlp(out=3)
    x = seeded_randn(B, D, seed=23)
    check_calls(model, x, strategy, before, quantities=("hessian", "hessian_diag"), output=0)
    for output in OUTPUTS:
        check_calls(
            model,
            x,
            strategy,
            1,
            quantities=("hessian", "hessian_diag"),
            output=output,
            label=f"output={output!r}",
        )


@schedules
def test_no_grad_probe_not_shared_between_outputs(strategy: str, before: int) -> None:
    """Output 1 reads a no_grad tensor (forward mode disagrees), output 0 does not. A
    probe made for output=0 must not be reused for output=1: ``auto`` is right on every
    call, an explicit strategy is right or raises a typed error."""
    model = NoGradOutput().eval()
    x = seeded_randn(B, D, seed=24)
    sequence = [0] * before + [1, None, 0, 1, None]
    for i, output in enumerate(sequence):
        expect = want("hessian", model, x, output=output)
        label = f"call {i + 1}, output={output!r}"
        try:
            got = call("hessian", model, x, strategy, batched=True, output=output)
        except (hesse.StrategyMismatchError, hesse.StrategyError):
            assert strategy != "auto", f"{label}: auto must fall back to reverse mode"
            continue
        close(got, expect, label)


@schedules
def test_coupling_probe_not_shared_between_outputs(strategy: str, before: int) -> None:
    """Output 1 mixes samples, output 0 does not: output=1 and None raise
    BatchCouplingError on every call, whatever output= the earlier calls used; output=0
    gives its per-sample result or raises the same error."""
    model = CoupledOutput().eval()
    x = seeded_randn(B, D, seed=25)
    expect0 = want("hessian", model, x, output=0)
    for i, output in enumerate([0] * before + [1, None, 0, 1, 0, None]):
        label = f"call {i + 1}, output={output!r}"
        if output == 0:
            try:
                got = call("hessian", model, x, strategy, batched=True, output=0)
            except hesse.BatchCouplingError:
                continue
            close(got, expect0, label)
        else:
            with pytest.raises(hesse.BatchCouplingError):
                call("hessian", model, x, strategy, batched=True, output=output)


def test_strategies_listed() -> None:
    """The suite covers every registered strategy."""
    assert set(STRATEGIES) <= set(hesse.available_strategies())


def test_lazy_modules_initialise_and_stay_consistent() -> None:
    """A lazy layer's first forward inside hesse initialises it for good (not undone)."""
    model = nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(3)
    got = hesse.hessian(model, x, output=0)
    assert type(model[0]) is nn.Linear and model[0].in_features == 3
    want = torch.autograd.functional.hessian(lambda z: model(z)[0], x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
