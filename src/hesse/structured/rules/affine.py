"""Affine layers: Linear and Conv1d/2d/3d move tangents with their weights, no bias.

They contribute no second-order term. Tangents ``(d, *a.shape)`` go through the layer as
``d`` extra samples: one GEMM or one convolution for all directions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Rule, Site, batch_major


class LinearRule(Rule):
    """``nn.Linear`` and ``F.linear`` with a constant weight: ``J_y = J_a W^T``."""

    name = "linear"
    linear = True

    def __init__(self, module: nn.Linear | None = None):
        self.module = module

    def tangent(self, site: Site) -> torch.Tensor:
        """``F.linear(J, W)`` over all directions at once (``W^T`` itself for ``J = I``)."""
        if len(site.tangents) != 1 or site.state is None:
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
        if len(site.positions) != 1 or site.state is None:
            return super().transpose(site, gdot)
        return (gdot @ site.state,)

    def weight(self, site_args: tuple) -> torch.Tensor | None:
        """The constant weight of this call, if the only varying input is the first."""
        if self.module is not None:
            return self.module.weight
        return site_args[1] if len(site_args) > 1 else None


class ConvRule(Rule):
    """``nn.Conv1d/2d/3d`` (any stride, padding, dilation, groups, padding mode)."""

    name = "conv"
    linear = True

    def __init__(self, module: nn.modules.conv._ConvNd):
        self.module = module

    def tangent(self, site: Site) -> torch.Tensor:
        """The convolution without bias applied to all ``d`` directions as one batch."""
        (t,) = site.tangents
        spatial = len(self.module.kernel_size)
        a = site.inputs[0]
        per_image = a.shape[-(spatial + 1) :]
        behind = batch_major(t) if a.dim() == spatial + 2 else None
        if behind is not None:  # (B, d, C, ...) contiguous: convolve B * d images
            out = self.module._conv_forward(
                behind.reshape(-1, *per_image), self.module.weight, None
            )
            return out.reshape(a.shape[0], t.shape[0], *site.output.shape[1:]).transpose(0, 1)
        out = self.module._conv_forward(t.reshape(-1, *per_image), self.module.weight, None)
        return out.reshape(t.shape[0], *site.output.shape)

    def transpose(self, site: Site, gdot: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The transposed convolution of every direction as one batch."""
        mod = self.module
        spatial = len(mod.kernel_size)
        if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            return super().transpose(site, gdot)
        a = site.inputs[0]
        per_image = a.shape[-(spatial + 1) :]
        grads = gdot.reshape(-1, *site.output.shape[-(spatial + 1) :])
        if grads.device.type == "cpu" and grads.dtype in _ONEDNN_DTYPES:
            out = self._onednn_transpose(grads, per_image)
        else:  # CPU float64: the transposed convolution's own kernel is 2-7x slower
            shape = grads.new_empty((grads.shape[0], *per_image))  # only its shape is read
            out = torch.ops.aten.convolution_backward(
                grads,
                shape,
                mod.weight,
                None,
                mod.stride,
                mod.padding,
                mod.dilation,
                False,
                (0,) * spatial,
                mod.groups,
                (True, False, False),
            )[0]
        return (out.reshape(gdot.shape[0], *a.shape),)

    def _onednn_transpose(self, grads: torch.Tensor, per_image: torch.Size) -> torch.Tensor:
        """``conv_transposeNd`` of ``grads`` ``(N, C_out, ...)``: ``(N, *per_image)``."""
        mod = self.module
        spatial = len(mod.kernel_size)
        extra = tuple(
            a_len - ((o_len - 1) * st - 2 * p + dl * (k - 1) + 1)
            for a_len, o_len, st, p, dl, k in zip(
                per_image[1:],
                grads.shape[2:],
                mod.stride,
                mod.padding,
                mod.dilation,
                mod.kernel_size,
                strict=True,
            )
        )
        if spatial == 2:  # oneDNN's transposed convolution is fastest in channels-last
            grads = grads.contiguous(memory_format=torch.channels_last)
        return _CONV_TRANSPOSE[spatial](
            grads,
            mod.weight,
            stride=mod.stride,
            padding=mod.padding,
            output_padding=extra,
            groups=mod.groups,
            dilation=mod.dilation,
        )


_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
# dtypes of oneDNN's CPU convolutions (conv_transpose is then fast); others take the
# convolution's own backward kernel (im2col GEMM), like autograd does
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
