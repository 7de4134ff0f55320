"""Models and helpers of the adversarial suite (issue 9, ``test_trust*.py``).

Everything here talks to hesse through its public API only, so that the suite survives
rewrites of the internals. References are the float64 oracles of :mod:`reference`
(``torch.autograd.functional`` per sample and per selected output), computed on the model
as it is at that moment, so a result that comes from a stale capture, a stale probe or a
stale tuning decision fails.

Schedules: ``strategy="auto"`` tunes repeated calls on a module, rotating through its
candidates during the first ~9 calls, so a change is made after call 1 (before any tuning),
after call 5 (mid-rotation) and after call 10 (settled). Explicit strategies change after
call 2.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

import hesse
from reference import expected, reference

STRATEGIES = ("vmap", "reverse", "loop", "structured")
ALL = (*STRATEGIES, "auto")
# (strategy, calls on the unchanged object before the change)
SCHEDULES = [(s, 2) for s in STRATEGIES] + [("auto", 1), ("auto", 5), ("auto", 10)]
SCHEDULE_IDS = [f"{s}-after{k}" for s, k in SCHEDULES]
AFTER = 3  # checked calls after each change (auto may switch strategy between them)
RTOL = 1e-10
D = 3  # per-sample input size of the small models
B = 3  # batch size of the small batched inputs


def schedules(fn: Callable) -> Callable:
    """Parametrises a test over ``(strategy, calls_before)``."""
    return pytest.mark.parametrize(("strategy", "before"), SCHEDULES, ids=SCHEDULE_IDS)(fn)


def seeded_randn(*shape: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.get_default_dtype())


@contextlib.contextmanager
def fallback_allowed(strategy: str) -> Iterator[None]:
    """``auto`` may warn ``FallbackWarning`` (pytest turns warnings into errors)."""
    with warnings.catch_warnings():
        if strategy == "auto":
            warnings.simplefilter("ignore", hesse.FallbackWarning)
        yield


def direction(x: torch.Tensor) -> torch.Tensor:
    """The ``v`` of every ``hvp`` call of the suite (fixed per input shape)."""
    return seeded_randn(*x.shape, seed=99)


def call(quantity: str, f: Callable, x: torch.Tensor, strategy: str, **kw: Any) -> Any:
    """``hesse.<quantity>(f, x, ...)`` (``hvp`` along :func:`direction`)."""
    args = (f, x, direction(x)) if quantity == "hvp" else (f, x)
    with fallback_allowed(strategy):
        return getattr(hesse, quantity)(*args, strategy=strategy, **kw)


def want(quantity: str, f: Callable, x: torch.Tensor, *, batched: bool = True, output=None):
    """The float64 reference of ``hesse.<quantity>(f, x, batched=..., output=...)``."""
    ref = reference(f, x, batched=batched, output=output)
    return expected(quantity, ref, v=direction(x) if quantity == "hvp" else None)


def close(got: Any, expect: Any, name: str) -> None:
    """Float64 agreement: ``|got - expect| <= 1e-10 * (|expect| + max(1, max|expect|))``
    (part by part for the tuple of ``derivatives``)."""
    from reference import assert_close

    if isinstance(expect, tuple):
        assert isinstance(got, tuple) and len(got) == len(expect), f"{name}: {type(got)}"
        for part, g, e in zip(("value", "jacobian", "hessian"), got, expect, strict=True):
            close(g, e, f"{name} ({part})")
        return
    scale = max(1.0, float(expect.abs().max())) if expect.numel() else 1.0
    assert_close(got, expect, rtol=RTOL, atol=RTOL * scale, name=name)


def check_calls(
    f: Callable,
    x: torch.Tensor,
    strategy: str,
    calls: int,
    *,
    quantities: tuple[str, ...] = ("hessian", "laplacian"),
    label: str = "",
    **kw: Any,
) -> None:
    """``calls`` calls of every quantity, each compared with one reference per quantity."""
    kw.setdefault("batched", True)
    refs = {q: want(q, f, x, batched=kw["batched"], output=kw.get("output")) for q in quantities}
    for i in range(calls):
        for q in quantities:
            close(call(q, f, x, strategy, **kw), refs[q], f"{label} call {i + 1}: {q}")


def strategy_error_or_result(
    quantity: str, f: Callable, x: torch.Tensor, strategy: str, expect: torch.Tensor, **kw: Any
) -> str:
    """An explicit strategy gives the right result, or a ``StrategyError`` that names a
    strategy which does give it. Returns ``"ok"`` or the strategy named."""
    try:
        got = call(quantity, f, x, strategy, **kw)
    except hesse.StrategyError as err:
        named = [s for s in STRATEGIES if s != strategy and s in str(err)]
        assert named, f"StrategyError names no other strategy: {err}"
        for other in named:
            try:
                close(call(quantity, f, x, other, **kw), expect, f"{quantity} by {other}")
            except (hesse.HesseError, AssertionError):
                continue
            return other
        raise AssertionError(f"no strategy named in the StrategyError runs: {err}") from err
    close(got, expect, f"{quantity} by {strategy}")
    return "ok"


# --------------------------------------------------------------------------------------
# Small models (d = 3 inputs per sample)
# --------------------------------------------------------------------------------------


def mlp(out: int = 2, seed: int = 0) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, out))


class Net(nn.Module):
    """``out(act(k * lin(x) * scale))`` with a Python attribute, a flag and a buffer."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            self.lin = nn.Linear(D, 8)
            self.out = nn.Linear(8, 2)
        self.register_buffer("scale", torch.ones(8))
        self.k = 1.0
        self.use_sin = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.k * self.lin(x) * self.scale
        h = torch.sin(h) if self.use_sin else torch.tanh(h)
        if self.training:
            h = h * h
        return self.out(h)


_GLOBAL_W = torch.zeros(2, D)  # bound (in the test's dtype) by rebind_global


def global_fn(x: torch.Tensor) -> torch.Tensor:
    """A plain function reading a module global."""
    return torch.tanh(x @ _GLOBAL_W.T) ** 2


def rebind_global(seed: int) -> None:
    global _GLOBAL_W
    _GLOBAL_W = seeded_randn(2, D, seed=seed)


def closure_fn() -> tuple[Callable, Callable[[], None]]:
    """A plain function reading a closure tensor, and a rebinding of that tensor."""
    w = seeded_randn(2, D, seed=3)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x @ w.T) * (x @ w.T)

    def rebind() -> None:
        nonlocal w
        w = seeded_randn(2, D, seed=4)

    return f, rebind


def _set(obj: Any, name: str, value: Any) -> Callable[[], None]:
    return lambda: setattr(obj, name, value)


def _no_grad(fn: Callable[[], Any]) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            fn()

    return run


def model_changes() -> dict[str, Callable[[], tuple[Callable, Callable[[], None]]]]:
    """name -> factory of ``(f, change)``: ``change()`` alters what ``f`` computes."""

    def seq(mutate: Callable[[nn.Sequential], None]) -> Callable:
        def build() -> tuple[Callable, Callable[[], None]]:
            m = mlp()
            return m, lambda: mutate(m)

        return build

    def net(mutate: Callable[[Net], None]) -> Callable:
        def build() -> tuple[Callable, Callable[[], None]]:
            m = Net().eval()
            return m, lambda: mutate(m)

        return build

    def new_linear(i: int, o: int, seed: int) -> nn.Linear:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return nn.Linear(i, o)

    def global_build() -> tuple[Callable, Callable[[], None]]:
        rebind_global(2)
        return global_fn, lambda: rebind_global(5)

    return {
        "swap_submodule": seq(lambda m: m.__setitem__(0, new_linear(D, 8, 10))),
        "swap_activation": seq(lambda m: m.__setitem__(1, nn.Softplus())),
        "widen_output": seq(lambda m: m.__setitem__(2, new_linear(8, 4, 11))),
        "reassign_parameter": net(
            lambda m: setattr(m.lin, "weight", nn.Parameter(seeded_randn(8, D, seed=12)))
        ),
        "reassign_buffer": net(lambda m: setattr(m, "scale", torch.linspace(0.5, 2.0, 8))),
        "python_attribute": net(lambda m: setattr(m, "k", 3.0)),
        "branch_flag": net(lambda m: setattr(m, "use_sin", True)),
        "training_flag": net(lambda m: m.train()),
        "rebound_global": global_build,
        "rebound_closure": closure_fn,
        "inplace_weight": seq(lambda m: _no_grad(lambda: m[0].weight.mul_(2))()),
        "inplace_buffer": net(lambda m: _no_grad(lambda: m.scale.mul_(1.5))()),
        "frozen_parameter": seq(lambda m: m[0].weight.requires_grad_(False)),
    }


def hooks(model: nn.Sequential) -> dict[str, Callable[[], Any]]:
    """name -> registration of a hook that changes what ``model`` computes (returns handle)."""
    return {
        "model_pre_hook": lambda: model.register_forward_pre_hook(lambda m, a: (2 * a[0],)),
        "model_forward_hook": lambda: model.register_forward_hook(lambda m, a, y: y**2),
        "sub_pre_hook": lambda: model[2].register_forward_pre_hook(lambda m, a: (a[0] ** 2,)),
        "sub_forward_hook": lambda: model[0].register_forward_hook(lambda m, a, y: torch.sin(y)),
        "kwargs_pre_hook": lambda: model[1].register_forward_pre_hook(
            lambda m, a, kw: ((3 * a[0],), kw), with_kwargs=True
        ),
    }


def state_of(model: nn.Module) -> dict[str, Any]:
    """Everything a call must leave as it was: buffers, parameters, flags, grads."""
    return {
        "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "requires_grad": {k: v.requires_grad for k, v in model.named_parameters()},
        "grads": {k: v.grad for k, v in model.named_parameters()},
        "training": [m.training for m in model.modules()],
    }


def assert_same_state(before: dict[str, Any], model: nn.Module, label: str) -> None:
    after = state_of(model)
    assert after["training"] == before["training"], f"{label}: training flags changed"
    assert after["requires_grad"] == before["requires_grad"], f"{label}: requires_grad changed"
    assert all(g is None for g in after["grads"].values()), f"{label}: .grad set: {after['grads']}"
    for kind in ("buffers", "params"):
        assert after[kind].keys() == before[kind].keys(), f"{label}: {kind} renamed"
        for k, v in before[kind].items():
            got = after[kind][k]
            assert got.dtype == v.dtype and torch.equal(got, v), (
                f"{label}: {kind[:-1]} {k!r} changed from {v.tolist()} to {got.tolist()}"
            )


def deep(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
