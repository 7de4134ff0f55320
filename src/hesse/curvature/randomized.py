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
INFLATE = 2.0  # NOTE: [two-stage sampling]
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
    """Draws samples ``(B, k, *E)``: ``num`` of them, or enough for each sample's tolerance.

    With a tolerance it runs Stein's two-stage scheme (NOTE: [two-stage sampling]); the
    returned :class:`Running` then has ``matvecs`` (all samples drawn per sample) and
    ``done`` (tolerance met) set.
    """
    if num is not None:
        run = Running(batch, extra, like)
        for start in range(0, num, block):
            run.add(sample(min(block, num - start)))
        run.matvecs, run.done = run.count, torch.ones_like(run.done)
        return run
    return _two_stage(sample, batch, extra, like, rtol, atol, block, cap)


# NOTE: [two-stage sampling] Stopping as soon as the running standard error is below the
# tolerance stops more often when the variance happens to be underestimated, and the
# intervals then cover less than they claim (93.7% at a nominal 95% in our tests). So a
# pilot of ``block`` samples only sizes the next stage, ``N = var / tol^2`` samples drawn
# afresh (``INFLATE`` times the pilot estimate, so that most stages meet the tolerance),
# and the estimate and its error come from that stage alone (Stein 1945): the
# number of samples does not depend on them. A stage that misses the tolerance sizes the
# next one the same way.
def _two_stage(
    sample: Callable[[int], torch.Tensor],
    batch: int,
    extra: tuple[int, ...],
    like: torch.Tensor,
    rtol: float,
    atol: float,
    block: int,
    cap: int,
) -> Running:
    cur = Running(batch, extra, like)
    cur.add(sample(block))
    used = cur.count.clone()
    out = cur
    done = torch.zeros(batch, dtype=torch.bool, device=like.device)
    while True:
        mean, err = cur.mean.reshape(batch, -1), cur.stderr.reshape(batch, -1)
        var = (err**2).amax(1) * cur.count.clamp_min(1)
        thr = torch.clamp(rtol * mean.abs().amax(1), min=atol).clamp_min(1e-300)
        need = torch.ceil(INFLATE * var / thr**2).clamp(min=block).to(torch.long)
        need = torch.minimum(need, (cap - used).clamp_min(0))
        active = ~done & (need >= 2)
        if not bool(active.any()):
            break
        stage = Running(batch, extra, like)
        total = int(need[active].max())
        for start in range(0, total, 4 * block):
            k = min(4 * block, total - start)
            cols = start + torch.arange(k, device=like.device)
            stage.add(sample(k), (cols[None, :] < need[:, None]) & active[:, None])
        used = used + torch.where(active, need, 0)
        out = _merge(out, stage, active)
        done = done | (active & met(stage.mean, stage.stderr, rtol, atol)) | (used >= cap)
        cur = _merge(cur, stage, active)
        if bool(done.all()):
            break
    out.matvecs = used
    out.done = met(out.mean, out.stderr, rtol, atol)
    return out


def _merge(old: Running, new: Running, take: torch.Tensor) -> Running:
    """``new``'s statistics where ``take`` ``(B,)``, else ``old``'s."""
    shape = (-1, *([1] * (old.sum.dim() - 1)))
    old.sum = torch.where(take.reshape(shape), new.sum, old.sum)
    old.sumsq = torch.where(take.reshape(shape), new.sumsq, old.sumsq)
    old.count = torch.where(take, new.count, old.count)
    return old


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
    return run.mean, run.stderr, run.matvecs, run.count, run.done


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
    return exact_part + run.mean, run.stderr, run.matvecs + 2 * sketch, run.count, run.done


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
