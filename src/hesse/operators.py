"""Exact second-order operators per sample, without forming the Hessian.

``second_order_operator`` computes ``L u = sum_ij C_ij d2u/dx_i dx_j (+ b . grad u)`` and
``mixed_partials`` selected entries ``d2u/dx_i dx_j``, both from second directional
derivatives ``s^T H s``: the second derivative of ``t -> u(x + t s)`` at ``t = 0``, by
forward-over-forward AD (``jvp`` of ``jvp``; for one selected output ``jvp`` of the
gradient, which measured about 2x faster), vectorised over the directions and batched over
the samples in one pass. The directions are

- the columns of ``S`` for a factor ``C = S S^T``;
- the eigenvectors of a symmetric ``C = V diag(l) V^T``, weighted by ``l``;
- the unit vectors ``e_i`` and the sums ``e_i + e_j`` for mixed partials (polarisation:
  ``e_i^T H e_j = ((e_i + e_j)^T H (e_i + e_j) - e_i^T H e_i - e_j^T H e_j) / 2``).

The first Taylor coefficient of the drift direction ``b`` gives ``b . grad u`` in the same
pass. Models calling ops whose forward-over-forward AD is wrong (``layer_norm`` and
``batch_norm`` in torch 2.13, pytorch#196700), TorchScript, and models the forward path
cannot run use double backward instead (with a :class:`hesse.FallbackWarning`).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Sequence

import torch
from torch.func import jvp, vjp, vmap

from .errors import FallbackWarning, NonFiniteError, UnsupportedInputError
from .planning.problem import Problem, Selection, build_problem
from .planning.scope import serialised
from .results import check_options, warn_zero

Fn = Callable[[torch.Tensor], torch.Tensor]

# torch functions whose forward-over-forward AD is silently wrong (pytorch#196700).
FWD_FWD_UNSAFE = ("layer_norm", "batch_norm")


# ---- the per-direction kernel (one place, so that it can later run on the structured
# engine's Taylor program) ----


def _directional_derivatives(
    fn: Fn, x: torch.Tensor, dirs: torch.Tensor, *, mode: str = "taylor"
) -> tuple[torch.Tensor, torch.Tensor]:
    """First and second directional derivatives ``J s`` and ``s^T H s`` of every output.

    Args:
        fn: The canonical function ``(B, n) -> (B, m)``, samples independent.
        x: Input, ``(B, n)``.
        dirs: Directions, shared ``(R, n)`` or per sample ``(B, R, n)``.
        mode: ``"taylor"``: ``jvp`` of ``jvp`` (no backward pass; the cost does not grow
            with ``m``). ``"hvp"``: ``jvp`` of the gradient, forward-over-reverse (about 2x
            cheaper for one output). ``"reverse"``: double backward (any model).

    Returns:
        ``(first, second)``, each ``(R, B, m)``: ``d/dt`` and ``d2/dt2`` of
        ``fn(x + t s_r)`` at ``t = 0``. Differentiable when grad mode is on.
    """
    if mode == "reverse":
        return _double_backward(fn, x, dirs)

    def gradient(y: torch.Tensor) -> torch.Tensor:  # (m, B, n), rows of the Jacobian
        out, pull = vjp(fn, y)
        m = out.shape[1]
        if m == 1:
            return pull(torch.ones_like(out))[0][None]
        eye = torch.eye(m, dtype=out.dtype, device=out.device)
        return vmap(lambda e: pull(e.expand_as(out))[0])(eye)

    def one(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = s.expand_as(x)
        if mode == "hvp":
            g, hs = jvp(gradient, (x,), (s,))
            return (g * s).sum(-1).T, (hs * s).sum(-1).T

        def first(y: torch.Tensor) -> torch.Tensor:
            return jvp(fn, (y,), (s,))[1]

        return jvp(first, (x,), (s,))

    return vmap(one, in_dims=1 if dirs.dim() == 3 else 0)(dirs)


def _double_backward(
    fn: Fn, x: torch.Tensor, dirs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_directional_derivatives` by ``H s`` from double backward (any model)."""
    r = dirs.shape[-2]
    s = dirs.transpose(0, 1) if dirs.dim() == 3 else dirs[:, None].expand(r, *x.shape)
    keep = torch.is_grad_enabled()
    with torch.enable_grad():
        xin = x if x.requires_grad else x.detach().requires_grad_(True)
        y = fn(xin)
        firsts, seconds = [], []
        for k in range(y.shape[1]):
            (g,) = torch.autograd.grad(
                y[:, k].sum(), xin, create_graph=True, retain_graph=True, allow_unused=True
            )
            g = torch.zeros_like(x) if g is None else g
            hs = None
            if g.requires_grad:  # all directions in one vectorised backward
                (hs,) = torch.autograd.grad(
                    g, xin, s, is_grads_batched=True, create_graph=keep,
                    retain_graph=True, allow_unused=True,
                )  # fmt: skip
            hs = torch.zeros_like(s) if hs is None else hs
            firsts.append((g * s).sum(-1))
            seconds.append((hs * s).sum(-1))
    return torch.stack(firsts, -1), torch.stack(seconds, -1)


# ---------------------------------------- front ---------------------------------------


def _tensor_arg(
    api: str, name: str, value: object, problem: Problem, shapes: dict[str, tuple[int, ...]]
) -> tuple[torch.Tensor, bool]:
    """Checks an operator tensor's shape; returns it (input dtype, device), per-sample flag."""
    allowed = {k: v for k, v in shapes.items() if problem.batched or k == "shared"}
    spelled = " or ".join(str(v) for v in allowed.values())
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        got = f"dtype {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise UnsupportedInputError(
            f"{api}: expected {name} to be a real floating tensor of shape {spelled}, got "
            f"{got}. Build it with torch.as_tensor(..., dtype=x.dtype)."
        )
    kind = next((k for k, v in allowed.items() if tuple(value.shape) == v), None)
    if kind is None:
        hint = "" if problem.batched else " (per-sample forms need batched=True)"
        raise UnsupportedInputError(
            f"{api}: expected {name} of shape {spelled} for inputs with n={problem.n} entries "
            f"per sample{hint}, got {tuple(value.shape)}. Indices are flat per-sample input "
            "indices; reshape it accordingly."
        )
    if not bool(torch.isfinite(value.detach()).all()):
        raise NonFiniteError(f"{api}: {name} holds NaN/Inf entries; pass finite values.")
    return value.to(device=problem.x.device, dtype=problem.x.dtype), kind == "per_sample"


def _needs_reverse(problem: Problem) -> str | None:
    """Why forward-over-forward cannot be trusted for this model, or None."""
    if problem.scripted:
        return "TorchScript has no forward-mode AD"
    found = sorted(n for n in problem.ops if any(u in n for u in FWD_FWD_UNSAFE))
    if found:
        return (
            f"forward-over-forward AD is silently wrong for {', '.join(found)} in torch "
            f"{torch.__version__.split('+')[0]} (pytorch#196700)"
        )
    return None


def _run(
    problem: Problem, dirs: torch.Tensor, create_graph: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs :func:`_directional_derivatives`, falling back to double backward if needed."""
    x = problem.x if create_graph else problem.x.detach()
    dirs = dirs if create_graph else dirs.detach()
    why = _needs_reverse(problem)
    with torch.enable_grad() if create_graph else torch.no_grad():
        if why is None:
            try:  # one output: forward-over-reverse is cheaper (measured about 2x)
                mode = "hvp" if problem.m == 1 else "taylor"
                return _directional_derivatives(problem.fn, x, dirs, mode=mode)
            except (RuntimeError, NotImplementedError) as err:
                why = f"forward-mode AD failed ({type(err).__name__}: {str(err)[:120]})"
        warnings.warn(
            f"{problem.api}: {why}; using double backward (reverse-over-reverse) instead, "
            "which is exact but slower.",
            FallbackWarning,
            stacklevel=4,
        )
        return _directional_derivatives(problem.fn, x, dirs, mode="reverse")


def _finish(problem: Problem, result: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """``(B, m, *tail)`` -> ``Q + tail`` (leading ``B`` when batched), output dtype."""
    warn_zero(problem, result, second_order=True)
    out = result.reshape(problem.batch, *problem.sel_shape, *result.shape[2:])
    out = out if problem.batched else out[0]
    out = out.to(problem.out_dtype)
    return out if create_graph else out.detach()


# ------------------------------------- public API -------------------------------------


@serialised
def second_order_operator(
    f: Fn,
    x: torch.Tensor,
    *,
    coefficients: torch.Tensor | None = None,
    factor: torch.Tensor | None = None,
    drift: torch.Tensor | None = None,
    output: Selection = None,
    batched: bool = False,
    create_graph: bool = False,
) -> torch.Tensor:
    """``sum_ij C_ij d2u/dx_i dx_j + b . grad u`` of each selected output, per sample.

    ``n`` is the number of per-sample input entries (``prod(S)``); indices ``i, j`` are flat
    per-sample indices. ``C`` comes as ``coefficients`` (symmetrised; any sign) or as a
    factor ``S`` with ``C = S S^T``; with neither, ``C`` is the identity (the Laplacian).
    Never forms the Hessian: one vectorised pass with one direction per
    eigenvector of ``C`` (or per column of ``S``), all samples at once.

    Args:
        f: Function or ``nn.Module`` taking one tensor and returning one tensor.
        x: Input, shape ``S`` (or ``(B, *S)`` with ``batched=True``).
        coefficients: ``C``, shared ``(n, n)`` or per sample ``(B, n, n)``. Gradients do
            not flow to it (use ``factor=`` for that).
        factor: ``S``, shared ``(n, r)`` or per sample ``(B, n, r)``: ``C = S S^T`` with
            ``r`` directions (cheaper than ``coefficients`` when ``r < n``).
        drift: ``b``, shared ``(n,)`` or per sample ``(B, n)``; adds ``b . grad u``.
        output: Which outputs (see :func:`hesse.jacobian`).
        batched: The first dimension of ``x`` holds independent samples.
        create_graph: Keep the graph (gradients to the weights, ``x``, ``factor`` and
            ``drift``), e.g. for a PINN residual loss.

    Returns:
        Shape ``Q`` (one value per selected output), with a leading ``B`` when batched.

    Raises:
        UnsupportedInputError: Both ``coefficients`` and ``factor``, wrong shapes or
            dtypes, or ``coefficients`` requiring grad with ``create_graph=True``.
        NonFiniteError: NaN/Inf in ``x`` or in an operator tensor.

    >>> import torch, hesse
    >>> u = lambda x: (x[0] ** 2) * x[1]
    >>> hesse.second_order_operator(u, torch.tensor([1.0, 2.0]),
    ...     coefficients=torch.tensor([[1.0, 0.5], [0.5, 0.0]]), drift=torch.ones(2))
    tensor(11.)
    """
    api = "hesse.second_order_operator"
    check_options(api, None, "auto", batched=batched, create_graph=create_graph)
    if coefficients is not None and factor is not None:
        raise UnsupportedInputError(
            f"{api}: got both coefficients= and factor=; pass one of them (C, or S with C = S S^T)."
        )
    problem = build_problem(api, f, x, output, batched, keep_graph=create_graph, capture=False)
    n, b = problem.n, problem.batch
    if factor is not None:
        r = factor.shape[-1] if isinstance(factor, torch.Tensor) and factor.dim() else 1
        s, per = _tensor_arg(
            api, "factor", factor, problem, {"shared": (n, r), "per_sample": (b, n, r)}
        )
        dirs, weights = s.transpose(-1, -2), None  # (r, n) or (B, r, n)
    elif coefficients is not None:
        if create_graph and coefficients.requires_grad:
            raise UnsupportedInputError(
                f"{api}: coefficients requires grad, but gradients to C are not supported "
                "(the operator uses C's eigenvectors). Pass coefficients.detach(), or pass "
                "a factor S with C = S S^T as factor= to differentiate with respect to it."
            )
        shapes = {"shared": (n, n), "per_sample": (b, n, n)}
        c, per = _tensor_arg(api, "coefficients", coefficients, problem, shapes)
        dirs, weights = _eigen_directions(c.detach(), per)
    else:
        dirs, weights, per = torch.eye(n).to(problem.x), None, False
    extra = 0
    if drift is not None:
        v, drift_per = _tensor_arg(
            api, "drift", drift, problem, {"shared": (n,), "per_sample": (b, n)}
        )
        if per or drift_per:  # one layout for all directions: per sample
            dirs = dirs if per else dirs.expand(b, *dirs.shape)
            v = v if drift_per else v.expand(b, n)
            dirs, per = torch.cat([dirs, v[:, None]], 1), True
        else:
            dirs = torch.cat([dirs, v[None]], 0)
        extra = 1
    first, second = _run(problem, dirs, create_graph)  # (R, B, m)
    r = dirs.shape[-2] - extra
    second = second[:r]  # the drift's second derivative is not used
    if weights is None:
        result = second.sum(0)
    else:
        result = torch.einsum("rbm,r->bm" if weights.dim() == 1 else "rbm,br->bm", second, weights)
    if extra:
        result = result + first[r]
    return _finish(problem, result, create_graph)


def _eigen_directions(c: torch.Tensor, per: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Directions (rows) and weights of ``C = sum_k l_k v_k v_k^T`` (``C`` symmetrised).

    Shared ``C``: eigenvectors with negligible eigenvalues are dropped (fewer directions
    for low-rank ``C``); a diagonal ``C`` uses the unit vectors directly.
    """
    c = (c + c.transpose(-1, -2)) / 2
    if not per and bool((c == torch.diag_embed(c.diagonal())).all()):
        lam = c.diagonal()
        keep = lam != 0
        eye = torch.eye(c.shape[-1], dtype=c.dtype, device=c.device)
        return eye[keep], lam[keep]
    lam, vecs = torch.linalg.eigh(c)
    dirs = vecs.transpose(-1, -2)  # rows are eigenvectors
    if per:
        return dirs, lam
    tol = lam.abs().max() * c.shape[-1] * torch.finfo(c.dtype).eps
    keep = lam.abs() > tol
    return dirs[keep], lam[keep]


@serialised
def mixed_partials(
    f: Fn,
    x: torch.Tensor,
    pairs: Sequence[tuple[int, int]] | torch.Tensor,
    *,
    output: Selection = None,
    batched: bool = False,
    create_graph: bool = False,
) -> torch.Tensor:
    """Selected second partials ``d2u/dx_i dx_j`` per sample, without the full Hessian.

    Like DeepXDE's ``hessian(i, j)``, but for all pairs and samples in one vectorised pass:
    one direction per distinct index (``e_i``) and per distinct off-diagonal pair
    (``e_i + e_j``), combined by polarisation.

    Args:
        f: Function or ``nn.Module`` taking one tensor and returning one tensor.
        x: Input, shape ``S`` (or ``(B, *S)`` with ``batched=True``).
        pairs: ``P`` index pairs ``(i, j)`` of flat per-sample input indices (negative
            indices count from the end), a list of tuples or a ``(P, 2)`` integer tensor.
        output: Which outputs (see :func:`hesse.jacobian`).
        batched: The first dimension of ``x`` holds independent samples.
        create_graph: Keep the graph so the result can be differentiated again.

    Returns:
        Shape ``Q + (P,)``, with a leading ``B`` when batched.

    >>> import torch, hesse
    >>> u = lambda x: x[0] ** 2 * x[1] + x[2] ** 3
    >>> hesse.mixed_partials(u, torch.tensor([1.0, 2.0, 3.0]), [(0, 1), (1, 0), (2, 2)])
    tensor([ 2.,  2., 18.])
    """
    api = "hesse.mixed_partials"
    check_options(api, None, "auto", batched=batched, create_graph=create_graph)
    problem = build_problem(api, f, x, output, batched, keep_graph=create_graph, capture=False)
    n = problem.n
    index = _pairs(api, pairs, n)
    diag = sorted({i for p in index for i in p})
    off = sorted({(min(p), max(p)) for p in index if p[0] != p[1]})
    eye = torch.eye(n, dtype=problem.x.dtype, device=problem.x.device)
    dirs = torch.cat(
        [eye[diag], *([eye[[i for i, _ in off]] + eye[[j for _, j in off]]] if off else [])]
    )
    _, second = _run(problem, dirs, create_graph)  # (R, B, m)
    at = {i: k for k, i in enumerate(diag)}
    at_off = {p: len(diag) + k for k, p in enumerate(off)}
    cols = []
    for i, j in index:
        if i == j:
            cols.append(second[at[i]])
        else:
            both = second[at_off[(min(i, j), max(i, j))]]
            cols.append((both - second[at[i]] - second[at[j]]) / 2)
    return _finish(problem, torch.stack(cols, -1), create_graph)


def _pairs(api: str, pairs: object, n: int) -> list[tuple[int, int]]:
    """Validates ``pairs`` and returns them as non-negative index tuples."""
    if isinstance(pairs, torch.Tensor):
        if pairs.is_floating_point() or pairs.dim() != 2 or pairs.shape[1] != 2:
            raise UnsupportedInputError(
                f"{api}: expected pairs as a (P, 2) integer tensor, got dtype {pairs.dtype} "
                f"with shape {tuple(pairs.shape)}."
            )
        pairs = [tuple(p) for p in pairs.tolist()]
    ok = isinstance(pairs, (list, tuple)) and all(
        isinstance(p, (list, tuple))
        and len(p) == 2
        and all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in p)
        for p in pairs
    )
    if not ok or not pairs:
        raise UnsupportedInputError(
            f"{api}: expected pairs to be a non-empty list of (i, j) int pairs, got "
            f"{pairs!r}. Example: pairs=[(0, 0), (0, 1)] for d2u/dx0^2 and d2u/dx0 dx1."
        )
    bad = [p for p in pairs if not all(-n <= i < n for i in p)]
    if bad:
        raise UnsupportedInputError(
            f"{api}: pair {tuple(bad[0])} is out of range: each sample has n={n} input "
            f"entries, valid flat indices are 0..{n - 1}."
        )
    return [(int(i) % n, int(j) % n) for i, j in pairs]
