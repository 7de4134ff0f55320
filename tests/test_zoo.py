"""The model zoo (``tests/zoo.py``) under ``strategy="auto"``, against torch.func in float64.

Every architecture, single and batched, over 10 calls in a row (tuning times candidates
and switches strategies during the first calls, so every strategy it tries is checked),
with no :class:`hesse.FallbackWarning` after the first call.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian, jacrev

import hesse
from zoo import ATOMS, ZOO, Bound, ZooCase, math_attention

CALLS = 10
BATCH = 2


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread (two threads on a busy machine cost 10-40x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
            got = getattr(hesse, quantity)(
                model, x, batched=batched, output=case.output, flat=True, args=case.extra_args()
            )
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


def relu_maxpool_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    ).eval()


SECOND_ORDER = {  # quantity: (output=, shape of the result)
    "hessian": (3, (3072, 3072)),
    "hessian_diag": ([1, 3], (2, 1, 3, 32, 32)),
    "laplacian": (None, (1, 10)),
    "hvp": (3, (1, 3, 32, 32)),
}


@pytest.mark.parametrize("quantity", list(SECOND_ORDER))
def test_piecewise_linear_model_gives_zeros_without_work(quantity, monkeypatch) -> None:
    """ReLU + max-pool on 3x32x32: exact zeros at once, the warning naming the ops."""
    import hesse.front

    def no_strategy(*args, **kwargs):
        raise AssertionError("a strategy ran for a piecewise-linear model")

    monkeypatch.setattr(hesse.front, "execute", no_strategy)
    model, x = relu_maxpool_cnn(), torch.randn(1, 3, 32, 32)
    output, shape = SECOND_ORDER[quantity]
    extra = (torch.ones_like(x),) if quantity == "hvp" else ()
    with pytest.warns(hesse.PiecewiseLinearWarning, match=r"max_pool2d, relu"):
        got = getattr(hesse, quantity)(model, x, *extra, output=output, flat=quantity == "hessian")
    assert got.shape == shape and not got.any()
    plan = hesse.plan(model, x, quantity, output=output)
    assert plan.strategy == "zeros" and "piecewise linear (max_pool2d, relu)" in str(plan)
    assert plan.ran == "zeros"


def test_piecewise_detection_is_conservative() -> None:
    """Curvature anywhere (a product of branches, a smooth op, a squared ReLU) runs."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 4)
    models = {
        "product": lambda z: (torch.relu(lin(z)) * lin(z)).sum(-1),
        "smooth": lambda z: torch.tanh(torch.relu(lin(z))).sum(-1),
        "square": lambda z: (torch.relu(lin(z)) ** 2).sum(-1),
    }
    x = torch.randn(2, 3)
    for name, f in models.items():
        one = lambda t, f=f: f(t[None])[0]  # noqa: E731
        want = torch.stack([hessian(one)(xi) for xi in x]).detach()
        assert want.abs().max() > 1e-3, name
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = hesse.hessian(f, x, batched=True)
            assert hesse.plan(f, x, batched=True).strategy != "zeros"
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


def test_first_order_of_piecewise_models_still_runs() -> None:
    model, x = relu_maxpool_cnn(), torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jac = hesse.jacobian(model, x, output=3)
    assert jac.shape == x.shape and jac.abs().max() > 0
    assert hesse.plan(model, x, "jacobian", output=3).strategy != "zeros"


def test_extra_arguments_are_read_live_and_not_differentiated() -> None:
    """``args``/``kwargs``: new species values each call, kwargs, plans; closure reference."""
    case = ZOO["pair_potential"]
    model, x = case.model(), case.input(BATCH)
    species, pairs = case.extra_args()

    def closure_reference(kinds: torch.Tensor) -> torch.Tensor:
        f = Bound(model, kinds, pairs)
        one = lambda z: f(z.reshape(case.shape))  # noqa: E731
        return torch.stack([hessian(one)(xi.reshape(-1)) for xi in x]).detach()

    for call in range(4):
        kinds = species if call < 2 else species.flip(0)
        want = closure_reference(kinds)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = hesse.hessian(
                model, x, batched=True, flat=True, args=(kinds,), kwargs={"pairs": pairs}
            )
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"call {call + 1}")
    species.copy_(species.flip(0))  # in place: read at the next call
    want = closure_reference(species)
    plan = hesse.plan(model, x, "laplacian", batched=True, args=(species, pairs))
    lap = plan(x)
    torch.testing.assert_close(lap, want.diagonal(dim1=-2, dim2=-1).sum(-1))
    one = hesse.hessian(model, x[0], args=(species, pairs), flat=True)
    torch.testing.assert_close(one, want[0], rtol=1e-10, atol=1e-12)
    v = torch.ones_like(x)
    hv = hesse.hvp(model, x, v, batched=True, args=(species,), kwargs={"pairs": pairs})
    want_hv = torch.einsum("bij,bj->bi", want, v.reshape(BATCH, -1))
    torch.testing.assert_close(hv.reshape(BATCH, -1), want_hv)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("bad", [{"args": 3}, {"args": torch.ones(2)}, {"kwargs": [1, 2]}])
def test_extra_arguments_of_the_wrong_type(bad) -> None:
    model, x = ZOO["pair_potential"].model(), torch.randn(ATOMS, 3)
    with pytest.raises(hesse.UnsupportedInputError, match=r"hesse.hessian: expected (args|kw)"):
        hesse.hessian(model, x, **bad)


def test_piecewise_detection_sees_a_weight_that_depends_on_x() -> None:
    """``F.linear`` is linear in its input only: a weight computed from x is curvature."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 4)

    def f(z: torch.Tensor) -> torch.Tensor:
        return F.linear(z[:1], torch.relu(lin(z))[:, None]).sum()

    x = torch.randn(3)
    want = hessian(f)(x).detach()
    assert want.abs().max() > 1e-3
    assert hesse.plan(f, x).strategy != "zeros"
    torch.testing.assert_close(hesse.hessian(f, x), want, rtol=1e-10, atol=1e-12)


class ScriptedParts(nn.Module):
    """Parts compiled with TorchScript (as e3nn's in MACE), so TorchDynamo cannot capture it;
    ``forward`` calls ``x.requires_grad_()`` (as MACE does), which vmap cannot run."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.norm = torch.jit.script(nn.BatchNorm1d(3).eval())
        with torch.no_grad():
            self.norm.running_mean.uniform_(-0.5, 0.5)
            self.norm.running_var.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        x.requires_grad_(True)
        return (torch.tanh(self.norm(self.lin(x)[None])[0]) * scale).sum()


def test_uncaptured_model_with_arguments_warns_once_and_keeps_its_buffers() -> None:
    """Failures are remembered on the caller's model, not on the args= wrapper of one call."""
    model = ScriptedParts()
    x, scale = torch.randn(3), torch.tensor([1.0, -2.0, 0.5])
    mean = model.norm.running_mean
    before = mean.clone()
    want = torch.autograd.functional.hessian(lambda z: model(z, scale), x)
    assert want.abs().max() > 1e-3
    fallbacks = []
    for call in range(4):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = hesse.hessian(model, x, args=(scale,))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"call {call + 1}")
        fallbacks.append(sum(isinstance(w.message, hesse.FallbackWarning) for w in caught))
        assert all(isinstance(w.message, hesse.FallbackWarning) for w in caught)
    assert fallbacks == [1, 0, 0, 0]
    plan = hesse.plan(model, x, args=(scale,))
    assert not plan.captured and "vmap" in dict(plan.failed)
    assert model.norm.running_mean is mean and torch.equal(mean, before)


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_vit_attention_runs_without_any_warning_on_every_call(batched: bool) -> None:
    """No warning on any of 10 calls (the first included): attention runs on vmap/reverse.

    The engine declines ``F.multi_head_attention_forward`` (it returns a tuple), so auto
    never plans it there; named explicitly, the structured strategy says so.
    """
    case = ZOO["vit"]
    model, x = case.model(), case.input(BATCH if batched else None)
    want = reference(case, model, x, batched, "hessian").detach()
    for call, (got, messages) in enumerate(calls(case, model, x, batched, "hessian", CALLS)):
        torch.testing.assert_close(
            got.reshape(want.shape), want, rtol=1e-9, atol=1e-11, msg=f"call {call + 1}"
        )
        assert messages == [], f"call {call + 1}: {messages}"
    plan = hesse.plan(model, x, "hessian", batched=batched, output=case.output, flat=True)
    assert plan.captured and plan.ran in ("vmap", "reverse")
    with pytest.raises(hesse.StrategyError, match=r"multi_head_attention_forward.*returns tuple"):
        hesse.hessian(model, x, batched=batched, output=case.output, strategy="structured")
