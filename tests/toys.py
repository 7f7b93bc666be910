"""Tiny models built in code for the tests (also usable as --arch tests/toys.py:NAME)."""

from __future__ import annotations

import torch
from torch import nn


def _init(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def conv_net(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    """Conv-BN-ReLU x2, pooling, Linear, BatchNorm1d on (N, C): input (N, 3, 8, 8), 5 outputs."""
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Conv2d(6, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
        nn.BatchNorm1d(5),
    )
    return _init(model, seed)


def conv1d_net(seed: int = 0) -> nn.Module:
    """Conv1d-BN1d-ReLU, pooling, Linear: input (N, 2, 16), 4 outputs."""
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1),
        nn.BatchNorm1d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(4, 4),
    )
    return _init(model, seed)


def no_bn_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)
    )


def data(
    n: int, shape: tuple[int, ...] = (3, 8, 8), seed: int = 0, classes: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g) * 1.5 + 0.3
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y
