from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from bncorrect.errors import NoBatchNormError, UsageError
from bncorrect.layers import (
    CorrectedNorm,
    coefficients,
    correct_model,
    find_norm_layers,
    normalization_mode,
    strip_corrections,
)

from .reference import corrected_bn_reference


class BNReLU2d(nn.BatchNorm2d):
    """A BN subclass that adds behaviour after normalizing (like timm's BatchNormAct2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x)) * 2.0


class FrozenBN2d(nn.Module):
    """Not a BN subclass: torchvision's FrozenBatchNorm2d, re-implemented (buffers only, fixed stats)."""

    def __init__(self, c: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(c))
        self.register_buffer("bias", torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


KINDS = {
    "bn1d-2d-input": (lambda: nn.BatchNorm1d(4), (6, 4)),
    "bn1d-3d-input": (lambda: nn.BatchNorm1d(4), (5, 4, 7)),
    "bn2d": (lambda: nn.BatchNorm2d(4), (3, 4, 5, 6)),
    "bn3d": (lambda: nn.BatchNorm3d(4), (2, 4, 3, 4, 5)),
    "syncbn": (lambda: nn.SyncBatchNorm(4), (3, 4, 5, 5)),
    "no-affine": (lambda: nn.BatchNorm2d(4, affine=False), (3, 4, 5, 5)),
    "subclass-act": (lambda: BNReLU2d(4), (3, 4, 5, 5)),
    "frozen": (lambda: FrozenBN2d(4), (3, 4, 5, 5)),
}


def _randomize(m: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        c = m.running_mean.numel()
        m.running_mean.copy_(torch.randn(c, generator=g))
        m.running_var.copy_(torch.rand(c, generator=g) + 0.3)
        if getattr(m, "weight", None) is not None:
            m.weight.copy_(torch.randn(c, generator=g))
            m.bias.copy_(torch.randn(c, generator=g))
    return m


def _reference(m: nn.Module, x: torch.Tensor, alpha, beta) -> torch.Tensor:
    w = None if getattr(m, "weight", None) is None else m.weight.detach().double().numpy()
    b = None if getattr(m, "bias", None) is None else m.bias.detach().double().numpy()
    y = corrected_bn_reference(
        x.double().numpy(),
        m.running_mean.double().numpy(),
        m.running_var.double().numpy(),
        w,
        b,
        m.eps,
        alpha,
        beta,
    )
    y = torch.from_numpy(y).float()
    if isinstance(m, BNReLU2d):
        y = torch.relu(y) * 2.0
    return y


def _model(kind: str) -> tuple[nn.Module, torch.Tensor]:
    make, shape = KINDS[kind]
    model = nn.Sequential(nn.Identity(), _randomize(make()))
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    return model.eval(), x


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alpha,beta", [(0.25, 0.25), (0.05, 0.5), (1.0, 1.0)])
def test_corrected_eval_matches_reference(kind, alpha, beta):
    model, x = _model(kind)
    inner = model[1]
    correct_model(model, alpha, beta)
    assert isinstance(model[1], CorrectedNorm)
    with torch.no_grad():
        y = model(x)
    torch.testing.assert_close(y, _reference(inner, x, alpha, beta), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_reproduces_original_eval(kind):
    model, x = _model(kind)
    with torch.no_grad():
        before = model(x)
        correct_model(model, 0.0)
        after = model(x)
        # the non-identity code path must agree too
        model[1].set_coefficients(torch.zeros(4), torch.zeros(4) + 1e-30)
        after_general = model(x)
    assert (after - before).abs().max() <= 1e-6
    assert (after_general - before).abs().max() <= 1e-6


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "frozen"])
def test_training_mode_is_exactly_original(kind):
    model, x = _model(kind)
    plain = copy.deepcopy(model).train()
    correct_model(model, 0.3, 0.2)
    model.train()
    y_plain = plain(x)
    y = model(x)
    assert torch.equal(y, y_plain)
    assert torch.equal(model[1].norm.running_mean, plain[1].running_mean)
    assert torch.equal(model[1].norm.running_var, plain[1].running_var)


@pytest.mark.parametrize("kind", ["bn1d-2d-input", "bn2d", "bn3d", "subclass-act", "frozen"])
def test_batch_mode_is_training_normalization_without_updates(kind):
    model, x = _model(kind)
    inner = model[1]
    stats = (inner.running_mean.clone(), inner.running_var.clone())
    correct_model(model, 0.3)
    with torch.no_grad(), normalization_mode(model, "batch"):
        y = model(x)
    ref = nn.functional.batch_norm(
        x, None, None, getattr(inner, "weight", None), inner.bias, True, 0.0, inner.eps
    )
    if isinstance(inner, BNReLU2d):
        ref = torch.relu(ref) * 2.0
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(inner.running_mean, stats[0]) and torch.equal(inner.running_var, stats[1])
    assert model[1].mode == "corrected" and not model.training


def test_batch_mode_groups():
    model, x = _model("bn2d")
    x = torch.cat([x, x * 3 + 1])
    correct_model(model, 0.0)
    with torch.no_grad(), normalization_mode(model, "batch", group_sizes=3):
        y = model(x)
        y1 = nn.functional.batch_norm(
            x[:3], None, None, model[1].norm.weight, model[1].norm.bias, True, 0.0, 1e-5
        )
        y2 = nn.functional.batch_norm(
            x[3:], None, None, model[1].norm.weight, model[1].norm.bias, True, 0.0, 1e-5
        )
    torch.testing.assert_close(y, torch.cat([y1, y2]), rtol=1e-5, atol=1e-5)


def test_mode_restored_after_error():
    model, _ = _model("bn2d")
    correct_model(model, 0.1)
    model.train()
    with pytest.raises(RuntimeError), normalization_mode(model, "batch"):
        raise RuntimeError("boom")
    assert model.training and model[1].mode == "corrected"


def test_per_channel_and_mapping():
    model = nn.Sequential(_randomize(nn.BatchNorm2d(3)), nn.ReLU(), _randomize(nn.BatchNorm2d(3), 1)).eval()
    x = torch.randn(2, 3, 4, 4)
    a0 = torch.tensor([0.0, 0.5, 1.0])
    originals = [model[0], model[2]]
    correct_model(model, {"0": a0, "2": 0.1}, {"0": 0.2})
    co = coefficients(model)
    assert torch.equal(co["0"][0], a0) and float(co["0"][1]) == pytest.approx(0.2)
    assert float(co["2"][1]) == pytest.approx(0.1)  # beta defaults to that layer's alpha
    with torch.no_grad():
        y = model(x)
    h = torch.relu(_reference(originals[0], x, a0.numpy(), 0.2))
    torch.testing.assert_close(y, _reference(originals[1], h, 0.1, 0.1), rtol=1e-4, atol=1e-4)


def test_buffers_save_and_reload():
    model, x = _model("bn2d")
    correct_model(model, 0.2, 0.3)
    sd = model.state_dict()
    assert float(sd["1.alpha"]) == pytest.approx(0.2) and float(sd["1.beta"]) == pytest.approx(0.3)
    fresh, _ = _model("bn2d")
    correct_model(fresh, 0.0)
    fresh.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_strip_and_rewrap():
    model, x = _model("subclass-act")
    with torch.no_grad():
        before = model(x)
    correct_model(model, 0.5)
    strip_corrections(model)
    assert type(model[1]) is BNReLU2d
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_find_layers_reports_untracked_and_skips_instance_norm():
    model = nn.Sequential(
        nn.BatchNorm2d(3, track_running_stats=False),
        nn.InstanceNorm2d(3, track_running_stats=True),
        nn.BatchNorm2d(3),
    )
    layers = find_norm_layers(model)
    assert [ly.name for ly in layers] == ["0", "2"]
    assert not layers[0].correctable and "track_running_stats=False" in layers[0].reason
    assert layers[1].correctable
    correct_model(model, 0.1)
    assert isinstance(model[2], CorrectedNorm) and isinstance(model[0], nn.BatchNorm2d)


def test_no_bn_raises():
    with pytest.raises(NoBatchNormError, match="no BatchNorm"):
        correct_model(nn.Sequential(nn.Conv2d(1, 1, 1)), 0.1)
    with pytest.raises(NoBatchNormError, match="track_running_stats"):
        correct_model(nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)), 0.1)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_coefficients_out_of_range(bad):
    model, _ = _model("bn2d")
    with pytest.raises(UsageError, match=r"\[0, 1\]"):
        correct_model(model, bad)


def test_wrong_vector_length():
    model, _ = _model("bn2d")
    with pytest.raises(UsageError, match="length 4"):
        correct_model(model, torch.zeros(3))


def test_nested_modules_are_found_with_paths():
    block = nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3))
    model = nn.Sequential(nn.ModuleDict({"a": block}), nn.Sequential(nn.Sequential(nn.BatchNorm2d(3))))
    names = [ly.name for ly in find_norm_layers(model)]
    assert names == ["0.a.1", "1.0.0"]
    correct_model(model, 0.1)
    assert sorted(coefficients(model)) == names


def test_float64_model():
    model, x = _model("bn2d")
    model = model.double()
    inner = model[1]
    correct_model(model, 0.3, 0.3)
    with torch.no_grad():
        y = model(x.double())
    ref = corrected_bn_reference(
        x.double().numpy(),
        inner.running_mean.numpy(),
        inner.running_var.numpy(),
        inner.weight.detach().numpy(),
        inner.bias.detach().numpy(),
        inner.eps,
        0.3,
        0.3,
    )
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-10, atol=1e-10)
