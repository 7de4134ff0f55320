"""Batched randomized trace and diagonal estimators over ``B`` operators in lockstep.

Each kernel takes ``apply``, mapping ``V`` ``(B, n, k)`` to the per-sample products
``(B, n, k)`` (one batched Hessian-vector product for all samples and columns), and
``draw``, mapping ``k`` to Rademacher test vectors ``(B, n, k)``. Samples stop on their
own: a sample's estimate is frozen once its standard error meets the tolerance, while
the lockstep products continue for the others.

NOTE: [exchangeable estimates] XTrace and XDiag (Epperly, Tropp & Webber 2024) form one
estimate per test vector ``w_i``: the exact trace (diagonal) of ``A`` on the span
``Q_i`` of the other sketched products ``A w_j``, plus Hutchinson with ``w_i`` on the
complement. ``Q_i Q_i^T = Q (I - s_i s_i^T) Q^T`` with ``s_i`` the normalised ``i``-th
column of ``R^{-T}``, so all ``s`` estimates come from one QR. Their mean is the
estimate; their spread gives the standard error (a heuristic: they are exchangeable, not
independent).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._stats import Running

Apply = Callable[[torch.Tensor], torch.Tensor]
Draw = Callable[[int], torch.Tensor]
Result = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def met(mean: torch.Tensor, stderr: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    """Per-sample stop test ``max stderr <= max(atol, rtol * max |mean|)``: ``(B,)``."""
    if mean.dim() == 1:
        return stderr <= torch.clamp(rtol * mean.abs(), min=atol)
    err = stderr.flatten(1).amax(1)
    return err <= torch.clamp(rtol * mean.flatten(1).abs().amax(1), min=atol)


def sample_loop(
    sample: Callable[[int], torch.Tensor],
    batch: int,
    extra: tuple[int, ...],
    like: torch.Tensor,
    num: int | None,
    rtol: float,
    atol: float,
    block: int,
    cap: int,
) -> Running:
    """Draws samples ``(B, k, *E)`` until ``num`` are in, or until each sample's tolerance.

    With a tolerance, at least ``block`` samples are drawn, then ``block`` at a time,
    each sample stopping when :func:`met`; the loop ends when all stopped or at ``cap``.
    """
    run = Running(batch, extra, like)
    total = num if num is not None else cap
    drawn = 0
    while drawn < total:
        k = min(block, total - drawn)
        run.add(sample(k))
        drawn += k
        if num is None and drawn >= block:
            run.done = run.done | met(run.mean, run.stderr, rtol, atol)
            if bool(run.done.all()):
                break
    return run


def hutchinson(
    apply: Apply, draw: Draw, diag: bool, num: int | None, rtol: float, atol: float,
    block: int, cap: int, like: torch.Tensor,
) -> Result:  # fmt: skip
    """Hutchinson: ``z^T A z`` (trace) or ``z * A z`` (diagonal) with Rademacher ``z``."""
    B, n = like.shape

    def sample(k: int) -> torch.Tensor:
        z = draw(k)
        az = apply(z)
        return (z * az).transpose(1, 2) if diag else (z * az).sum(1)

    run = sample_loop(sample, B, (n,) if diag else (), like, num, rtol, atol, block, cap)
    return run.mean, run.stderr, run.count, run.count, run.done | (num is not None)


def hutch_plus_plus(
    apply: Apply, draw: Draw, sketch: int, num: int | None, rtol: float, atol: float,
    block: int, cap: int, like: torch.Tensor,
) -> Result:  # fmt: skip
    """Hutch++ (Meyer et al. 2021): exact trace on a sketched range, Hutchinson on the rest."""
    B = like.shape[0]
    Q = torch.linalg.qr(apply(draw(sketch))).Q
    exact_part = (Q * apply(Q)).sum(dim=(1, 2))

    def sample(k: int) -> torch.Tensor:
        z = draw(k)
        z = z - Q @ (Q.transpose(1, 2) @ z)
        return (z * apply(z)).sum(1)

    rest = None if num is None else num - 2 * sketch
    run = sample_loop(sample, B, (), like, rest, rtol, atol, block, cap - 2 * sketch)
    done = run.done | (num is not None)
    return exact_part + run.mean, run.stderr, run.count + 2 * sketch, run.count, done


def _deflate(X: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """Column ``i`` of ``X`` (B, s, s) projected off column ``i`` of ``S``: ``(I - s s^T) x``."""
    return X - S * (S * X).sum(1, keepdim=True)


def exchangeable(W: torch.Tensor, AW: torch.Tensor, apply: Apply, diag: bool) -> torch.Tensor:
    """Per-vector XTrace ``(B, s)`` or XDiag ``(B, s, n)`` estimates (NOTE above).

    Args:
        W: Test vectors ``(B, n, s)``.
        AW: Their products ``(B, n, s)``.
        apply: For the ``s`` products with the sketch basis.
        diag: XDiag instead of XTrace.
    """
    Q, R = torch.linalg.qr(AW)
    AQ = apply(Q)
    Rinv_t = torch.linalg.inv(R.transpose(1, 2))
    S = Rinv_t / torch.linalg.vector_norm(Rinv_t, dim=1, keepdim=True)
    if diag:
        full = (Q * AQ).sum(2)  # diag(Q Q^T A), (B, n)
        left_out = (Q @ S) * (AQ @ S)  # diag(Q s_i s_i^T Q^T A), (B, n, s)
        comp = AW - Q @ _deflate(AQ.transpose(1, 2) @ W, S)
        return (full[:, :, None] - left_out + W * comp).transpose(1, 2)
    QtAQ = Q.transpose(1, 2) @ AQ
    traces = QtAQ.diagonal(dim1=1, dim2=2).sum(1, keepdim=True)
    traces = traces - torch.einsum("bji,bjk,bki->bi", S, QtAQ, S)
    apw = AW - AQ @ _deflate(Q.transpose(1, 2) @ W, S)
    ptapw = apw - Q @ _deflate(Q.transpose(1, 2) @ apw, S)
    return traces + (W * ptapw).sum(1)


def xtrace(
    apply: Apply, draw: Draw, diag: bool, num: int | None, rtol: float, atol: float,
    block: int, cap: int, like: torch.Tensor,
) -> Result:  # fmt: skip
    """XTrace / XDiag with ``num // 2`` test vectors, or doubling them up to a tolerance."""
    B, n = like.shape
    s = num // 2 if num is not None else max(2, block // 2)
    W = torch.empty((B, n, 0), dtype=like.dtype, device=like.device)
    AW = torch.empty_like(W)
    matvecs = torch.zeros(B, dtype=torch.long, device=like.device)
    samples = torch.zeros_like(matvecs)
    done = torch.zeros(B, dtype=torch.bool, device=like.device)
    value = stderr = None
    while True:
        new = draw(s - W.shape[2])
        W, AW = torch.cat([W, new], 2), torch.cat([AW, apply(new)], 2)
        ests = exchangeable(W, AW, apply, diag)
        matvecs = matvecs + torch.where(done, 0, new.shape[2] + s)
        samples = torch.where(done, samples, s)
        mean, err = ests.mean(1), ests.std(1) / s**0.5
        live = (~done)[:, None] if diag else ~done
        value = mean if value is None else torch.where(live, mean, value)
        stderr = err if stderr is None else torch.where(live, err, stderr)
        if num is not None:
            return value, stderr, matvecs, samples, torch.ones_like(done)
        done = done | met(mean, err, rtol, atol)
        if bool(done.all()) or 3 * s + int(matvecs.max()) > cap:
            return value, stderr, matvecs, samples, done
        s *= 2
