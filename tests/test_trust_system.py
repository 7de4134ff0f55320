"""Adversarial suite of issue 9, part 3: odd inputs and options, and threads.

Category 10: ``torch.inference_mode``, empty batches and selections, meta tensors, odd
budgets. Each gives the right result or a typed HesseError; the expected outcome is written
next to each case (never RuntimeError, ZeroDivisionError or OverflowError).
Category 11: concurrent calls from several threads give what serial calls give.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import hesse
from trust_cases import ALL, B, D, Net, call, close, closure_fn, mlp, seeded_randn, want

QUANTITIES = ("jacobian", "hessian", "laplacian")
OUT = 2  # outputs per sample of mlp()


def _shape(quantity: str, lead: tuple[int, ...], q: tuple[int, ...]) -> tuple[int, ...]:
    s = (D,)
    return {"jacobian": lead + q + s, "hessian": lead + q + s + s, "laplacian": lead + q}[quantity]


# 10. -----------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ALL)
@pytest.mark.parametrize("quantity", QUANTITIES)
def test_inference_mode_around_the_call(quantity: str, strategy: str) -> None:
    """Expected: the right result (hesse turns inference mode off in its own scope)."""
    model, x = mlp(), seeded_randn(B, D, seed=50)
    expect = want(quantity, model, x)
    with torch.inference_mode():
        got = call(quantity, model, x, strategy, batched=True)
        assert torch.is_inference_mode_enabled()
    close(got, expect, f"{quantity} under inference_mode")


@pytest.mark.parametrize("strategy", ALL)
@pytest.mark.parametrize("quantity", QUANTITIES)
def test_inference_tensor_as_input(quantity: str, strategy: str) -> None:
    """``x`` made under inference_mode, the call outside it. Expected: the right result."""
    model = mlp()
    with torch.inference_mode():
        x = seeded_randn(B, D, seed=51)
    expect = want(quantity, model, x.clone())
    close(call(quantity, model, x, strategy, batched=True), expect, f"{quantity}, inference x")


@pytest.mark.parametrize("strategy", ALL)
@pytest.mark.parametrize("quantity", QUANTITIES)
def test_empty_batch(quantity: str, strategy: str) -> None:
    """``B=0`` with batched=True. Expected: an empty result of the documented shape
    ``(0, *Q, *S...)``; UnsupportedInputError is accepted too."""
    try:
        got = call(quantity, mlp(), torch.empty(0, D), strategy, batched=True)
    except hesse.UnsupportedInputError:
        return
    assert tuple(got.shape) == _shape(quantity, (0,), (OUT,))


@pytest.mark.parametrize("strategy", ALL)
@pytest.mark.parametrize("quantity", QUANTITIES)
def test_empty_output_selection(quantity: str, strategy: str) -> None:
    """``output=[]``. Expected: an empty result with ``Q=(0,)``; OutputSelectionError is
    accepted too."""
    x = seeded_randn(B, D, seed=52)
    try:
        got = call(quantity, mlp(), x, strategy, batched=True, output=[])
    except hesse.OutputSelectionError:
        return
    assert tuple(got.shape) == _shape(quantity, (B,), (0,))


@pytest.mark.parametrize("strategy", ALL)
@pytest.mark.parametrize("quantity", QUANTITIES)
def test_meta_input_with_cpu_model(quantity: str, strategy: str) -> None:
    """A meta ``x`` and a CPU model. Expected: DeviceMismatchError (any HesseError)."""
    with pytest.raises(hesse.HesseError):
        call(quantity, mlp(), torch.empty(B, D, device="meta"), strategy, batched=True)


@pytest.mark.parametrize("strategy", ALL)
@pytest.mark.parametrize("quantity", QUANTITIES)
def test_meta_input_with_meta_model(quantity: str, strategy: str) -> None:
    """Model and ``x`` on the meta device. Expected: a meta result of the right shape (no
    values to compute), or a typed HesseError."""
    model = mlp().to("meta")
    try:
        got = call(quantity, model, torch.empty(B, D, device="meta"), strategy, batched=True)
    except hesse.HesseError:
        return
    assert got.device.type == "meta" and tuple(got.shape) == _shape(quantity, (B,), (OUT,))


# value -> what is expected: "result", or the HesseError classes accepted
BUDGETS = {
    "inf": (float("inf"), "result"),
    "1e30": (1e30, "result"),
    "half_a_byte": (0.5, (hesse.MemoryBudgetError, hesse.UnsupportedInputError)),
    "zero": (0, (hesse.MemoryBudgetError, hesse.UnsupportedInputError)),
    "100_bytes": (100, hesse.MemoryBudgetError),
    "minus_one": (-1, hesse.UnsupportedInputError),
    "nan": (math.nan, hesse.UnsupportedInputError),
    "abc": ("abc", hesse.UnsupportedInputError),
    "minus_5MB": ("-5MB", hesse.UnsupportedInputError),
    "list": ([1], hesse.UnsupportedInputError),
}


@pytest.mark.parametrize("strategy", ALL)
@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize("budget", list(BUDGETS))
def test_odd_budgets(budget: str, quantity: str, strategy: str) -> None:
    """``max_memory`` of inf (no limit: the result), a fraction of a byte, 0, -1, NaN,
    garbage: the result or the typed error given in BUDGETS."""
    value, expect = BUDGETS[budget]
    model, x = mlp(), seeded_randn(B, D, seed=53)
    if expect == "result":
        got = call(quantity, model, x, strategy, batched=True, max_memory=value)
        close(got, want(quantity, model, x), f"{quantity}, max_memory={value!r}")
    else:
        with pytest.raises(expect):
            call(quantity, model, x, strategy, batched=True, max_memory=value)


@pytest.mark.parametrize("strategy", ALL)
@pytest.mark.parametrize("chunk_size", [0, -1, 2.5])
def test_bad_chunk_size(chunk_size, strategy: str) -> None:
    """A chunk size that is not a positive int. Expected: UnsupportedInputError."""
    with pytest.raises(hesse.UnsupportedInputError):
        call("hessian", mlp(), seeded_randn(B, D, seed=54), strategy, chunk_size=chunk_size)


# 11. -----------------------------------------------------------------------------------

THREADS, PER_THREAD = 4, 6
SERIAL_QUANTITIES = ("hessian", "laplacian", "hessian_diag", "jacobian")


def _own_models() -> list:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12)
        deep = nn.Sequential(
            nn.Linear(D, 6), nn.Softplus(), nn.Linear(6, 6), nn.Sigmoid(), nn.Linear(6, 2)
        )
    return [mlp(out=3, seed=0), Net().eval(), deep, closure_fn()[0]]


@pytest.mark.parametrize("strategy", [*ALL, "mixed"])
@pytest.mark.parametrize("shared", [True, False], ids=["same_model", "own_models"])
def test_threads_match_serial(shared: bool, strategy: str) -> None:
    """4 threads x 6 calls, started together, on one model or one model each, with
    quantities, outputs and batch sizes (and strategies, for "mixed") varying per call:
    every result equals its serial reference."""
    models = [mlp(out=3)] * THREADS if shared else _own_models()
    plan = {}  # (thread, call) -> (quantity, strategy, x, output)
    for t in range(THREADS):
        for j in range(PER_THREAD):
            mixed = ALL[(t + j) % len(ALL)]
            x = seeded_randn(2 + t, D, seed=60 + t)
            q = SERIAL_QUANTITIES[(t + j) % len(SERIAL_QUANTITIES)]
            plan[t, j] = (q, mixed if strategy == "mixed" else strategy, x, [None, 0][j % 2])
    refs = {k: want(q, models[k[0]], x, output=o) for k, (q, _, x, o) in plan.items()}
    barrier = threading.Barrier(THREADS)

    def work(t: int) -> list[torch.Tensor]:
        barrier.wait()
        out = []
        for j in range(PER_THREAD):
            q, s, x, o = plan[t, j]
            out.append(getattr(hesse, q)(models[t], x, batched=True, output=o, strategy=s))
        return out

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        results = list(pool.map(work, range(THREADS)))
    for t in range(THREADS):
        for j in range(PER_THREAD):
            q, s, _, o = plan[t, j]
            close(results[t][j], refs[t, j], f"thread {t} call {j}: {q}, {s}, output={o}")
