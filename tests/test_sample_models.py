"""The sample architectures and the committed sample checkpoints in ``sample_checkpoints/``."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bncorrect.sample_models import digits_cnn, mnist1d_cnn

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_checkpoints"
NAMES = ["digits_b2", "digits_b32", "mnist1d_b2", "mnist1d_b32"]
CHECKPOINT_KEYS = {"format", "arch", "arch_kwargs", "state_dict", "corrections", "meta"}


def _factory(arch: str) -> nn.Module:
    module_name, _, attr = arch.partition(":")
    return getattr(importlib.import_module(module_name), attr)()


def _bn_types(model: nn.Module) -> set[type[nn.Module]]:
    return {type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


@pytest.mark.parametrize(
    ("factory", "shape"), [(digits_cnn, (5, 1, 8, 8)), (mnist1d_cnn, (5, 1, 40))], ids=["digits", "mnist1d"]
)
def test_factory_forward_shapes(factory: object, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = factory()  # type: ignore[operator]
    x = torch.randn(shape)
    model.train()
    assert model(x).shape == (shape[0], 10)
    model.eval()
    out = model(x)
    assert out.shape == (shape[0], 10)
    assert torch.isfinite(out).all()


def test_digits_cnn_has_rank2_bn_and_dropout() -> None:
    model = digits_cnn()
    assert _bn_types(model) == {nn.BatchNorm2d, nn.BatchNorm1d}
    assert any(isinstance(m, nn.Dropout) for m in model.modules())
    seen: list[int] = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].dim()))
        for m in model.modules()
        if isinstance(m, nn.BatchNorm1d)
    ]
    model.eval()
    model(torch.randn(3, 1, 8, 8))
    for h in hooks:
        h.remove()
    assert seen == [2]  # the BatchNorm1d sees (N, C) features


def test_mnist1d_cnn_bn_types() -> None:
    assert _bn_types(mnist1d_cnn()) == {nn.BatchNorm1d}


@pytest.mark.parametrize("name", NAMES)
def test_committed_sample(name: str) -> None:
    folder = SAMPLES / name
    assert sum(p.stat().st_size for p in folder.iterdir()) < 2 * 1024 * 1024

    ckpt = torch.load(folder / "model.pt", weights_only=True, map_location="cpu")
    assert set(ckpt) == CHECKPOINT_KEYS
    assert ckpt["format"] == "bncorrect/checkpoint-1"
    assert ckpt["arch_kwargs"] == {} and ckpt["corrections"] == {}
    B = int(name.rsplit("_b", 1)[1])
    assert ckpt["meta"]["train_batch_size"] == B
    assert ckpt["meta"]["seed"] == 0
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in ckpt["state_dict"].values())

    model = _factory(ckpt["arch"])
    model.load_state_dict(ckpt["state_dict"], strict=True)
    model.eval()

    val = np.load(folder / "val.npz")
    x, y = val["x"], val["y"]
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert len(x) == len(y) > 0
    assert y.min() >= 0 and y.max() < 10
    assert tuple(x.shape[1:]) == ((1, 8, 8) if name.startswith("digits") else (1, 40))

    card = json.loads((folder / "model_card.json").read_text())
    assert card["arch"] == ckpt["arch"]
    assert card["train_batch_size"] == B
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).double()
    top1 = float((logits.argmax(1) == torch.from_numpy(y)).double().mean())
    nll = float(F.cross_entropy(logits, torch.from_numpy(y)))
    assert top1 == pytest.approx(card["val"]["ema_eval"]["top1"], abs=1e-6)
    assert nll == pytest.approx(card["val"]["ema_eval"]["nll"], abs=1e-5)
