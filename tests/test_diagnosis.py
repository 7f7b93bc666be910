from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bncorrect.diagnosis import diagnose_model, plot_diagnosis, recommend

from . import toys


def _constructed(b: int, groups: int, delta: float, v: float, mu: float = 0.7):
    """Data whose every example (and so every group of B) has per-channel mean ``mu`` and variance ``v``;
    running statistics off by ``delta`` in the mean: eval - train = -delta / sqrt(v + eps) everywhere."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(b * groups, 2, 4, 4, generator=g, dtype=torch.float64)
    z = (z - z.mean((2, 3), keepdim=True)) / z.std((2, 3), unbiased=False, keepdim=True)
    x = (mu + math.sqrt(v) * z).float()
    bn = nn.BatchNorm2d(2)
    with torch.no_grad():
        bn.running_mean.fill_(mu + delta)
        bn.running_var.fill_(v)
    return nn.Sequential(bn).eval(), x


def test_known_discrepancy():
    b, delta, v = 4, 0.3, 2.0
    model, x = _constructed(b, groups=6, delta=delta, v=v)
    result = diagnose_model(model, [(x[:12],), (x[12:],)], b)
    (layer,) = result.layers
    expected = delta / math.sqrt(v + 1e-5)
    assert layer.l1_eval == pytest.approx(expected, rel=1e-5)
    assert layer.range_ratio == pytest.approx(1.0, rel=1e-5)
    assert layer.bound == pytest.approx(math.sqrt(b * 16 - 1))
    assert result.examples == 24


def test_exact_correction_closes_the_gap():
    model, x = _constructed(2, groups=5, delta=-0.5, v=0.5)
    corr = {"0": (torch.tensor(1.0), torch.tensor(1.0))}  # each example's own statistics = its group's
    result = diagnose_model(model, [(x,)], 2, corrections=corr, histogram=True)
    (layer,) = result.layers
    assert layer.l1_corrected == pytest.approx(0.0, abs=1e-5)
    assert "close 100%" in result.recommendation
    h = result.histogram
    assert h is not None and h.layer == "0" and h.train.numel() == 10 * 16
    torch.testing.assert_close(h.corrected, h.train, atol=1e-5, rtol=0)


def test_training_output_bound_for_rank_two_layers():
    """Four Things, Appendix A: with B examples a training-mode BN output lies within +-sqrt(B-1)."""
    b = 3
    model = nn.Sequential(nn.BatchNorm1d(4)).eval()
    with torch.no_grad():
        model[0].running_var.fill_(0.01)  # tiny EMA variance: eval outputs blow past the bound
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(1))
    result = diagnose_model(model, [(x,)], b)
    (layer,) = result.layers
    assert layer.bound == pytest.approx(math.sqrt(b - 1))
    ev = x / math.sqrt(0.01 + 1e-5)
    assert layer.outside_bound == pytest.approx(float((ev.abs() > math.sqrt(2)).float().mean()))
    assert layer.range_ratio > 3


def test_recommendation_thresholds_and_plot(tmp_path):
    model, x = toys.conv_net(seed=1), toys.data(32)[0]
    result = diagnose_model(model, [(x,)], 2, histogram=True)
    out = plot_diagnosis(result, str(tmp_path / "d.png"))
    from pathlib import Path

    assert Path(out).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    small_model, small_x = _constructed(4, 3, delta=0.0, v=1.0)
    small = diagnose_model(small_model, [(small_x,)], 4)
    assert "expect little or no gain" in small.recommendation
    assert "Large gap" in recommend(result.layers, 2) or "Moderate" in recommend(result.layers, 2)
