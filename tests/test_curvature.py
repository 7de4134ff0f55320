"""hessian_operator, hessian_eigs and hessian_spectrum against dense float64 references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hesse

scipy_linalg = pytest.importorskip("scipy.sparse.linalg")
WHICH = ["LA", "SA", "LM", "BE"]


def mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def cnn() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.Softplus(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)
    ).double()


def dense(f, x, batched, output=1):
    return hesse.hessian(f, x, output=output, batched=batched, flat=True)


def close(a, b, tol=1e-8):
    err = float((a - b).abs().max())
    assert err <= tol * max(1.0, float(b.abs().max())), f"max abs error {err:.3g}"


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_operator_products_match_dense(batched):
    f, x = mlp(), torch.randn(4, 12) if batched else torch.randn(12)
    H = dense(f, x, batched)
    op = hesse.hessian_operator(f, x, output=1, batched=batched)
    V = torch.randn(*x.shape, 5)
    assert op.shape == ((4, 12, 12) if batched else (12, 12))
    assert op.dtype == torch.float64 and op.device == x.device
    close(op @ V, H @ V)
    close(op.matmat(V), H @ V)
    close(op @ V[..., 0], (H @ V[..., :1])[..., 0])
    close(op.matvec(V[..., 0]), (H @ V[..., :1])[..., 0])
    assert op.matvecs == 12


def test_operator_is_symmetric_and_scipy_wraps_it():
    f, x = cnn(), torch.randn(1, 1, 6, 6)
    op = hesse.hessian_operator(f, x, output=0, batched=True)
    H = dense(f, x, True, output=0)[0]
    close(H, H.T, 1e-12)
    lin = op.to_scipy()
    V = torch.randn(36, 3)
    close(torch.from_numpy(lin.matmat(V.numpy())), H @ V)
    close(torch.from_numpy(lin.matvec(V[:, 0].numpy())), H @ V[:, 0])


def test_operator_leaves_the_callers_model_and_input_alone():
    f, x = mlp(), torch.randn(3, 12)
    op = hesse.hessian_operator(f, x, output=0, batched=True)
    op @ torch.randn(3, 12)
    hesse.hessian_eigs(f, x, 2, output=0, batched=True)
    assert all(p.grad is None and p.requires_grad for p in f.parameters())
    assert not x.requires_grad and x.grad is None


class OldStyleCube(torch.autograd.Function):
    """An autograd.Function torch.func cannot transform (no setup_context)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


def test_operator_falls_back_to_autograd_with_a_warning():
    x = torch.tensor([1.0, 2.0, -1.0])
    with pytest.warns(hesse.FallbackWarning, match="double torch.autograd.grad"):
        op = hesse.hessian_operator(lambda z: OldStyleCube.apply(z).sum(), x)
    assert op.how == "autograd"
    close(op @ torch.eye(3), torch.diag(6 * x))


def test_operator_errors_name_the_fix():
    f, x = mlp(), torch.randn(12)
    with pytest.raises(hesse.OutputSelectionError, match=r"one scalar output per sample.*3 out"):
        hesse.hessian_operator(f, x)
    with pytest.raises(hesse.OutputSelectionError, match="one scalar"):
        hesse.hessian_operator(f, x, output=[0, 1])
    op = hesse.hessian_operator(f, x, output=0)
    with pytest.raises(hesse.UnsupportedInputError, match=r"shape \(12,\).*got shape \(11,\)"):
        op @ torch.randn(11)
    with pytest.raises(hesse.UnsupportedInputError, match=r"\(12, 'k'\)"):
        op.matmat(torch.randn(12))
    with pytest.raises(hesse.NonFiniteError):
        op @ torch.full((12,), float("nan"))
    batched = hesse.hessian_operator(f, torch.randn(2, 12), output=0, batched=True)
    with pytest.raises(hesse.UnsupportedInputError, match="holds B=2 samples"):
        batched.to_scipy()
    with pytest.raises(hesse.UnsupportedInputError, match=r"expected x to be a torch\.Tensor"):
        hesse.hessian_operator(f, [1.0], output=0)


def _check_pairs(values, vectors, residuals, H, which, k):
    ev = torch.linalg.eigvalsh(H)
    if which == "LA":
        want = ev[-k:]
    elif which == "SA":
        want = ev[:k]
    elif which == "LM":
        want = ev[ev.abs().argsort()[-k:]].sort().values
    else:
        want = torch.cat([ev[: k // 2], ev[len(ev) - (k - k // 2) :]])
    close(values, want, 1e-7)
    vecs = vectors.reshape(k, -1).T
    close(H @ vecs, vecs * values, 1e-6)
    close(vecs.T @ vecs, torch.eye(k), 1e-8)
    assert float(residuals.max()) <= 1e-6 * float(values.abs().max())


@pytest.mark.parametrize("which", WHICH)
def test_eigs_single_matches_eigh_and_eigsh(which):
    f, x = cnn(), torch.randn(1, 6, 6)
    H = dense(f, x.unsqueeze(0), True)[0]
    g = torch.Generator().manual_seed(0)
    values, vectors, res = hesse.hessian_eigs(
        f, x.unsqueeze(0), 5, which=which, output=1, batched=True, generator=g, tol=1e-9
    )
    assert values.shape == (1, 5) and vectors.shape == (1, 5, 1, 6, 6) and res.shape == (1, 5)
    _check_pairs(values[0], vectors[0], res[0], H, which, 5)
    op = hesse.hessian_operator(f, x.unsqueeze(0), output=1, batched=True)
    ref = scipy_linalg.eigsh(op.to_scipy(), k=5, which=which, tol=1e-12)[0]
    close(values[0], torch.from_numpy(ref), 1e-7)


@pytest.mark.parametrize("which", WHICH)
def test_eigs_batched_lockstep_matches_eigh(which):
    f, x = mlp(), torch.randn(5, 12)
    H = dense(f, x, True)
    values, vectors, res = hesse.hessian_eigs(f, x, 3, which=which, output=1, batched=True)
    assert values.shape == (5, 3) and vectors.shape == (5, 3, 12)
    for b in range(5):
        _check_pairs(values[b], vectors[b], res[b], H[b], which, 3)


def test_eigs_unbatched_shapes_restarts_and_generator():
    f, x = mlp(), torch.randn(12)
    H = dense(f, x, False, output=2)
    kw = dict(output=2, ncv=5, tol=1e-10, max_iter=500)
    a = hesse.hessian_eigs(f, x, 2, generator=torch.Generator().manual_seed(3), **kw)
    b = hesse.hessian_eigs(f, x, 2, generator=torch.Generator().manual_seed(3), **kw)
    assert a[0].shape == (2,) and a[1].shape == (2, 12)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    _check_pairs(*a, H, "LA", 2)
    op = hesse.hessian_operator(f, x, output=2)
    close(op.eigs(2, which="SA", tol=1e-10)[0], torch.linalg.eigvalsh(H)[:2], 1e-7)
    with pytest.warns(hesse.ConvergenceWarning, match="did not converge"):
        last = op.eigs(2, ncv=3, max_iter=2, tol=1e-14)
    vecs = last[1].T  # the last Ritz pairs: their residuals are the true ones
    close((H @ vecs - vecs * last[0]).norm(dim=0), last[2], 1e-6)


def test_eigs_warns_when_not_converged():
    f, x = mlp(), torch.randn(12)
    with pytest.warns(hesse.ConvergenceWarning, match="did not converge"):
        hesse.hessian_eigs(f, x, 2, output=0, ncv=3, max_iter=1, tol=1e-14)


def test_eigs_errors():
    f, x = mlp(), torch.randn(12)
    with pytest.raises(hesse.UnsupportedInputError, match=r"k to be an int in 1\.\.12"):
        hesse.hessian_eigs(f, x, 0, output=0)
    with pytest.raises(hesse.UnsupportedInputError, match="n = 12 inputs per sample"):
        hesse.hessian_eigs(f, x, 13, output=0)
    with pytest.raises(hesse.UnsupportedInputError, match="which to be one of"):
        hesse.hessian_eigs(f, x, 2, which="XX", output=0)
    with pytest.raises(hesse.UnsupportedInputError, match="tol to be a positive"):
        hesse.hessian_eigs(f, x, 2, output=0, tol=0)
    with pytest.raises(hesse.OutputSelectionError, match="one scalar"):
        hesse.hessian_eigs(f, x, 2)


def test_spectrum_quadrature():
    f, x = mlp(), torch.randn(3, 12)
    H = dense(f, x, True)
    g = torch.Generator().manual_seed(0)
    s = hesse.hessian_spectrum(
        f, x, output=1, batched=True, num_probes=6, lanczos_steps=12, generator=g
    )
    assert s.nodes.shape == (3, 6, 12) and s.weights.shape == (3, 6, 12)
    close(s.weights.sum((-2, -1)), torch.ones(3), 1e-12)
    ev = torch.linalg.eigvalsh(H)
    # with n steps every probe's nodes are the eigenvalues
    close(s.nodes.sort(-1).values, ev[:, None, :].expand(3, 6, 12), 1e-7)
    grid = torch.linspace(float(ev.min()) - 1, float(ev.max()) + 1, 2001)
    dens = s.density(grid, sigma=0.05)
    assert dens.shape == (3, 2001)
    close(torch.trapezoid(dens, grid), torch.ones(3), 1e-6)
    one = hesse.hessian_spectrum(f, x[0], output=1, num_probes=2, lanczos_steps=4)
    assert one.nodes.shape == (2, 4) and one.trace().shape == ()
