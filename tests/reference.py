"""Slow, obvious float64 references for the quantities hesse computes.

Nothing here imports hesse. Every reference works one sample and one selected output at a
time on a plain scalar function, so that batching, output selection, flattening and
chunking (what hesse optimises) play no part in it:

- :func:`reference`: ``torch.autograd.functional.jacobian`` / ``hessian`` (the main oracle);
- :func:`func_reference`: nested ``torch.func`` (``jacfwd(jacrev)``), a different AD path;
- :func:`grad_loop_hessian`: a loop of ``torch.autograd.grad`` Hessian rows;
- :func:`fd_hessian`: central finite differences (eps 1e-6) of the AD gradient, an
  independent numerical check (float64 only);
- :func:`assert_close`: ``allclose`` that prints the worst mismatching entries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call, jacfwd, jacrev

QUANTITIES = ("jacobian", "hessian", "hessian_diag", "laplacian", "hvp", "derivatives")
SECOND_ORDER = ("hessian", "hessian_diag", "laplacian", "hvp", "derivatives")


# --------------------------------------------------------------------------------------
# Output selection, written independently of hesse from the contract's notation section
# --------------------------------------------------------------------------------------


def select_flat(output: Any, out_shape: tuple[int, ...]) -> tuple[list[int], tuple[int, ...]]:
    """Flat indices into the per-sample output and the selected shape ``Q``."""
    size = math.prod(out_shape)
    if output is None:
        return list(range(size)), tuple(out_shape)
    if isinstance(output, int):
        return [output], ()
    if isinstance(output, tuple):
        flat = 0
        for i, dim in zip(output, out_shape, strict=True):
            flat = flat * dim + i
        return [flat], ()
    if isinstance(output, slice):
        idx = list(range(size))[output]
        return idx, (len(idx),)
    if isinstance(output, torch.Tensor):
        idx = [int(i) for i in output.tolist()]
        return idx, (len(idx),)
    idx = [int(i) for i in output]
    return idx, (len(idx),)


def per_sample(f: Callable, batched: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f`` on one sample: a batched ``f`` is called on a batch of one."""
    if batched:
        return lambda z: f(z.unsqueeze(0))[0]
    return f


@dataclass
class Ref:
    """Per-sample value, Jacobian and Hessian of the selected outputs.

    Shapes (``batched`` prepends ``B``): value ``Q``, jacobian ``Q + S``, hessian
    ``Q + S + S``.
    """

    value: torch.Tensor
    jacobian: torch.Tensor
    hessian: torch.Tensor
    q: tuple[int, ...]
    s: tuple[int, ...]
    batched: bool

    @property
    def lead(self) -> tuple[int, ...]:
        return tuple(self.value.shape[:1]) if self.batched else ()

    @property
    def m(self) -> int:
        return math.prod(self.q)

    @property
    def n(self) -> int:
        return math.prod(self.s)


def _samples(x: torch.Tensor, batched: bool) -> list[torch.Tensor]:
    x = x.detach().clone()
    return list(x) if batched else [x]


def _assemble(
    values: list[torch.Tensor],
    jacs: list[torch.Tensor],
    hessians: list[torch.Tensor],
    q: tuple[int, ...],
    s: tuple[int, ...],
    batched: bool,
) -> Ref:
    def stack(parts: list[torch.Tensor], tail: tuple[int, ...]) -> torch.Tensor:
        parts = [p.reshape(q + tail) for p in parts]
        return torch.stack(parts) if batched else parts[0]

    return Ref(
        value=stack(values, ()),
        jacobian=stack(jacs, s),
        hessian=stack(hessians, s + s),
        q=q,
        s=s,
        batched=batched,
    )


def _setup(f: Callable, x: torch.Tensor, batched: bool, output: Any):
    g1 = per_sample(f, batched)
    samples = _samples(x, batched)
    s = tuple(samples[0].shape)
    with torch.no_grad():
        out_shape = tuple(g1(samples[0]).shape)
    idx, q = select_flat(output, out_shape)
    index = torch.tensor(idx, dtype=torch.long)

    def g(z: torch.Tensor) -> torch.Tensor:  # one sample -> selected outputs, shape (m,)
        return g1(z).reshape(-1)[index]

    return g, samples, s, q, len(idx)


def reference(f: Callable, x: torch.Tensor, batched: bool = False, output: Any = None) -> Ref:
    """The main oracle: ``torch.autograd.functional`` per sample and per selected output."""
    g, samples, s, q, m = _setup(f, x, batched, output)
    values, jacs, hessians = [], [], []
    for xs in samples:
        with torch.no_grad():
            values.append(g(xs).detach())
        jacs.append(torch.autograd.functional.jacobian(g, xs))
        hessians.append(
            torch.stack(
                [torch.autograd.functional.hessian(lambda z, k=k: g(z)[k], xs) for k in range(m)]
            )
        )
    return _assemble(values, jacs, hessians, q, s, batched)


def func_reference(f: Callable, x: torch.Tensor, batched: bool = False, output: Any = None) -> Ref:
    """Second AD path: ``torch.func.jacrev`` and ``jacfwd(jacrev)`` (vmap-able models only)."""
    g, samples, s, q, m = _setup(f, x, batched, output)
    values, jacs, hessians = [], [], []
    for xs in samples:
        with torch.no_grad():
            values.append(g(xs).detach())
        jacs.append(jacrev(g)(xs).detach())
        hessians.append(
            torch.stack([jacfwd(jacrev(lambda z, k=k: g(z)[k]))(xs) for k in range(m)]).detach()
        )
    return _assemble(values, jacs, hessians, q, s, batched)


def _grad(y: torch.Tensor, z: torch.Tensor, create_graph: bool) -> torch.Tensor:
    if not y.requires_grad:
        return torch.zeros_like(z)
    (gz,) = torch.autograd.grad(
        y, z, create_graph=create_graph, retain_graph=True, allow_unused=True
    )
    return torch.zeros_like(z) if gz is None else gz


def grad_loop_hessian(
    f: Callable, x: torch.Tensor, batched: bool = False, output: Any = None
) -> torch.Tensor:
    """Third path: a Python loop of ``torch.autograd.grad`` over Hessian rows."""
    g, samples, s, q, m = _setup(f, x, batched, output)
    n = math.prod(s)
    hessians = []
    for xs in samples:
        blocks = []
        for k in range(m):
            z = xs.clone().requires_grad_(True)
            with torch.enable_grad():
                grad = _grad(g(z)[k], z, create_graph=True).reshape(-1)
                rows = [_grad(grad[j], z, create_graph=False).reshape(-1) for j in range(n)]
            blocks.append(torch.stack(rows))
        hessians.append(torch.stack(blocks))
    out = [h.reshape(q + s + s) for h in hessians]
    return torch.stack(out) if batched else out[0]


def fd_hessian(
    f: Callable, x: torch.Tensor, batched: bool = False, output: Any = None, eps: float = 1e-6
) -> torch.Tensor:
    """Central finite differences of the AD gradient (gradgradcheck-style), float64 only."""
    if x.dtype != torch.float64:
        raise ValueError("finite differences are only meaningful in float64")
    g, samples, s, q, m = _setup(f, x, batched, output)
    n = math.prod(s)

    def gradient(z: torch.Tensor, k: int) -> torch.Tensor:
        z = z.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            return _grad(g(z)[k], z, create_graph=False).reshape(-1)

    hessians = []
    for xs in samples:
        blocks = []
        for k in range(m):
            cols = []
            for j in range(n):
                e = torch.zeros(n, dtype=xs.dtype).reshape(s)
                e.reshape(-1)[j] = eps
                cols.append((gradient(xs + e, k) - gradient(xs - e, k)) / (2 * eps))
            blocks.append(torch.stack(cols, dim=1))
        hessians.append(torch.stack(blocks))
    out = [h.reshape(q + s + s) for h in hessians]
    return torch.stack(out) if batched else out[0]


def third_derivative_of_sum(
    f: Callable, x: torch.Tensor, batched: bool = False, output: Any = None
) -> torch.Tensor:
    """``d/dx sum(H(x))`` (summed over selected outputs and samples), by ``torch.func``."""
    g, samples, _, _, m = _setup(f, x, batched, output)

    def total(z: torch.Tensor) -> torch.Tensor:
        return sum(jacfwd(jacrev(lambda w, k=k: g(w)[k]))(z).sum() for k in range(m))

    grads = [jacrev(total)(xs).detach() for xs in samples]
    return torch.stack(grads) if batched else grads[0]


def param_grad_of_hessian_sum(
    model: torch.nn.Module, x: torch.Tensor, batched: bool = False, output: Any = None
) -> dict[str, torch.Tensor]:
    """Gradient of ``sum(H)`` with respect to the model's parameters, by ``torch.func``."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    samples = _samples(x, batched)

    def total(p: dict[str, torch.Tensor]) -> torch.Tensor:
        def f(z: torch.Tensor) -> torch.Tensor:
            return functional_call(model, p, (z,))

        g, _, _, _, m = _setup(f, x, batched, output)
        return sum(
            jacfwd(jacrev(lambda w, k=k: g(w)[k]))(xs).sum() for xs in samples for k in range(m)
        )

    return {k: v.detach() for k, v in jacrev(total)(params).items()}


# --------------------------------------------------------------------------------------
# From a Ref to what each public call returns (the contract's shape table)
# --------------------------------------------------------------------------------------


def _q_flat(q: tuple[int, ...], m: int) -> tuple[int, ...]:
    return () if q == () else (m,)


def expected_shape(quantity: str, ref: Ref, flat: bool) -> Any:
    """The shape the contract's table gives (a tuple of shapes for ``derivatives``)."""
    q, s, m, n, lead = ref.q, ref.s, ref.m, ref.n, ref.lead
    if flat:
        vec = lead + _q_flat(q, m) + (n,)
        shapes = {
            "jacobian": vec,
            "hessian": lead + _q_flat(q, m) + (n, n),
            "hessian_diag": vec,
            "laplacian": lead + _q_flat(q, m),
            "hvp": vec,
        }
        value = lead + _q_flat(q, m)
    else:
        shapes = {
            "jacobian": lead + q + s,
            "hessian": lead + q + s + s,
            "hessian_diag": lead + q + s,
            "laplacian": lead + q,
            "hvp": lead + q + s,
        }
        value = lead + q
    if quantity == "derivatives":
        return (value, shapes["jacobian"], shapes["hessian"])
    return shapes[quantity]


def expected(quantity: str, ref: Ref, flat: bool = False, v: torch.Tensor | None = None) -> Any:
    """The expected result of ``hesse.<quantity>`` computed from a :class:`Ref`."""
    lead, m, n = ref.lead, ref.m, ref.n
    h = ref.hessian.reshape((*lead, m, n, n))
    if quantity == "jacobian":
        full = ref.jacobian
    elif quantity == "hessian":
        full = ref.hessian
    elif quantity == "hessian_diag":
        full = torch.diagonal(h, dim1=-2, dim2=-1)
    elif quantity == "laplacian":
        full = torch.diagonal(h, dim1=-2, dim2=-1).sum(-1)
    elif quantity == "hvp":
        if v is None:
            raise ValueError("hvp needs v")
        vv = v.reshape((*lead, 1, n, 1)).to(h.dtype)
        full = (h @ vv)[..., 0]
    elif quantity == "derivatives":
        shapes = expected_shape(quantity, ref, flat)
        parts = (ref.value, ref.jacobian, ref.hessian)
        return tuple(p.reshape(sh) for p, sh in zip(parts, shapes, strict=True))
    else:
        raise ValueError(quantity)
    return full.reshape(expected_shape(quantity, ref, flat))


# --------------------------------------------------------------------------------------
# Comparison with a readable report
# --------------------------------------------------------------------------------------


def tolerances(dtype: torch.dtype, ref: torch.Tensor) -> tuple[float, float]:
    """``(rtol, atol)``: reliability.md section 1.8, atol scaled by ``max(1, max|ref|)``."""
    scale = max(1.0, float(ref.detach().abs().max())) if ref.numel() else 1.0
    if dtype == torch.float64:
        return 1e-7, 1e-10 * scale
    return 1e-4, 1e-4 * scale


def assert_close(
    actual: Any,
    expect: torch.Tensor,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    name: str = "result",
    check_dtype: torch.dtype | None = None,
    worst: int = 6,
) -> None:
    """``allclose`` with shape/dtype checks and a report of the worst entries on failure."""
    assert isinstance(actual, torch.Tensor), f"{name}: expected a tensor, got {type(actual)}"
    assert tuple(actual.shape) == tuple(expect.shape), (
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expect.shape)}"
    )
    if check_dtype is not None:
        assert actual.dtype == check_dtype, f"{name}: dtype {actual.dtype} != {check_dtype}"
    if rtol is None or atol is None:
        d_rtol, d_atol = tolerances(actual.dtype, expect)
        rtol = d_rtol if rtol is None else rtol
        atol = d_atol if atol is None else atol
    a = actual.detach().to("cpu", torch.float64)
    e = expect.detach().to("cpu", torch.float64)
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    bad = ~(err <= bound)  # NaN counts as bad
    if not bool(bad.any()):
        return
    excess = torch.where(bad, torch.nan_to_num(err - bound, nan=float("inf")), -1.0)
    order = excess.reshape(-1).argsort(descending=True)[:worst]
    max_err = float(err.nan_to_num(float("inf")).max())
    lines = [
        f"{name}: {int(bad.sum())} of {bad.numel()} entries differ "
        f"(rtol={rtol:.1e}, atol={atol:.1e}); max abs err {max_err:.3e}, "
        f"max|expected| {float(e.abs().max()):.3e}. Worst entries:"
    ]
    for flat in order.tolist():
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), e.shape))
        got, want, diff = (float(t.reshape(-1)[flat]) for t in (a, e, err))
        lines.append(f"  {index}: actual {got:+.10e}  expected {want:+.10e}  |diff| {diff:.3e}")
    raise AssertionError("\n".join(lines))


def assert_symmetric(h: torch.Tensor, n: int, *, name: str = "hessian") -> None:
    """Hessian blocks ``(..., n, n)`` are symmetric up to ``c * eps * max|H| * n``."""
    blocks = h.detach().reshape(-1, n, n).to(torch.float64)
    eps = torch.finfo(h.dtype).eps
    tol = 10 * eps * max(1.0, float(blocks.abs().max())) * n
    assert_close(blocks, blocks.transpose(-1, -2), rtol=0.0, atol=tol, name=f"{name} - {name}^T")
