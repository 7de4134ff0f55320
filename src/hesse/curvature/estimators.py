"""Randomized traces, diagonals and Laplacians with standard errors, per sample.

:func:`trace_estimate` and :func:`diag_estimate` work on :func:`hesse.hessian_operator`'s
products (one batched product per step for all samples). :func:`laplacian_estimate` is
for PINN losses: forward mode only, ``v^T H v`` as the second derivative of
``t -> f(x + t v)`` at 0, with no backward pass, so the estimate stays differentiable with
``create_graph=True``: one pass of the structured engine for all directions
(:mod:`._directional`), or ``jvp`` of ``jvp`` where the engine cannot run the model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch.func import jvp, vmap

from ..errors import ConvergenceWarning, StrategyError, UnsupportedInputError
from ..planning.problem import Problem, Selection, build_problem
from ..planning.scope import serialised
from ..reduced import hessian_diag, laplacian
from ._directional import engine_second
from ._stats import Estimate, check_budget
from .lanczos import random_start
from .operator import HessianOperator, scalar_problem
from .randomized import hutch_plus_plus, hutchinson, sample_loop, xtrace

Fn = Callable[[torch.Tensor], torch.Tensor]
BLOCK = 10  # samples per adaptive step, and the least before a tolerance is tested
TRACE_METHODS = ("hutchinson", "hutch++", "xtrace")
DIAG_METHODS = ("hutchinson", "xdiag")


def _finish(
    value: torch.Tensor,
    stderr: torch.Tensor,
    matvecs: torch.Tensor,
    samples: torch.Tensor,
    batched: bool,
    method: str,
) -> Estimate:
    def count(c: torch.Tensor) -> int | torch.Tensor:
        return int(c[0]) if bool((c == c[0]).all()) or not batched else c

    if not batched:
        value, stderr = value[0], stderr[0]
    return Estimate(value, stderr, count(matvecs), count(samples), False, method)


def _exact(problem: Problem, f: Fn, x: torch.Tensor, diag: bool, api: str) -> Estimate:
    """The exact trace or diagonal from hesse's engine (no dearer than the estimate)."""
    output = None if problem.index is None else int(problem.index[0])
    call = hessian_diag if diag else laplacian
    value = call(f, x, output=output, batched=problem.batched, flat=True)
    B = problem.batch
    value = value.reshape(B, *problem.in_shape) if diag else value.reshape(B)
    if not problem.batched:
        value = value[0]
    return Estimate(value, torch.zeros_like(value), problem.n, 0, True, "exact")


def _run(
    api: str, f: Fn, x: torch.Tensor, diag: bool, method: str, methods: tuple[str, ...],
    output: Selection, batched: bool, num_matvecs: int | None, rtol: float | None,
    atol: float | None, max_matvecs: int | None, generator: torch.Generator | None,
) -> Estimate:  # fmt: skip
    if method not in methods:
        raise UnsupportedInputError(f"{api}: expected method in {methods}, got {method!r}.")
    num, rt, at = check_budget(api, num_matvecs, rtol, atol)
    if num is None and rtol is None and atol is None:
        num = 64
    least = {"hutchinson": 2, "hutch++": 6, "xtrace": 4, "xdiag": 4}[method]
    if num is not None and num < least:
        raise UnsupportedInputError(
            f"{api}: method={method!r} needs num_matvecs >= {least}, got {num}."
        )
    problem = scalar_problem(api, f, x, output, batched)
    n, B = problem.n, problem.batch
    if n <= (num if num is not None else BLOCK):
        return _exact(problem, f, x, diag, api)
    cap = n if max_matvecs is None else int(max_matvecs)
    op = HessianOperator(problem, api)
    like = problem.x

    def draw(k: int) -> torch.Tensor:
        return random_start((B, n, k), like.dtype, like.device, generator, rademacher=True)

    args = (num, rt, at, BLOCK, cap, like)
    if method == "hutchinson":
        out = hutchinson(op.apply, draw, diag, *args)
    elif method == "hutch++":
        sketch = num // 3 if num is not None else BLOCK
        out = hutch_plus_plus(op.apply, draw, sketch, *args)
    else:
        out = xtrace(op.apply, draw, diag, *args)
    value, stderr, matvecs, samples, done = out
    if not bool(done.all()):
        if max_matvecs is None:  # n products reached: the exact value costs no more
            return _exact(problem, f, x, diag, api)
        warnings.warn(
            f"{api}: {int((~done).sum())} of {B} samples did not reach rtol={rt:g}/atol={at:g} "
            f"within max_matvecs={max_matvecs}; their estimates carry larger errors "
            "(see .stderr). Raise max_matvecs.",
            ConvergenceWarning,
            stacklevel=3,
        )
    if diag:
        value, stderr = value.reshape(B, *problem.in_shape), stderr.reshape(B, *problem.in_shape)
    return _finish(value, stderr, matvecs, samples, batched, method)


@serialised
def trace_estimate(
    f: Fn,
    x: torch.Tensor,
    *,
    method: str = "hutchinson",
    output: Selection = None,
    batched: bool = False,
    num_matvecs: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_matvecs: int | None = None,
    generator: torch.Generator | None = None,
) -> Estimate:
    """Trace of the input Hessian (the Laplacian) from Hessian-vector products, with an error.

    Methods: ``"hutchinson"`` (mean of ``z^T H z`` over Rademacher ``z``), ``"hutch++"``
    (exact trace on a sketched range plus Hutchinson on the rest, Meyer et al. 2021) and
    ``"xtrace"`` (exchangeable Hutch++, Epperly et al. 2024). Either a fixed budget
    (``num_matvecs``, default 64) or a tolerance: products are added ``10`` at a time until
    ``stderr <= max(atol, rtol * |value|)``, each sample stopping on its own (XTrace
    doubles its test vectors instead). When ``n`` products cost no more than the
    estimate, the exact value of :func:`hesse.laplacian` is returned with ``exact=True``.

    Args:
        f: Function or ``nn.Module`` taking one tensor and returning one tensor.
        x: Input, shape ``S`` (``n`` entries), or ``(B, *S)`` with ``batched=True``.
        method: ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
        output: One scalar output per sample (see :func:`hesse.hessian_operator`).
        batched: The first dimension of ``x`` holds independent samples.
        num_matvecs: Products per sample (>= 2; hutch++ >= 6, xtrace >= 4).
        rtol: Relative tolerance on the standard error.
        atol: Absolute tolerance on the standard error.
        max_matvecs: Cap for the adaptive path (default ``n``, where exact is cheaper).
        generator: Draws the test vectors (reproducible results).

    Returns:
        An :class:`Estimate`: ``value`` and ``stderr`` of shape ``()`` (``(B,)``),
        ``matvecs``, ``samples``, ``exact``, and ``ci(level)``.

    >>> import torch, hesse
    >>> f = lambda x: (torch.arange(1.0, 5.0) * x**2).sum()  # trace(H) = 20
    >>> hesse.trace_estimate(f, torch.ones(4), num_matvecs=8).value  # n <= 8: exact
    tensor(20.)
    """
    return _run(
        "hesse.trace_estimate", f, x, False, method, TRACE_METHODS, output, batched,
        num_matvecs, rtol, atol, max_matvecs, generator,
    )  # fmt: skip


@serialised
def diag_estimate(
    f: Fn,
    x: torch.Tensor,
    *,
    method: str = "hutchinson",
    output: Selection = None,
    batched: bool = False,
    num_matvecs: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_matvecs: int | None = None,
    generator: torch.Generator | None = None,
) -> Estimate:
    """Diagonal of the input Hessian from Hessian-vector products, with entrywise errors.

    Methods: ``"hutchinson"`` (mean of ``z * H z``) and ``"xdiag"`` (Epperly et al. 2024).
    With a tolerance, each sample stops when ``max_i stderr_i <= max(atol, rtol *
    max_i |value_i|)``. Exact (:func:`hesse.hessian_diag`) when that is no dearer.

    Args:
        f: Function or ``nn.Module`` taking one tensor and returning one tensor.
        x: Input, shape ``S`` (``n`` entries), or ``(B, *S)`` with ``batched=True``.
        method: ``"hutchinson"`` or ``"xdiag"``.
        output: One scalar output per sample (see :func:`hesse.hessian_operator`).
        batched: The first dimension of ``x`` holds independent samples.
        num_matvecs: Products per sample (>= 2; xdiag >= 4).
        rtol: Relative tolerance (to the largest entry) on the standard errors.
        atol: Absolute tolerance on the standard errors.
        max_matvecs: Cap for the adaptive path (default ``n``, where exact is cheaper).
        generator: Draws the test vectors (reproducible results).

    Returns:
        An :class:`Estimate` with ``value`` and ``stderr`` of shape ``S`` (``(B, *S)``).
    """
    return _run(
        "hesse.diag_estimate", f, x, True, method, DIAG_METHODS, output, batched,
        num_matvecs, rtol, atol, max_matvecs, generator,
    )  # fmt: skip


def _directions(
    api: str, sigma: torch.Tensor | None, like: torch.Tensor
) -> tuple[int, Callable[[torch.Tensor], torch.Tensor]]:
    """``(r, to_dirs)``: ``r`` random coordinates and their map ``(k, B, r) -> (k, B, n)``."""
    B, n = like.shape
    if sigma is None:
        return n, lambda z: z
    ok = isinstance(sigma, torch.Tensor) and sigma.is_floating_point()
    ok = ok and (sigma.dim() == 2 or (sigma.dim() == 3 and sigma.shape[0] == B))
    if not ok or sigma.shape[-2] != n:
        got = f"shape {tuple(sigma.shape)}" if isinstance(sigma, torch.Tensor) else type(sigma)
        raise UnsupportedInputError(
            f"{api}: expected sigma, the factor S of C = S S^T, of shape (n, r) or (B, n, r) "
            f"with n = {n} and B = {B}, got {got}."
        )
    S = sigma.to(like).expand(B, n, sigma.shape[-1])
    return S.shape[-1], lambda z: torch.einsum("bnr,kbr->kbn", S, z)


def _rng(generator: torch.Generator | None, like: torch.Tensor) -> torch.Generator:
    """The generator the directions are drawn from."""
    if generator is not None:
        return generator
    if like.device.type == "cuda":
        return torch.cuda.default_generators[like.device.index or 0]
    return torch.default_generator


def _blocks(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None):
    """Rademacher ``(k, B, r)`` in one buffer, ``BLOCK`` rows at a time.

    The values of :func:`random_start`'s draws of ``BLOCK`` rows each, without copies.
    """
    where = generator.device if generator is not None else like.device
    z = torch.empty(shape, dtype=like.dtype, device=where)
    for i in range(0, shape[0], BLOCK):
        z[i : i + BLOCK].random_(0, 2, generator=generator)
    return z.mul_(2).sub_(1).to(like.device)


def _hutchinson(
    second: Callable[[torch.Tensor], torch.Tensor], draw: Callable[[int], torch.Tensor],
    problem: Problem, r: int, num: int | None, rtol: float, atol: float,
    generator: torch.Generator | None = None, per_call: int | None = None,
) -> Estimate:  # fmt: skip
    """Mean of ``second(z)`` over ``num`` directions (or to a tolerance), else exact.

    ``per_call``: a fixed budget in calls of ``second`` of up to ``per_call`` directions
    (rounded to ``BLOCK``), drawn ``BLOCK`` at a time as the default's blocks are (the
    same directions).
    """
    B, xf = problem.batch, problem.x

    def exact() -> Estimate:
        eye = torch.eye(r, dtype=xf.dtype, device=xf.device)
        value = second(eye[:, None, :].expand(r, B, r)).sum(1)
        return Estimate(value, torch.zeros_like(value), r, 0, True, "exact")

    if r <= (num if num is not None else BLOCK):
        return exact()
    whole, block = False, BLOCK
    if per_call is not None and num is not None:
        whole, block = True, min(num, max(BLOCK, per_call // BLOCK * BLOCK))

    def sample(k: int) -> torch.Tensor:
        return second(_blocks((k, B, r), xf, generator) if whole else draw(k))

    run = sample_loop(sample, B, (problem.m,), xf, num, rtol, atol, block, r)
    if num is None and not bool(run.done.all()):  # past r directions the exact sum is cheaper
        return exact()
    return Estimate(run.mean, run.stderr, run.matvecs, run.count, False, "hutchinson")


@serialised
def laplacian_estimate(
    f: Fn,
    x: torch.Tensor,
    *,
    batched: bool = False,
    output: Selection = None,
    num_samples: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    sigma: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    create_graph: bool = False,
) -> Estimate:
    """Hutchinson Laplacian (or ``sum_ij C_ij d2u/dx_i dx_j``) by forward mode only.

    Each sample is ``v^T H v``, the second derivative of ``t -> f(x + t v)`` at 0, with
    Rademacher ``v``; with ``sigma`` (``C = S S^T``), ``v = S z``. Where the structured
    engine captures the model, the directions are its tangents and one pass gives every
    ``v^T H v`` (a fixed budget in one pass, up to a memory cap); otherwise
    ``torch.func.jvp`` of ``jvp``, vectorised over directions, on the same draws (the
    same estimate up to rounding). When the ``n`` coordinate directions
    (``r`` columns of ``S``) are no more than the samples asked for, their exact sum is
    returned (``exact=True``), by the same forward-mode code.

    Args:
        f: Function or ``nn.Module`` taking one tensor and returning one tensor.
        x: Input, shape ``S`` (``n`` entries), or ``(B, *S)`` with ``batched=True``.
        batched: The first dimension of ``x`` holds independent samples.
        output: Which outputs (as in :func:`hesse.laplacian`); each gets its estimate.
        num_samples: Directions per sample (default 32), or a tolerance instead:
        rtol: Relative tolerance on the standard error (10 directions per step).
        atol: Absolute tolerance on the standard error.
        sigma: Optional factor ``S`` of ``C = S S^T``, ``(n, r)`` or ``(B, n, r)``.
        generator: Draws the directions (reproducible results).
        create_graph: Keep the graph: the value and its stderr can be differentiated
            (e.g. a PINN loss trained by ``backward()``).

    Returns:
        An :class:`Estimate` with ``value`` and ``stderr`` of shape ``Q`` (``(B, *Q)``).

    >>> import torch, hesse
    >>> u = lambda x: (x**2).sum(-1)  # Laplacian 2 n = 6
    >>> est = hesse.laplacian_estimate(u, torch.ones(4, 3), batched=True, num_samples=3)
    >>> est.value, est.exact
    (tensor([6., 6., 6., 6.]), True)
    """
    api = "hesse.laplacian_estimate"
    num, rt, at = check_budget(api, num_samples, rtol, atol, name="num_samples")
    if num is None and rtol is None and atol is None:
        num = 32
    if not isinstance(create_graph, bool):
        raise UnsupportedInputError(f"{api}: expected create_graph True or False.")
    problem = build_problem(api, f, x, output, batched, keep_graph=create_graph)
    xf, B = problem.x, problem.batch
    r, to_dirs = _directions(api, sigma, xf)

    def by_jvp(z: torch.Tensor) -> torch.Tensor:  # (k, B, r) -> (B, k, m)
        def one(v: torch.Tensor) -> torch.Tensor:
            return jvp(lambda y: jvp(problem.fn, (y,), (v,))[1], (xf,), (v,))[1]

        return vmap(one)(to_dirs(z)).transpose(0, 1)

    def draw(k: int) -> torch.Tensor:
        return random_start((k, B, r), xf.dtype, xf.device, generator, rademacher=True)

    grad_mode = torch.enable_grad() if create_graph else torch.no_grad()
    engine = None if r <= (num or BLOCK) else engine_second(problem, create_graph)
    est = None
    if engine is not None:  # the engine from the directions; any failure: jvp of jvp
        rng = _rng(generator, xf)
        state = rng.get_state()
        on_engine, per_pass = engine
        try:
            with grad_mode:
                est = _hutchinson(
                    lambda z: on_engine(to_dirs(z)), draw, problem, r, num, rt, at, generator,
                    per_pass,
                )  # fmt: skip
        except Exception:
            rng.set_state(state)  # the same draws
    try:
        if est is None:
            with grad_mode:
                est = _hutchinson(by_jvp, draw, problem, r, num, rt, at)
    except UnsupportedInputError:
        raise
    except Exception as exc:
        raise StrategyError(
            f"{api}: forward mode (jvp of jvp) failed on this model ({type(exc).__name__}: "
            f"{str(exc)[:160]}). Use hesse.trace_estimate (reverse mode), or hesse.laplacian."
        ) from exc
    shape = (B, *problem.sel_shape)
    value, stderr = est.value.reshape(shape), est.stderr.reshape(shape)
    if not create_graph:
        value, stderr = value.detach(), stderr.detach()
    counts = [est.matvecs, est.samples]
    for i, c in enumerate(counts):
        if isinstance(c, torch.Tensor):
            counts[i] = int(c[0]) if bool((c == c[0]).all()) or not batched else c
    if not problem.batched:
        value, stderr = value[0], stderr[0]
    return Estimate(value, stderr, counts[0], counts[1], est.exact, est.method)
