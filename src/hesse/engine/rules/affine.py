"""Affine layers: Linear and Conv1d/2d/3d move tangents with their weights, no bias.

They contribute no second-order term. Tangents ``(d, *a.shape)`` go through the layer as
``d`` extra samples: one GEMM or one convolution for all directions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Rule, Site, batch_major


class LinearRule(Rule):
    """``F.linear`` (``nn.Linear``) with a constant weight: ``J_y = J_a W^T``."""

    name = "linear"
    linear = True

    def __init__(self, node: object = None):
        pass

    def tangent(self, site: Site) -> torch.Tensor:
        """``F.linear(J, W)`` over all directions at once (``W^T`` itself for ``J = I``)."""
        if site.positions != (0,) or site.state is None:
            return super().tangent(site)
        (t,), w = site.tangents, site.state
        a = site.inputs[0]
        if site.identity and a.dim() <= 2 and a.shape[-1] == t.shape[0]:
            if a.dim() == 1:
                return w.t().contiguous()
            return w.t().expand(a.shape[0], *w.t().shape).contiguous().transpose(0, 1)
        behind = batch_major(t)
        if behind is not None:
            return F.linear(behind, w).transpose(0, 1)
        return F.linear(t, w)

    def transpose(self, site: Site, gdot: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``gdot W`` for every direction."""
        if site.positions != (0,) or site.state is None:
            return super().transpose(site, gdot)
        return (gdot @ site.state,)

    def prepare(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The call's weight (used when the only varying input is the first)."""
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        return weight if isinstance(weight, torch.Tensor) else None


class ConvRule(Rule):
    """``F.conv1d/2d/3d`` (``nn.Conv*``): any stride, padding, dilation and groups.

    Padding modes other than zeros reach the graph as an explicit ``F.pad`` before the
    convolution, so the convolution itself always pads with zeros (or not at all).
    """

    name = "conv"
    linear = True

    def __init__(self, node: object = None):
        pass

    @staticmethod
    def _options(site: Site) -> dict | None:
        """Weight, stride, padding, dilation and groups of the call, if only ``x`` varies."""
        if site.positions != (0,) or site.state is None:
            return None
        return site.state

    def tangent(self, site: Site) -> torch.Tensor:
        """The convolution without bias applied to all ``d`` directions as one batch."""
        opts = self._options(site)
        if opts is None:
            return super().tangent(site)
        (t,) = site.tangents
        spatial = opts["weight"].dim() - 2
        conv = _CONV[spatial]
        args = (opts["weight"], None, opts["stride"], opts["padding"], opts["dilation"])
        a = site.inputs[0]
        per_image = a.shape[-(spatial + 1) :]
        behind = batch_major(t) if a.dim() == spatial + 2 else None
        if behind is not None:  # (B, d, C, ...) contiguous: convolve B * d images
            out = conv(behind.reshape(-1, *per_image), *args, opts["groups"])
            return out.reshape(a.shape[0], t.shape[0], *site.output.shape[1:]).transpose(0, 1)
        out = conv(t.reshape(-1, *per_image), *args, opts["groups"])
        return out.reshape(t.shape[0], *site.output.shape)

    def transpose(self, site: Site, gdot: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The transposed convolution of every direction as one batch."""
        opts = self._options(site)
        if opts is None or isinstance(opts["padding"], str):
            return super().transpose(site, gdot)
        weight = opts["weight"]
        spatial = weight.dim() - 2
        a = site.inputs[0]
        per_image = a.shape[-(spatial + 1) :]
        grads = gdot.reshape(-1, *site.output.shape[-(spatial + 1) :])
        if grads.device.type == "cpu" and grads.dtype in _ONEDNN_DTYPES:
            out = _onednn_transpose(grads, per_image, opts)
        else:  # CPU float64: the transposed convolution's own kernel is 2-7x slower
            shape = grads.new_empty((grads.shape[0], *per_image))  # only its shape is read
            out = torch.ops.aten.convolution_backward(
                grads,
                shape,
                weight,
                None,
                _tuple(opts["stride"], spatial),
                _tuple(opts["padding"], spatial),
                _tuple(opts["dilation"], spatial),
                False,
                (0,) * spatial,
                opts["groups"],
                (True, False, False),
            )[0]
        return (out.reshape(gdot.shape[0], *a.shape),)

    def prepare(self, args: tuple, kwargs: dict) -> dict:
        """The call's options from its arguments ``(x, weight, bias, stride, ...)``."""
        names = ("weight", "bias", "stride", "padding", "dilation", "groups")
        opts: dict = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}
        opts.update(zip(names, args[1:], strict=False))
        opts.update({k: v for k, v in kwargs.items() if k in names})
        return opts


def _tuple(value: int | tuple | list, spatial: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * spatial


def _onednn_transpose(grads: torch.Tensor, per_image: torch.Size, opts: dict) -> torch.Tensor:
    """``conv_transposeNd`` of ``grads`` ``(N, C_out, ...)``: ``(N, *per_image)``."""
    weight = opts["weight"]
    spatial = weight.dim() - 2
    stride, padding = _tuple(opts["stride"], spatial), _tuple(opts["padding"], spatial)
    dilation = _tuple(opts["dilation"], spatial)
    extra = tuple(
        a_len - ((o_len - 1) * st - 2 * p + dl * (k - 1) + 1)
        for a_len, o_len, st, p, dl, k in zip(
            per_image[1:], grads.shape[2:], stride, padding, dilation, weight.shape[2:], strict=True
        )
    )
    if spatial == 2:  # oneDNN's transposed convolution is fastest in channels-last
        grads = grads.contiguous(memory_format=torch.channels_last)
    return _CONV_TRANSPOSE[spatial](
        grads,
        weight,
        stride=stride,
        padding=padding,
        output_padding=extra,
        groups=opts["groups"],
        dilation=dilation,
    )


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
# dtypes of oneDNN's CPU convolutions (conv_transpose is then fast); others take the
# convolution's own backward kernel (im2col GEMM), like autograd does
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
