"""The model zoo (``tests/zoo.py``) under ``strategy="auto"``, against torch.func in float64.

Every architecture, single and batched, over 10 calls in a row (tuning times candidates
and switches strategies during the first calls, so every strategy it tries is checked),
with no :class:`hesse.FallbackWarning` after the first call.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch.func import hessian, jacrev

import hesse
from zoo import ZOO, ZooCase

CALLS = 10
BATCH = 2


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """The reference runs attention on the math kernels (the fused ones have no jvp)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def reference(case: ZooCase, model, x: torch.Tensor, batched: bool, quantity: str):
    """Per-sample flat references by torch.func on one sample at a time."""
    ref = case.reference_model(model)
    samples = x if batched else x.reshape(1, *case.shape)

    def f(z: torch.Tensor) -> torch.Tensor:
        y = ref(z.reshape(1, *case.shape)).reshape(-1)
        return y if case.output is None else y[case.output]

    transform = hessian if quantity == "hessian" else jacrev
    with math_attention():
        out = torch.stack([transform(f)(z.reshape(-1)) for z in samples])
    return out if batched else out[0]


def calls(case: ZooCase, model, x: torch.Tensor, batched: bool, quantity: str, count: int):
    """``count`` calls of ``auto``; each call's result and the warnings it raised."""
    results = []
    for _ in range(count):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = getattr(hesse, quantity)(model, x, batched=batched, output=case.output, flat=True)
        results.append((got, [w.message for w in caught]))
    return results


def check_warnings(case: ZooCase, call: int, messages: list) -> None:
    allowed: tuple[type, ...] = (hesse.PiecewiseLinearWarning,) if case.piecewise else ()
    if call == 0:
        allowed += (hesse.FallbackWarning,)
    unexpected = [m for m in messages if not isinstance(m, allowed)]
    assert not unexpected, f"call {call + 1}: {unexpected}"


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_hessian_over_repeated_calls(name: str, batched: bool) -> None:
    case = ZOO[name]
    model = case.model()
    x = case.input(BATCH if batched else None)
    want = reference(case, model, x, batched, "hessian").detach()
    if case.piecewise:
        assert float(want.abs().max()) == 0.0  # the case is what it claims
    else:
        assert float(want.abs().max()) > 1e-6
    for call, (got, messages) in enumerate(calls(case, model, x, batched, "hessian", CALLS)):
        torch.testing.assert_close(
            got.reshape(want.shape),
            want,
            rtol=case.rtol,
            atol=case.rtol / 100,
            msg=f"{name}, call {call + 1}",
        )
        check_warnings(case, call, messages)


@pytest.mark.parametrize("name", [n for n, c in ZOO.items() if c.piecewise])
def test_zoo_jacobian_of_piecewise_models(name: str) -> None:
    """Their Hessian is zero; the first derivatives are not, and must be right."""
    case = ZOO[name]
    model, x = case.model(), case.input(BATCH)
    want = reference(case, model, x, True, "jacobian").detach()
    assert float(want.abs().max()) > 1e-3
    for call, (got, messages) in enumerate(calls(case, model, x, True, "jacobian", 3)):
        torch.testing.assert_close(got.reshape(want.shape), want, rtol=1e-9, atol=1e-11)
        check_warnings(case, call, messages)
