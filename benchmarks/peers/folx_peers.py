"""JAX PINN peers (optional): folx's forward Laplacian, and jvp-of-jvp training steps.

- ``folx_lap``: ``folx.forward_laplacian`` (value, Jacobian and Laplacian pushed forward
  together, dense: ``sparsity_threshold=0``), ``vmap`` over samples, ``jit``; Laplacians
  and training steps (``jax.grad`` of ``mean(lap^2)`` with respect to the weights).
- ``jax_jvp_jvp_train``: the same training step on the jvp-of-jvp Laplacian.

XLA gets the thread count of torch through ``benchmarks.machine.set_peer_threads`` (set
before JAX starts). Weights come from the case (:attr:`Instance.weights`), gradients are
flattened in torch's parameter order (per layer the weight ``(out, in)``, then the bias).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from ..cases import Instance
from . import Method, MissingDependency, Prepared, Unsupported, register
from .jax_peers import MODELS, Params, _jax, _jvp_jvp

LAP_TRAIN = ("laplacian", "laplacian_train")


@functools.cache
def _folx() -> Any:
    _jax()
    try:
        import folx
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise MissingDependency("folx is not installed (pip install 'hesse[bench]')") from err
    return folx


def _lap_folx(f: Callable[[Any], Any], xs: Any) -> Any:
    return _folx().forward_laplacian(f, sparsity_threshold=0)(xs).laplacian


def _lap_jvp_jvp(f: Callable[[Any], Any], xs: Any) -> Any:
    jax = _jax()
    eye = jax.numpy.eye(xs.shape[0], dtype=xs.dtype)
    return jax.vmap(lambda e: _jvp_jvp(f, xs, e))(eye).sum(0)


def _laplacian_method(lap: Callable[[Callable[[Any], Any], Any], Any]):
    """Eval (``laplacian``) or training step (``laplacian_train``) on a per-sample ``lap``."""

    def prepare(inst: Instance) -> Prepared:
        if inst.case.family != "mlp" or not inst.case.batched or inst.case.n_outputs != 1:
            raise Unsupported("written for batched MLP cases with one selected output")
        jax = _jax()
        jnp = jax.numpy
        params, f = MODELS["mlp"](inst)
        x = jnp.asarray(inst.x.numpy())

        def laps(p: Params, xb: Any) -> Any:  # (B,)
            return jax.vmap(lambda xs: lap(lambda z: f(p, z), xs))(xb)

        if inst.case.quantity == "laplacian":
            fn = jax.jit(laps)
            return lambda: fn(params, x).block_until_ready()

        def loss(p: Params) -> Any:
            return jnp.mean(laps(p, x) ** 2)

        @jax.jit
        def grads(p: Params) -> Any:
            g = jax.grad(loss)(p)["layers"]
            return jnp.concatenate([t.reshape(-1) for wb in g for t in wb])

        return lambda: grads(params).block_until_ready()

    return prepare


register(
    Method(
        "folx_lap",
        "folx.forward_laplacian (JAX, jit, dense), vmap over samples",
        "jax",
        _laplacian_method(_lap_folx),
        quantities=LAP_TRAIN,
    )
)
register(
    Method(
        "jax_jvp_jvp_train",
        "JAX jit jvp of jvp per direction (training step: jax.grad to the weights)",
        "jax",
        _laplacian_method(_lap_jvp_jvp),
        quantities=("laplacian_train",),
    )
)
