"""Online EvalNorm (bncorrect.nn.online): no effect on training, agreement with offline estimation, files."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bncorrect
from bncorrect import correction as C
from bncorrect.corrections import load_corrections
from bncorrect.errors import DataError, NoBatchNormError, UsageError
from bncorrect.estimation import estimate_alpha_beta
from bncorrect.layers import corrected_layers
from bncorrect.nn.online import OnlineEvalNorm

from . import toys


def _spatial_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
    )


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = 1 + torch.rand(n, 1, 1, 1, generator=g)
    return torch.randn(n, 3, 8, 8, generator=g) * scale + torch.randn(n, 3, 1, 1, generator=g)


def _bns(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _train(
    model: nn.Module, steps: int, attach: bool
) -> tuple[list[list[torch.Tensor]], OnlineEvalNorm | None]:
    torch.manual_seed(123)
    online = OnlineEvalNorm(model, train_batch_size=4, lr=0.05) if attach else None
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    x, y = toys.data(8 * steps, seed=3)
    grads = []
    model.train()
    for i in range(steps):
        loss = nn.functional.cross_entropy(model(x[8 * i : 8 * i + 8]), y[8 * i : 8 * i + 8])
        opt.zero_grad()
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return grads, online


def test_model_gradients_and_updates_bitwise_identical():
    plain, helped = toys.conv_net(seed=0, dropout=0.3), toys.conv_net(seed=0, dropout=0.3)
    g_plain, _ = _train(plain, 3, attach=False)
    g_helped, online = _train(helped, 3, attach=True)
    assert online is not None and all(n == 3 for n in online.steps().values())
    # the helper really learned something (so "identical" is not vacuous)
    assert any(float(a) != pytest.approx(1 / 16) for a, _ in online.iterates().values())
    for a, b in zip(g_plain, g_helped, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    sd_a, sd_b = plain.state_dict(), helped.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert all(p.grad is not None for p in helped.parameters())


def _frozen(seed: int, n: int, b: int) -> tuple[nn.Module, torch.Tensor]:
    """A net whose running statistics are the average of its batch statistics, then frozen (momentum 0)."""
    model, x = _spatial_net(seed), _images(n, seed)
    for m in _bns(model):
        m.momentum = None  # cumulative average over the pass
    model.train()
    with torch.no_grad():
        for i in range(0, n, b):
            model(x[i : i + b])
    for m in _bns(model):
        m.momentum = 0.0  # training-mode forwards no longer move the running statistics
    return model, x


def test_frozen_model_reaches_offline_estimate():
    b, n = 4, 128
    model, x = _frozen(0, n, b)
    before = copy.deepcopy(model.state_dict())
    offline = estimate_alpha_beta(model, [x], b)  # groups of 4 consecutive examples, as below
    online = OnlineEvalNorm(model, lr=0.02)  # B = each call's batch (plain BN over 4 examples)
    with torch.no_grad():  # the hook learns even when the training loop runs without autograd
        for _ in range(4):
            for i in range(0, n, b):
                model(x[i : i + b])
    got = online.coefficients()
    for est in offline.layers:
        alpha, beta = got[est.name]
        # tolerance 0.05: the online iterate average vs the offline grid minimiser (measured: <= 0.02)
        assert float(alpha) == pytest.approx(est.alpha, abs=0.05)
        assert float(beta) == pytest.approx(est.beta, abs=0.05)
    # the model itself is untouched (parameters and running statistics)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if "num_batches" not in k)
    assert online.normalization_batch_size() == b


def test_reported_l_aux_uses_running_stats_before_the_update():
    model = _spatial_net(1)
    x = _images(6, 2)
    online = OnlineEvalNorm(model, init=0.5, metrics_window=1)
    bn = model[1]
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    inp = model[0](x).detach()
    model.train()
    model(x)
    assert not torch.equal(rm, bn.running_mean)  # the layer did update its EMA with this batch
    expected_ema = C.l_aux(inp.double(), rm.double(), rv.double(), bn.eps, 0.0, 0.0)
    expected = C.l_aux(inp.double(), rm.double(), rv.double(), bn.eps, 0.5, 0.5)  # before the first step
    m = online.layer_metrics()["1"]
    assert m["l_aux_ema"] == pytest.approx(float(expected_ema), rel=1e-5)
    assert m["l_aux"] == pytest.approx(float(expected), rel=1e-5)
    assert m["steps"] == 1 and m["examples"] == 6


def test_save_load_apply(tmp_path):
    model = toys.conv_net(seed=0)
    x, _ = toys.data(32, seed=1)
    online = OnlineEvalNorm(model, train_batch_size=4, lr=0.05, data="toys.data(32)")
    model.train()
    with torch.no_grad():
        for i in range(0, 32, 8):
            model(x[i : i + 8])
    online.detach()
    path = online.save(tmp_path / "online.safetensors")
    corr = load_corrections(path)
    assert corr.method == "evalnorm-online"
    assert corr.train_batch_size == 4
    assert corr.data == "toys.data(32)"
    coeffs = online.coefficients()
    assert set(corr.layers) == set(coeffs) == {"1", "5", "10"}
    for name, lc in corr.layers.items():
        assert torch.equal(lc.alpha, coeffs[name][0]) and torch.equal(lc.beta, coeffs[name][1])
        metrics = corr.metrics["layers"][name]
        assert metrics["steps"] == 4 and metrics["l_aux"] > 0 and metrics["l_aux_ema"] > 0
    out = bncorrect.apply(copy.deepcopy(model), path)
    layers = corrected_layers(out.model)
    assert set(layers) == {"1", "5", "10"}
    for name, m in layers.items():
        assert torch.equal(m.alpha, coeffs[name][0]) and torch.equal(m.beta, coeffs[name][1])
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(out.model(x), model(x))


def test_alpha_beta_stay_in_unit_interval_and_reach_the_boundary():
    # B = 1 with spatial axes: training-mode BN is instance normalization, exactly the corrected layer at
    # alpha = beta = 1, so the unconstrained step keeps pushing past 1 and the projection must hold it there.
    model, x = _spatial_net(2), _images(64, 3)
    online = OnlineEvalNorm(
        model, train_batch_size=1, lr=0.2, per_channel=True, average=0.0, metrics_window=2
    )
    model.train()
    with torch.no_grad():
        for i in range(0, 64, 8):
            model(x[i : i + 8])
            for a, b in online.iterates().values():
                assert a.shape == (4,) and b.shape == (4,)
                assert bool(((a >= 0) & (a <= 1) & (b >= 0) & (b <= 1)).all())
    for a, b in online.coefficients().values():
        assert bool((a > 0.9).all()) and bool((b > 0.9).all())
    for m in online.layer_metrics().values():
        assert m["l_aux"] < 0.1 * m["l_aux_ema"]


def test_eval_mode_and_detach_take_no_step():
    model = _spatial_net(0)
    x = _images(8, 0)
    online = OnlineEvalNorm(model)
    model.eval()
    model(x)
    assert online.steps() == {"1": 0, "4": 0}
    with pytest.raises(DataError, match="no step"):
        online.save("unused.safetensors")
    model.train()
    with online:
        model(x)
    assert online.steps() == {"1": 1, "4": 1}
    assert not online.attached
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())
    model(x)
    assert online.steps() == {"1": 1, "4": 1}


def test_only_chosen_layers_and_unseen_layers_left_out(tmp_path):
    model = _spatial_net(0)
    online = OnlineEvalNorm(model, layers=["4"])
    assert online.layer_names == ["4"]
    model.train()
    model(_images(4, 0))
    corr = online.corrections()
    assert set(corr.layers) == {"4"}
    # a layer that never ran in training mode is left out of the file and listed
    model2 = _spatial_net(0)
    online2 = OnlineEvalNorm(model2)
    model2.train()
    model2[1].eval()
    model2(_images(4, 0))
    corr2 = online2.corrections()
    assert set(corr2.layers) == {"4"} and corr2.metrics["unseen_layers"] == ["1"]


def test_no_batchnorm_raises():
    with pytest.raises(NoBatchNormError, match="no BatchNorm"):
        OnlineEvalNorm(toys.no_bn_net())
    untracked = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(NoBatchNormError, match="track_running_stats"):
        OnlineEvalNorm(untracked)


def test_rank2_batchnorm_needs_two_examples():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    OnlineEvalNorm(model, train_batch_size=1)
    model.train()
    with pytest.raises(UsageError, match="without spatial axes"):
        model(torch.randn(8, 3))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_batch_size": 0}, "train_batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"init": 1.5}, "init"),
        ({"average": 1.0}, "average"),
        ({"layers": ["nope"]}, "not in the model"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(UsageError, match=match):
        OnlineEvalNorm(_spatial_net(0), **kwargs)


def test_non_finite_batch_is_counted_and_does_not_poison_alpha_beta():
    model = nn.Sequential(nn.BatchNorm2d(3))
    online = OnlineEvalNorm(model, init=0.3, metrics_window=10)
    model.train()
    x = _images(4, 0)
    model(x)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    model(bad)  # (this also turns the layer's own running statistics into NaN)
    m = online.layer_metrics()["0"]
    assert m["steps"] == 2 and m["non_finite_steps"] == 1
    assert m["l_aux"] is not None and m["l_aux"] == m["l_aux"]  # the mean leaves the NaN step out
    for a, b in online.iterates().values():
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
