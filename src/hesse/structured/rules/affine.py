"""Affine layers: Linear and Conv1d/2d/3d move tangents with their weights, no bias.

They contribute no second-order term. Tangents ``(d, *a.shape)`` go through the layer as
``d`` extra samples: one GEMM or one convolution for all directions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Rule, Site


class LinearRule(Rule):
    """``nn.Linear`` and ``F.linear`` with a constant weight: ``J_y = J_a W^T``."""

    name = "linear"
    linear = True

    def __init__(self, module: nn.Linear | None = None):
        self.module = module

    def tangent(self, site: Site) -> torch.Tensor:
        """``F.linear(J, W)`` over all directions at once."""
        if len(site.tangents) != 1 or site.state is None:
            return super().tangent(site)
        return F.linear(site.tangents[0], site.state)

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
        per_image = site.inputs[0].shape[-(spatial + 1) :]
        out = self.module._conv_forward(t.reshape(-1, *per_image), self.module.weight, None)
        return out.reshape(t.shape[0], *site.output.shape)
