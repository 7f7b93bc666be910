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


class FrozenBatchNorm2d(nn.Module):
    """A mirror of torchvision.ops.FrozenBatchNorm2d (BN-like, not a _BatchNorm subclass): the backbone norm
    of every torchvision detection model."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)


class BatchNormAct2d(nn.BatchNorm2d):
    """A mirror of timm's BatchNormAct2d: a BatchNorm2d subclass whose forward applies an activation."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__(num_features, eps=eps)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps
        )
        return self.act(x)


def _init_frozen(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            c = m.weight.numel()
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model


def frozen_backbone(seed: int = 0) -> nn.Module:
    """Conv-FrozenBN-ReLU x2 (a detection backbone's norm), then Conv-BatchNormAct2d, pooling, Linear:
    input (N, 3, 8, 8), 5 outputs."""
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        FrozenBatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, bias=False),
        FrozenBatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, bias=False),
        BatchNormAct2d(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    return _init_frozen(_init(model, seed), seed)


class TinyDetector(nn.Module):
    """Returns a list with one dict per image, like torchvision detection models in eval mode."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.backbone = frozen_backbone(seed)[:8]
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        boxes = self.head(self.backbone(x)).flatten(2).transpose(1, 2)  # (N, positions, 4)
        return [{"boxes": b, "scores": b.sum(-1).sigmoid()} for b in boxes]


def tiny_detector(seed: int = 0) -> nn.Module:
    return TinyDetector(seed).eval()


class TwoInputNet(nn.Module):
    """forward(image, extra): needs a forward_fn to be run over dict batches."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.body = conv_net(seed)

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        return self.body(image) + extra


TIMM_CFG = {
    "architecture": "cfg_net",
    "input_size": (3, 8, 8),
    "crop_pct": 0.8,
    "crop_mode": "center",
    "interpolation": "bicubic",
    "mean": (0.5, 0.4, 0.3),
    "std": (0.2, 0.25, 0.3),
}


def cfg_net(seed: int = 0) -> nn.Module:
    """conv_net carrying a timm-style ``pretrained_cfg`` (what timm.create_model attaches)."""
    model = conv_net(seed)
    model.pretrained_cfg = dict(TIMM_CFG)
    return model


class _Interpolation:
    """Like torchvision's InterpolationMode member: ``.value`` is the name."""

    value = "bilinear"


class _ImageClassification:
    """The attributes of torchvision.transforms._presets.ImageClassification that bncorrect reads."""

    def __init__(self) -> None:
        self.resize_size = [10]
        self.crop_size = [8]
        self.mean = [0.485, 0.456, 0.406]
        self.std = [0.229, 0.224, 0.225]
        self.interpolation = _Interpolation()


class _Weights:
    """Like a torchvision weights enum member (``ResNet50_Weights.IMAGENET1K_V2``)."""

    def transforms(self) -> _ImageClassification:
        return _ImageClassification()


WEIGHTS = _Weights()


def seg_net(seed: int = 0, classes: int = 4) -> nn.Module:
    """A tiny segmentation net: Conv-BN-ReLU x2, a 1x1 convolution to per-pixel logits (N, classes, H, W)
    at the input's size: input (N, 3, H, W)."""
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, classes, 1),
    )
    return _init(model, seed)


class SegDictNet(nn.Module):
    """Returns ``{"out": logits, "aux": logits}`` as torchvision segmentation models do (needs
    ``output_key="out"``)."""

    def __init__(self, seed: int = 0, classes: int = 4) -> None:
        super().__init__()
        self.body = seg_net(seed, classes)[:6]
        self.classifier = nn.Conv2d(6, classes, 1)
        self.aux = nn.Conv2d(6, classes, 1)
        _init(nn.ModuleList([self.classifier, self.aux]), seed + 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {"out": self.classifier(h), "aux": self.aux(h)}


def seg_dict_net(seed: int = 0) -> nn.Module:
    return SegDictNet(seed).eval()


def seg_data(
    n: int, size: int = 8, seed: int = 0, classes: int = 4, ignore: int = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (n, 3, size, size) and masks (n, size, size) of classes 0..classes-1 that depend on the
    input, with the first row and about 10% of the other pixels marked ``ignore``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g) * 1.5 + 0.3
    y = ((x[:, 0] > 0).long() + 2 * (x[:, 1] > 0.5).long()) % classes
    flip = torch.rand(n, size, size, generator=g) < 0.3
    y = torch.where(flip, torch.randint(0, classes, (n, size, size), generator=g), y)
    y[:, 0, :] = ignore
    y[torch.rand(n, size, size, generator=g) < 0.1] = ignore
    return x, y
