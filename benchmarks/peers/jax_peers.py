"""JAX peers (optional): ``jax.jit(jax.hessian)`` with ``vmap``, and for diagonals and
Laplacians ``jvp`` of ``jvp`` and ``jax.experimental.jet``.

JAX is imported on first use, configured for the CPU with 64-bit floats enabled (arrays
keep the dtype of the numpy weights, so float32 cases stay float32). The models are
re-written in ``jax.numpy`` from the same weights (:attr:`Instance.weights`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from ..cases import Instance, mlp_layers
from . import Method, MissingDependency, Prepared, Unsupported, register

Params = dict[str, Any]


@functools.cache
def _jax() -> Any:
    try:
        import jax
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise MissingDependency("jax is not installed (pip install 'hesse[bench]')") from err
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_enable_x64", True)
    return jax


def _select(inst: Instance, y: Any) -> Any:
    out = inst.case.output
    if out is None:
        return y.reshape(-1) if y.ndim > 0 else y
    flat = y.reshape(-1)
    return flat[out] if isinstance(out, int) else flat[list(out)]


# --------------------------------------------------------------------------------------
# The models in jax.numpy: family -> (params, per-sample function (params, S) -> Q)
# --------------------------------------------------------------------------------------


def _mlp(inst: Instance) -> tuple[Params, Callable[[Params, Any], Any]]:
    jnp = _jax().numpy
    act = {"tanh": jnp.tanh, "softplus": _jax().nn.softplus}[inst.case.config["act"]]
    params = {"layers": [(jnp.asarray(w), jnp.asarray(b)) for w, b in mlp_layers(inst)]}

    def f(p: Params, xs: Any) -> Any:
        *hidden, (w_out, b_out) = p["layers"]
        for w, b in hidden:
            xs = act(w @ xs + b)
        return _select(inst, w_out @ xs + b_out)

    return params, f


def _cnn(inst: Instance) -> tuple[Params, Callable[[Params, Any], Any]]:
    jax = _jax()
    jnp = jax.numpy
    params = {k: jnp.asarray(v) for k, v in inst.weights.items()}

    def conv(h: Any, w: Any, b: Any, stride: int) -> Any:
        out = jax.lax.conv_general_dilated(
            h[None], w, (stride, stride), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW")
        )
        return out[0] + b[:, None, None]

    def f(p: Params, xs: Any) -> Any:
        h = jnp.tanh(conv(xs, p["conv1.weight"], p["conv1.bias"], 1))
        h = jnp.tanh(conv(h, p["conv2.weight"], p["conv2.bias"], 2))
        return _select(inst, p["head.weight"] @ h.reshape(-1) + p["head.bias"])

    return params, f


def _atoms(inst: Instance) -> tuple[Params, Callable[[Params, Any], Any]]:
    jnp = _jax().numpy
    params = {k: jnp.asarray(v) for k, v in inst.weights.items()}
    eta = inst.model.eta
    linears = [k[: -len(".weight")] for k in inst.weights if k.startswith("mlp.") and "weight" in k]

    def f(p: Params, xs: Any) -> Any:
        diff = xs[:, None, :] - xs[None, :, :]
        r = jnp.sqrt((diff**2).sum(-1) + (1.0 - p["offdiag"]))
        phi = jnp.exp(-eta * (r[..., None] - p["mu"]) ** 2)
        h = (phi * p["offdiag"][..., None]).sum(-2)  # (N, K)
        for i, name in enumerate(linears):
            h = h @ p[f"{name}.weight"].T + p[f"{name}.bias"]
            h = jnp.tanh(h) if i < len(linears) - 1 else h
        return _select(inst, h.squeeze(-1).sum())

    return params, f


MODELS: dict[str, Callable[[Instance], tuple[Params, Callable[[Params, Any], Any]]]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "atoms": _atoms,
}


# --------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------


def _compile(inst: Instance, per_sample: Callable[[Params, Any], Any]) -> Prepared:
    """jit(vmap over samples) of ``per_sample(params, xs)``, called on the case input."""
    jax = _jax()
    params, _ = MODELS[inst.case.family](inst)
    fn = jax.vmap(per_sample, in_axes=(None, 0)) if inst.case.batched else per_sample
    fn = jax.jit(fn)
    x = jax.numpy.asarray(inst.x.numpy())
    return lambda: fn(params, x).block_until_ready()


def _reduce_hessian(inst: Instance, h: Any) -> Any:
    jnp = _jax().numpy
    n = inst.case.n
    h = h.reshape(*inst.case.lead_shape[1 if inst.case.batched else 0 :], n, n)
    if inst.case.quantity == "hessian":
        return h
    d = jnp.diagonal(h, axis1=-2, axis2=-1)
    return d.sum(-1) if inst.case.quantity == "laplacian" else d


def _hessian(inst: Instance) -> Prepared:
    jax = _jax()
    _, f = MODELS[inst.case.family](inst)
    h = jax.hessian(f, argnums=1)
    return _compile(inst, lambda p, xs: _reduce_hessian(inst, h(p, xs)))


def _directional(
    second: Callable[[Callable[[Any], Any], Any, Any], Any],
    unsupported: frozenset[str] = frozenset(),
):
    """Diagonal / Laplacian from ``second(g, xs, e) = e^T H e`` along every unit vector.

    ``unsupported``: activations the transform has no rule for.
    """

    def prepare(inst: Instance) -> Prepared:
        if inst.case.quantity == "hessian":
            raise Unsupported("second directional derivatives give the diagonal / Laplacian")
        if inst.case.config.get("act") in unsupported:
            raise Unsupported(f"no rule for {inst.case.config['act']} (custom_jvp logaddexp)")
        jax = _jax()
        jnp = jax.numpy
        _, f = MODELS[inst.case.family](inst)
        n = inst.case.n

        def per_sample(p: Params, xs: Any) -> Any:
            eye = jnp.eye(n, dtype=xs.dtype).reshape(n, *xs.shape)
            t = jax.vmap(lambda e: second(lambda z: f(p, z), xs, e))(eye)  # (n,) + Q
            t = jnp.moveaxis(t, 0, -1)
            return t.sum(-1) if inst.case.quantity == "laplacian" else t

        return _compile(inst, per_sample)

    return prepare


def _jvp_jvp(g: Callable[[Any], Any], xs: Any, e: Any) -> Any:
    jax = _jax()
    return jax.jvp(lambda z: jax.jvp(g, (z,), (e,))[1], (xs,), (e,))[1]


def _jet(g: Callable[[Any], Any], xs: Any, e: Any) -> Any:
    """``e^T H e`` as the second Taylor coefficient (``jet`` scales by the factorial)."""
    from jax.experimental.jet import jet

    _, (_, second) = jet(g, (xs,), ((e, _jax().numpy.zeros_like(e)),))
    return second


register(Method("jax_hessian", "jax.jit(jax.hessian), vmap over samples", "jax", _hessian))
register(
    Method("jax_jvp_jvp", "jax.jit jvp of jvp, vmap over directions", "jax", _directional(_jvp_jvp))
)
register(
    Method(
        "jax_jet",
        "jax.jit jax.experimental.jet, vmap over directions",
        "jax",
        _directional(_jet, frozenset({"softplus"})),
    )
)
