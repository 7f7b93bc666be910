"""Helpers shared by the tests of the BN-type layers of bncorrect.nn (float64 throughout)."""

from __future__ import annotations

import torch
from torch import nn


def randomize_bn(m: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded weight in [0.5, 1.5), bias ~ N(0, 1), running mean ~ N(0, 1), running var in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    c = m.num_features
    with torch.no_grad():
        m.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
        m.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        m.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        m.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
    return m


def forward_backward(module: nn.Module, x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Output and the gradients of sum(y * r) w.r.t. x, weight and bias."""
    module.zero_grad()
    x = x.clone().requires_grad_(True)
    y = module(x)
    (y * r).sum().backward()
    return y.detach(), x.grad, module.weight.grad.clone(), module.bias.grad.clone()
