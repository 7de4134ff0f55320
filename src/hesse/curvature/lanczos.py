"""Lanczos on many independent symmetric operators in lockstep, in torch.

Every routine works on ``P`` independent problems at once (``P`` samples, or samples
times probes): one call of ``apply`` per step computes the next product of all of them,
and the small projected problems are solved by one batched ``eigh``.

NOTE: [thick restart] With full reorthogonalisation the Lanczos relation
``A V_m = V_m T_m + beta v_{m+1} e_m^T`` holds to rounding, with ``T_m = V_m^T A V_m``.
Keeping the ``p`` wanted Ritz vectors ``V_m Y_p`` and continuing from ``v_{m+1}`` gives
``T = [[diag(theta_p), s], [s^T, alpha, ...]]`` with ``s = beta Y_p[m, :]`` (an
arrowhead, Wu & Simon 2000). The Gram-Schmidt coefficients ``V^T A v_j`` fill that
matrix directly, so the same extension step serves the first pass and every restart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

Which = Literal["LA", "SA", "LM", "BE"]
Apply = Callable[[torch.Tensor], torch.Tensor]


def random_start(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
    rademacher: bool = False,
) -> torch.Tensor:
    """Gaussian (or Rademacher) vectors drawn on the generator's device, then moved."""
    where = generator.device if generator is not None else device
    if rademacher:
        z = torch.randint(0, 2, shape, generator=generator, device=where).to(dtype) * 2 - 1
    else:
        z = torch.randn(shape, generator=generator, device=where, dtype=dtype)
    return z.to(device)


def _orthonormalise(w: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Classical Gram-Schmidt twice: ``w`` (P, n) against the columns of ``V`` (P, n, j).

    Returns:
        ``(w', h)``: the orthogonalised ``w`` and the coefficients ``h = V^T w`` (P, j).
    """
    h = torch.einsum("pnj,pn->pj", V, w)
    w = w - torch.einsum("pnj,pj->pn", V, h)
    h2 = torch.einsum("pnj,pn->pj", V, w)
    return w - torch.einsum("pnj,pj->pn", V, h2), h + h2


def extend(
    apply: Apply,
    V: torch.Tensor,
    T: torch.Tensor,
    start: int,
    stop: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Lanczos steps ``start..stop-1`` with full reorthogonalisation, in place.

    Args:
        apply: ``(P, n) -> (P, n)``, the ``P`` operators applied to one vector each.
        V: Basis buffer ``(P, n, m + 1)``; columns ``0..start`` are orthonormal.
        T: Projected matrix ``(P, m, m)``; its leading ``start x start`` block and the
            coupling ``T[:, start, :start]`` are filled (see NOTE: [thick restart]).
        start: First column to apply the operators to.
        stop: One past the last; ``stop <= m``.
        generator: For fresh directions after an exact breakdown.

    Returns:
        ``beta`` of shape ``(P,)``: the norm of the residual after the last step, so that
        ``A V_m = V_m T_m + beta v_{m+1} e_m^T``.
    """
    P, n, _ = V.shape
    beta = torch.zeros(P, dtype=V.dtype, device=V.device)
    for j in range(start, stop):
        w = apply(V[:, :, j])
        w, h = _orthonormalise(w, V[:, :, : j + 1])
        T[:, : j + 1, j] = h
        T[:, j, : j + 1] = h
        beta = torch.linalg.vector_norm(w, dim=1)
        scale = h.abs().amax(dim=1).clamp_min(torch.finfo(V.dtype).tiny)
        broken = beta <= 1e3 * torch.finfo(V.dtype).eps * scale
        if bool(broken.any()) and j + 1 < n:  # invariant subspace: continue elsewhere
            fresh = random_start((P, n), V.dtype, V.device, generator)
            fresh, _ = _orthonormalise(fresh, V[:, :, : j + 1])
            w = torch.where(broken[:, None], fresh, w)
            beta = torch.where(broken, torch.zeros_like(beta), beta)
        norm = torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min(torch.finfo(V.dtype).tiny)
        V[:, :, j + 1] = w / norm
        if j + 1 < T.shape[-1]:
            T[:, j + 1, j] = beta
            T[:, j, j + 1] = beta
    return beta


def select(theta: torch.Tensor, k: int, which: Which) -> torch.Tensor:
    """Indices ``(P, k)`` of the wanted Ritz values among ``theta`` (P, m), ascending."""
    m = theta.shape[-1]
    order = torch.arange(m, device=theta.device).expand_as(theta)
    if which == "LA":
        idx = order[:, m - k :]
    elif which == "SA":
        idx = order[:, :k]
    elif which == "LM":
        idx = theta.abs().topk(k, dim=-1).indices.sort(dim=-1).values
    else:  # "BE": half from each end, the extra one from the top (as scipy's eigsh)
        low = k // 2
        idx = torch.cat([order[:, :low], order[:, m - (k - low) :]], dim=-1)
    return idx


def thick_restart_eigs(
    apply: Apply,
    P: int,
    n: int,
    k: int,
    which: Which,
    *,
    tol: float,
    max_iter: int,
    ncv: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Wanted eigenpairs of ``P`` symmetric operators by thick-restart Lanczos, in lockstep.

    Args:
        apply: ``(P, n) -> (P, n)``.
        P: Number of independent operators.
        n: Their size.
        k: Eigenpairs wanted per operator.
        which: ``"LA"``, ``"SA"``, ``"LM"`` or ``"BE"``.
        tol: Converged when ``||A y - theta y|| <= tol * max(|theta|)`` for all wanted.
        max_iter: Restart cycles at most.
        ncv: Basis size ``m`` (``k < m <= n``).
        dtype: Working dtype.
        device: Working device.
        generator: Random starting vectors.

    Returns:
        ``(values (P, k), vectors (P, n, k), residuals (P, k), converged (P,))``, values
        ascending. A problem's results are frozen at the cycle it converged in.
    """
    m = ncv
    V = torch.zeros(P, n, m + 1, dtype=dtype, device=device)
    T = torch.zeros(P, m, m, dtype=dtype, device=device)
    v0 = random_start((P, n), dtype, device, generator)
    V[:, :, 0] = v0 / torch.linalg.vector_norm(v0, dim=1, keepdim=True)
    keep = k if m == n else min(m - 1, k + max(1, (m - k) // 2))
    done = torch.zeros(P, dtype=torch.bool, device=device)
    values = torch.zeros(P, k, dtype=dtype, device=device)
    vectors = torch.zeros(P, n, k, dtype=dtype, device=device)
    resid = torch.full((P, k), float("inf"), dtype=dtype, device=device)
    start = 0
    for cycle in range(max(1, max_iter)):
        beta = extend(apply, V, T, start, m, generator)
        theta, Y = torch.linalg.eigh(T)
        r_all = (beta[:, None] * Y[:, -1, :]).abs()
        idx = select(theta, k, which)
        th = theta.gather(1, idx)
        res = r_all.gather(1, idx)
        scale = th.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
        ok = (res <= tol * scale).all(dim=1) | (m == n)
        new = ok & ~done
        if bool(new.any()) or m == n:
            vec = torch.einsum(
                "pnm,pmk->pnk", V[:, :, :m], Y.gather(2, idx[:, None, :].expand(P, m, k))
            )
            values = torch.where(new[:, None], th, values)
            vectors = torch.where(new[:, None, None], vec, vectors)
            resid = torch.where(new[:, None], res, resid)
            done = done | new
        if bool(done.all()) or cycle == max_iter - 1:
            break
        # thick restart: keep the `keep` wanted Ritz vectors, continue from v_{m+1}
        kidx = select(theta, keep, which)
        Yk = Y.gather(2, kidx[:, None, :].expand(P, m, keep))
        V[:, :, :keep] = torch.einsum("pnm,pmk->pnk", V[:, :, :m], Yk)
        V[:, :, keep] = V[:, :, m]
        T.zero_()
        T[:, :keep, :keep] = torch.diag_embed(theta.gather(1, kidx))
        s = beta[:, None] * Yk[:, -1, :]
        T[:, keep, :keep] = s
        T[:, :keep, keep] = s
        start = keep
    last = ~done
    if bool(last.any()):  # not converged: report the last Ritz pairs and their residuals
        vec = torch.einsum(
            "pnm,pmk->pnk", V[:, :, :m], Y.gather(2, idx[:, None, :].expand(P, m, k))
        )
        values = torch.where(last[:, None], th, values)
        vectors = torch.where(last[:, None, None], vec, vectors)
        resid = torch.where(last[:, None], res, resid)
    return values, vectors, resid, done


def lanczos_quadrature(
    apply: Apply, v0: torch.Tensor, steps: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss quadrature nodes and weights of ``v0^T f(A) v0 / ||v0||^2`` (plain Lanczos).

    Args:
        apply: ``(P, n) -> (P, n)``.
        v0: Starting vectors ``(P, n)``.
        steps: Lanczos steps ``m`` (``<= n``).
        generator: For fresh directions after an exact breakdown.

    Returns:
        ``(nodes, weights)``, each ``(P, m)``: the Ritz values and the squared first
        components of their eigenvectors (each row of weights sums to 1).
    """
    P, n = v0.shape
    V = torch.zeros(P, n, steps + 1, dtype=v0.dtype, device=v0.device)
    T = torch.zeros(P, steps, steps, dtype=v0.dtype, device=v0.device)
    V[:, :, 0] = v0 / torch.linalg.vector_norm(v0, dim=1, keepdim=True)
    extend(apply, V, T, 0, steps, generator)
    nodes, Y = torch.linalg.eigh(T)
    return nodes, Y[:, 0, :] ** 2
