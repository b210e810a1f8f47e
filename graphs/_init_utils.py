"""Shared helpers for building reference models with realistic, deterministic weights."""

from __future__ import annotations

import torch
from torch import nn


def randomize_norm_stats(model: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm non-trivial running stats and affine params, then eval()."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                m.weight.copy_(torch.rand(m.normalized_shape, generator=gen) * 0.5 + 0.75)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.normalized_shape, generator=gen) * 0.1)
    return model.eval()
