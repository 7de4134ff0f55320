"""The input Hessian of one scalar output as a linear operator, applied without forming it.

:func:`hessian_operator` validates the request once (through hesse's canonical
:class:`~hesse.planning.problem.Problem`), then builds the Hessian-vector product once, in
:func:`_build_hvp`, and every product reuses it: the model's forward pass and its
gradient are computed once, and a product is one pass backwards through the saved
gradient graph, vectorised over the columns of ``V`` with :func:`torch.func.vmap`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
from torch.func import grad, vjp, vmap

from ..errors import FallbackWarning, NonFiniteError, OutputSelectionError, UnsupportedInputError
from ..planning.problem import Problem, Selection, build_problem
from ..planning.scope import CALLS

Fn = Callable[[torch.Tensor], torch.Tensor]
Hvps = Callable[[torch.Tensor], torch.Tensor]

# torch scripts its decompositions the first time a transform runs, which emits torch's
# own DeprecationWarning about torch.jit.script; load them once, quietly.
with warnings.catch_warnings(), contextlib.suppress(ImportError):
    warnings.simplefilter("ignore", DeprecationWarning)
    import torch._decomp.decompositions_for_jvp


def scalar_problem(api: str, f: Fn, x: torch.Tensor, output: Selection, batched: bool) -> Problem:
    """Builds hesse's canonical problem and checks that it has one scalar output per sample.

    Args:
        api: The public call, for messages.
        f: Model or function.
        x: Input ``S`` (or ``(B, *S)`` when batched).
        output: The selection; must pick one element per sample.
        batched: Whether ``x``'s first dimension holds independent samples.

    Returns:
        The problem, with ``problem.m == 1``.

    Raises:
        OutputSelectionError: The selection holds more than one output per sample.
    """
    if not isinstance(batched, bool):
        raise UnsupportedInputError(
            f"{api}: expected batched to be True or False, got {batched!r}."
        )
    problem = build_problem(api, f, x, output, batched, capture=False)
    if problem.m != 1:
        raise OutputSelectionError(
            f"{api}: expected output= to select one scalar output per sample (an int or a "
            f"tuple index), got output={output!r} selecting {problem.m} outputs (shape "
            f"{problem.sel_shape}). A Hessian operator is the curvature of one scalar: pass "
            "e.g. output=0, or wrap f to return the scalar you want."
        )
    return problem


def _build_hvp(problem: Problem) -> tuple[Hvps, str]:
    """Builds the per-sample Hessian-vector product of ``problem`` once.

    The gradient of ``sum_b F(x)_b`` is the stack of per-sample gradients (samples are
    independent), so one pullback of that gradient gives ``H_b v_b`` for every sample at
    once. The pullback is built here, once: the forward pass and the gradient are not
    recomputed per product.

    Args:
        problem: A problem with one scalar output per sample; ``problem.x`` is ``(B, n)``.

    Returns:
        ``(hvps, how)``: ``hvps`` maps ``V`` of shape ``(k, B, n)`` to the products
        ``(k, B, n)``; ``how`` names the mechanism (``"torch.func"`` or ``"autograd"``).
    """
    fn, x = problem.fn, problem.x.detach()
    try:
        with torch.no_grad():
            _, pull = vjp(grad(lambda z: fn(z).sum()), x)

            def hvps(v: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    return vmap(lambda vi: pull(vi)[0])(v)

            hvps(torch.zeros((1, *x.shape), dtype=x.dtype, device=x.device))
        return hvps, "torch.func"
    except Exception as exc:
        warnings.warn(
            f"{problem.api}: torch.func could not build the Hessian-vector product "
            f"({type(exc).__name__}: {str(exc)[:160]}); using double torch.autograd.grad "
            "on a retained graph instead (one backward pass per column).",
            FallbackWarning,
            stacklevel=4,
        )
    return _autograd_hvp(fn, x), "autograd"


def _autograd_hvp(fn: Fn, x: torch.Tensor) -> Hvps:
    """Reverse-over-reverse by :func:`torch.autograd.grad` on a retained gradient graph."""
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(fn(xg).sum(), xg, create_graph=True)

    def hvps(v: torch.Tensor) -> torch.Tensor:
        if not g.requires_grad:  # the gradient does not depend on x: H = 0
            return torch.zeros_like(v)
        cols = [torch.autograd.grad(g, xg, vi, retain_graph=True, allow_unused=True)[0] for vi in v]
        return torch.stack([torch.zeros_like(xg) if c is None else c.detach() for c in cols])

    return hvps


class HessianOperator:
    """The input Hessian of one scalar output, per sample, as a matrix-free operator.

    Products are taken per sample: ``op @ v`` with ``v`` of shape ``(n,)`` (or
    ``(B, n)`` when batched) gives ``H v`` (``H_b v_b`` for each sample), and
    ``op @ V`` with ``V`` of shape ``(n, k)`` (or ``(B, n, k)``) gives ``H V``.
    ``n`` is the number of entries of one sample's input. ``H`` is symmetric.

    Attributes:
        shape: ``(n, n)``, or ``(B, n, n)`` when batched.
        dtype: The dtype of products.
        device: The device of products.
        batched: Whether the operator holds ``B`` independent samples.
        in_shape: The per-sample input shape ``S``.
        matvecs: Hessian-vector products taken so far, per sample (a column of a
            ``matmat`` counts as one).
        how: ``"torch.func"`` (vmapped pullback of the gradient) or ``"autograd"``.
    """

    def __init__(self, problem: Problem, api: str = "hesse.hessian_operator") -> None:
        self._problem = problem
        self._api = api
        self._hvps, self.how = _build_hvp(problem)
        self.batched = problem.batched
        self.in_shape = problem.in_shape
        self.matvecs = 0
        n = problem.n
        self.shape = (problem.batch, n, n) if self.batched else (n, n)
        self.dtype = problem.x.dtype
        self.device = problem.x.device

    @property
    def n(self) -> int:
        """Number of input entries per sample."""
        return self._problem.n

    @property
    def batch(self) -> int:
        """Number of samples ``B`` (1 when not batched)."""
        return self._problem.batch

    def __repr__(self) -> str:
        return (
            f"HessianOperator(shape={self.shape}, dtype={self.dtype}, device={self.device}, "
            f"via {self.how})"
        )

    def _check(self, v: object, name: str, columns: bool) -> torch.Tensor:
        lead = (self.batch,) if self.batched else ()
        want = (*lead, self.n, "k") if columns else (*lead, self.n)
        ok = isinstance(v, torch.Tensor) and v.is_floating_point()
        if ok:
            ok = v.dim() == len(want) and tuple(v.shape[: len(lead) + 1]) == (*lead, self.n)
        if not ok:
            got = f"shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
            raise UnsupportedInputError(
                f"{self._api}: {name} expects a real floating tensor of shape "
                f"{want} (n = {self.n} entries of one sample's input, flattened), got {got}. "
                "Flatten per sample, e.g. v.reshape(" + ("B, -1" if self.batched else "-1") + ")."
            )
        if not bool(torch.isfinite(v).all()):
            raise NonFiniteError(f"{self._api}: {name} got NaN/Inf entries; pass finite vectors.")
        return v.to(device=self.device, dtype=self.dtype)

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        """Unchecked batched products: ``(B, n, k)`` to ``(B, n, k)`` (``B = 1`` unbatched)."""
        with CALLS:  # torch.func's levels are process-wide: one hesse call at a time
            self.matvecs += V.shape[-1]
            return self._hvps(V.permute(2, 0, 1)).permute(1, 2, 0)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v``: ``(n,)`` to ``(n,)``, or ``(B, n)`` to ``(B, n)`` when batched."""
        v = self._check(v, "matvec", columns=False)
        V = v.reshape(self.batch, self.n, 1)
        return self.apply(V).reshape(v.shape)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H V``: ``(n, k)`` to ``(n, k)``, or ``(B, n, k)`` to ``(B, n, k)`` when batched."""
        V = self._check(V, "matmat", columns=True)
        return self.apply(V.reshape(self.batch, self.n, V.shape[-1])).reshape(V.shape)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        lead = 1 if self.batched else 0
        if isinstance(v, torch.Tensor) and v.dim() == lead + 2:
            return self.matmat(v)
        return self.matvec(v)

    def eigs(
        self,
        k: int,
        *,
        which: str = "LA",
        tol: float = 1e-6,
        max_iter: int | None = None,
        ncv: int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``k`` eigenpairs of this operator; see :func:`hesse.hessian_eigs` for the rest."""
        from .spectral import _eigs

        return _eigs(self, k, which, tol, max_iter, ncv, generator, self._api)

    def to_scipy(self):
        """A :class:`scipy.sparse.linalg.LinearOperator` of one sample's Hessian.

        It takes and returns float64 numpy arrays (computing in this operator's dtype)
        and is symmetric, so ``rmatvec`` is ``matvec``. Needs scipy
        (``pip install 'hesse[curvature]'``).

        Raises:
            UnsupportedInputError: The operator is batched (take one sample first).
            ImportError: scipy is not installed.
        """
        if self.batched and self.batch != 1:
            raise UnsupportedInputError(
                f"{self._api}: to_scipy() wraps one sample's Hessian, but this operator holds "
                f"B={self.batch} samples. Build one with hesse.hessian_operator(f, x[b]) "
                "(batched=False) for the sample you want."
            )
        try:
            from scipy.sparse.linalg import LinearOperator
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"{self._api}: to_scipy() needs scipy; pip install 'hesse[curvature]'"
            ) from exc
        import numpy as np

        def mm(X):
            X = np.asarray(X, dtype=np.float64)
            cols = X.reshape(self.n, -1)
            t = torch.from_numpy(np.ascontiguousarray(cols)).to(self.device, self.dtype)
            out = self.apply(t.unsqueeze(0))[0]
            return out.detach().cpu().double().numpy().reshape(X.shape)

        return LinearOperator(
            (self.n, self.n), matvec=mm, rmatvec=mm, matmat=mm, rmatmat=mm, dtype=np.float64
        )


def hessian_operator(
    f: Fn, x: torch.Tensor, *, output: Selection = None, batched: bool = False
) -> HessianOperator:
    """The input Hessian of one scalar output as an operator, without forming ``H``.

    The forward pass and the gradient are computed once; each product is one pass
    backwards through the saved gradient graph (reverse-over-reverse), all columns of
    ``V`` vectorised in one pass, and with ``batched=True`` all ``B`` samples too.

    Args:
        f: Function or ``nn.Module`` taking one tensor and returning one tensor.
        x: Input, shape ``S`` (``n`` entries), or ``(B, *S)`` with ``batched=True``.
        output: One scalar output per sample: an int (flat index into the per-sample
            output) or a tuple index; ``None`` only when the output has one element.
        batched: The first dimension of ``x`` holds independent samples.

    Returns:
        A :class:`HessianOperator` of shape ``(n, n)`` (or ``(B, n, n)``).

    Raises:
        OutputSelectionError: ``output`` selects more or less than one scalar.
        UnsupportedInputError: Bad ``x`` (see :func:`hesse.hessian`).

    >>> import torch, hesse
    >>> op = hesse.hessian_operator(lambda x: (x**3).sum(), torch.tensor([1.0, 2.0]))
    >>> op @ torch.ones(2)
    tensor([ 6., 12.])
    """
    api = "hesse.hessian_operator"
    return HessianOperator(scalar_problem(api, f, x, output, batched), api)
