"""hessQuik peers (optional): its own layers, forward and backward mode, on MLP cases.

The torch MLP ``x -> W x + b`` maps onto ``hessQuik.layers.singleLayer`` (``x K + b`` with
``K = W^T``) with hessQuik's own activation classes; the selected outputs are kept by
slicing the last layer (same function). hessQuik returns ``(f, df, d2f)`` with ``d2f`` of
shape ``(B, n, n, m)`` (Hessian) or ``(B, 1, m)`` (``do_Laplacian`` in forward mode).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..cases import Instance, mlp_layers
from . import Method, MissingDependency, Prepared, Unsupported, register
from .torch_peers import finish


@functools.cache
def _hq() -> Any:
    try:
        import hessQuik.activations as act
        import hessQuik.layers as lay
        import hessQuik.networks as net
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise MissingDependency("hessQuik is not installed (pip install hessquik)") from err
    return act, lay, net


def build_network(inst: Instance) -> Any:
    """The case's MLP as a ``hessQuik.networks.NN`` with the same weights (frozen).

    Raises:
        Unsupported: For a model its layers cannot express (CNN, pairwise features).
    """
    if inst.case.family != "mlp":
        raise Unsupported(f"hessQuik layers cannot express the {inst.case.family} model")
    act, lay, net = _hq()
    activation = {"tanh": act.tanhActivation, "softplus": act.softplusActivation}
    layers = mlp_layers(inst)
    out = inst.case.output
    keep = slice(None) if out is None else ([out] if isinstance(out, int) else list(out))
    blocks = []
    for i, (w, b) in enumerate(layers):
        last = i == len(layers) - 1
        w, b = (w[keep], b[keep]) if last else (w, b)
        sigma = act.identityActivation() if last else activation[inst.case.config["act"]]()
        layer = lay.singleLayer(w.shape[1], w.shape[0], act=sigma, dtype=inst.dtype)
        with torch.no_grad():
            layer.K.copy_(torch.from_numpy(w).T)
            layer.b.copy_(torch.from_numpy(b))
        blocks.append(layer)
    return net.NN(*blocks).requires_grad_(False)


FORWARD_LIMIT_BYTES = 2 * 2**30


def _mode(forward: bool):
    def prepare(inst: Instance) -> Prepared:
        network = build_network(inst)
        x = inst.x if inst.case.batched else inst.x.unsqueeze(0)
        laplacian = forward and inst.case.quantity == "laplacian"
        if forward and not laplacian:
            # forward mode carries a (B, n, n, width) second-order tensor per layer
            width = max(inst.case.config.get("sizes", (256,))[1:])
            need = inst.case.samples * inst.case.n**2 * width * x.element_size()
            if need > FORWARD_LIMIT_BYTES:
                raise Unsupported(
                    f"forward mode would hold {need / 2**30:.1f} GiB per layer "
                    f"(B n^2 width); over the {FORWARD_LIMIT_BYTES / 2**30:.0f} GiB limit"
                )

        def run() -> torch.Tensor:
            _, _, d2f = network(
                x,
                do_gradient=True,
                do_Hessian=not laplacian,
                do_Laplacian=laplacian,
                forward_mode=forward,
            )
            if laplacian:  # (B, 1, m) -> [B] + [m]
                return d2f.reshape(inst.case.lead_shape)
            return finish(inst, d2f.movedim(-1, 1))  # (B, m, n, n)

        return run

    return prepare


register(
    Method(
        "hessquik_fwd",
        "hessQuik forward mode (do_Laplacian for Laplacians)",
        "hessQuik",
        _mode(forward=True),
        slow=True,
    )
)
register(
    Method("hessquik_bwd", "hessQuik backward mode", "hessQuik", _mode(forward=False), slow=True)
)
