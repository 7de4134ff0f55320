"""PyTorch peers: the seed's autograd.grad loops, torch.autograd.functional and torch.func.

Every method computes per-sample Hessians (or, for the Taylor-style peers, second
directional derivatives) and reduces them to the case's quantity with :func:`finish`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.functional as AF
from torch.func import hessian, jacrev, jvp, vmap

from ..cases import Instance
from . import Method, Prepared, Unsupported, register

Tensor = torch.Tensor

REDUCE: dict[str, Callable[[Tensor], Tensor]] = {
    "hessian": lambda h: h,
    "hessian_diag": lambda h: h.diagonal(0, -2, -1),
    "laplacian": lambda h: h.diagonal(0, -2, -1).sum(-1),
}


def finish(inst: Instance, h: Tensor) -> Tensor:
    """Per-sample Hessians in any ``[B] + Q + S + S`` layout -> the case's quantity.

    Args:
        inst: The case instance.
        h: Hessians with ``prod(lead_shape) * n * n`` entries, ordered sample, output,
            input, input.

    Returns:
        The quantity in the common layout, shape ``inst.case.result_shape``.
    """
    n = inst.case.n
    return REDUCE[inst.case.quantity](h.reshape(*inst.case.lead_shape, n, n))


# --------------------------------------------------------------------------------------
# The seed: a jacobian() from a loop of autograd.grad(create_graph=True), applied twice
# --------------------------------------------------------------------------------------


def loop_jacobian(y: Tensor, x: Tensor) -> Tensor:
    """Jacobian ``y.shape + x.shape`` by one ``autograd.grad`` per entry of ``y`` (seed).

    Args:
        y: Output depending on ``x``, any shape.
        x: Input with ``requires_grad``.

    Returns:
        ``dy/dx`` of shape ``y.shape + x.shape``, with its graph (``create_graph=True``).
    """
    flat = y.reshape(-1)
    rows = [
        torch.autograd.grad(flat[i], x, create_graph=True, retain_graph=True)[0]
        for i in range(flat.numel())
    ]
    return torch.stack(rows).reshape(*y.shape, *x.shape)


def _seed_loop(inst: Instance) -> Prepared:
    fs = inst.per_sample()

    def one(xs: Tensor) -> Tensor:
        xs = xs.detach().requires_grad_(True)
        return loop_jacobian(loop_jacobian(fs(xs), xs), xs).detach()

    samples = list(inst.x) if inst.case.batched else [inst.x]
    return lambda: finish(inst, torch.stack([one(xs) for xs in samples]))


def _sum_trick(inst: Instance) -> Prepared:
    """Loop over input dims on the batch-summed gradient (valid for independent samples)."""
    if not inst.case.batched:
        raise Unsupported("the sum trick needs a batch of independent samples")
    b, n = inst.x.shape[0], inst.case.n

    def run() -> Tensor:
        x = inst.x.detach().requires_grad_(True)
        y = inst.batched_outputs(x)  # (B, m)
        blocks = []
        for k in range(y.shape[1]):
            g = torch.autograd.grad(y[:, k].sum(), x, create_graph=True)[0].reshape(b, n)
            rows = [
                torch.autograd.grad(g[:, i].sum(), x, retain_graph=True)[0].reshape(b, n)
                for i in range(n)
            ]
            blocks.append(torch.stack(rows, 1))  # (B, n, n)
        return finish(inst, torch.stack(blocks, 1))

    return run


# --------------------------------------------------------------------------------------
# torch.autograd.functional, one call per sample
# --------------------------------------------------------------------------------------


def _functional(vectorize: bool) -> Callable[[Instance], Prepared]:
    outer = "forward-mode" if vectorize else "reverse-mode"

    def prepare(inst: Instance) -> Prepared:
        fs = inst.per_sample()
        scalar = fs(inst.x[0] if inst.case.batched else inst.x).dim() == 0

        def jac(z: Tensor) -> Tensor:  # as inside AF.hessian: forward-mode needs a leaf
            z = z.requires_grad_(True) if vectorize else z
            return AF.jacobian(fs, z, create_graph=True)

        def one(xs: Tensor) -> Tensor:
            if scalar:
                return AF.hessian(fs, xs, vectorize=vectorize, outer_jacobian_strategy=outer)
            return AF.jacobian(jac, xs, vectorize=vectorize, strategy=outer)

        samples = list(inst.x) if inst.case.batched else [inst.x]
        return lambda: finish(inst, torch.stack([one(xs).detach() for xs in samples]))

    return prepare


# --------------------------------------------------------------------------------------
# torch.func
# --------------------------------------------------------------------------------------


def _func(transform: Callable[[Callable[[Tensor], Tensor]], Callable[[Tensor], Tensor]]):
    def prepare(inst: Instance) -> Prepared:
        h = transform(inst.per_sample())
        if inst.case.batched:
            h = vmap(h)
        return lambda: finish(inst, h(inst.x))

    return prepare


def second_directional(fs: Callable[[Tensor], Tensor], n: int) -> Callable[[Tensor], Tensor]:
    """``S -> (n,) + Q``: ``e_i^T H e_i`` for every unit direction, by jvp of jvp.

    Args:
        fs: Per-sample function ``S -> Q``.
        n: Number of input entries.
    """

    def along(xs: Tensor, e: Tensor) -> Tensor:
        e = e.reshape(xs.shape)
        return jvp(lambda z: jvp(fs, (z,), (e,))[1], (xs,), (e,))[1]

    def run(xs: Tensor) -> Tensor:
        eye = torch.eye(n, dtype=xs.dtype, device=xs.device)
        return vmap(along, in_dims=(None, 0))(xs, eye)

    return run


def _func_jvp_jvp(inst: Instance) -> Prepared:
    if inst.case.quantity == "hessian":
        raise Unsupported("second directional derivatives give the diagonal / Laplacian only")
    d2 = second_directional(inst.per_sample(), inst.case.n)
    if inst.case.batched:
        d2 = vmap(d2)
    reduce = (lambda t: t.sum(-1)) if inst.case.quantity == "laplacian" else (lambda t: t)

    def run() -> Tensor:
        t = d2(inst.x)  # [B] + (n,) + Q
        t = t.movedim(1 if inst.case.batched else 0, -1)  # [B] + Q + (n,)
        return reduce(t.reshape(*inst.case.lead_shape, inst.case.n))

    return run


def reference(inst: Instance) -> Tensor:
    """The reference result: ``torch.func.hessian`` (``vmap`` over samples), reduced.

    Args:
        inst: Case instance (float64 for verification).

    Returns:
        Shape ``inst.case.result_shape``.
    """
    if inst.case.quantity == "laplacian_train":  # torch.func's training step
        from .train_peers import func_step

        return func_step(inst)()
    return _func(hessian)(inst)()


register(
    Method(
        "seed_loop",
        "seed: loop of autograd.grad, applied twice, per sample",
        "seed",
        _seed_loop,
        slow=True,
    )
)
register(
    Method(
        "seed_sum_trick",
        "seed: loop over input dims on the batch-summed gradient",
        "seed",
        _sum_trick,
    )
)
register(
    Method(
        "autograd_functional",
        "torch.autograd.functional.hessian, per sample",
        "torch.autograd",
        _functional(vectorize=False),
        slow=True,
    )
)
register(
    Method(
        "autograd_functional_vec",
        "torch.autograd.functional.hessian(vectorize, forward-mode), per sample",
        "torch.autograd",
        _functional(vectorize=True),
        slow=True,
    )
)
register(
    Method("func_hessian", "torch.func.hessian, vmap over samples", "torch.func", _func(hessian))
)
register(
    Method(
        "func_jacrev2",
        "torch.func jacrev(jacrev), vmap over samples",
        "torch.func",
        _func(lambda f: jacrev(jacrev(f))),
    )
)
register(
    Method(
        "func_jvp_jvp",
        "torch.func jvp of jvp, vmap over directions and samples",
        "torch.func",
        _func_jvp_jvp,
    )
)
