from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from bncorrect.errors import DataError, NumericalError, UsageError
from bncorrect.estimation import SampleReservoir, estimate_alpha_beta, minimise_on_grid

from . import toys
from .reference import l_aux_reference


def _bn_inputs_in_training_mode(model: nn.Module, x: torch.Tensor, b: int) -> dict[str, list[np.ndarray]]:
    """Each BN layer's input per normalization batch, from the plain model in train mode, one forward per
    group of B (momentum 0 so nothing changes), independent of bncorrect."""
    ref = copy.deepcopy(model).train()
    for m in ref.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0
    seen: dict[str, list[np.ndarray]] = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda _m, i, n=name: seen.setdefault(n, []).append(i[0].double().numpy())
        )
        for name, m in ref.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    with torch.no_grad():
        for start in range(0, x.shape[0], b):
            ref(x[start : start + b])
    for h in hooks:
        h.remove()
    return seen


def _mean_l_aux(groups: list[np.ndarray], bn: nn.Module, a: float, b: float) -> float:
    mu, var = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    return float(np.mean([l_aux_reference(g, mu, var, bn.eps, a, b) for g in groups]))


@pytest.mark.parametrize("b", [2, 4])
def test_estimate_reaches_brute_force_grid_minimum(b):
    model = toys.conv_net(seed=1)
    x, _ = toys.data(48, seed=2)
    batches = [(x[i : i + 16],) for i in range(0, 48, 16)]
    result = estimate_alpha_beta(model, batches, b, sample_budget=1 << 22, positions=1024)
    seen = _bn_inputs_in_training_mode(model, x, b)
    grid = np.linspace(0, 1, 41)
    for ly in result.layers:
        bn = model.get_submodule(ly.name)
        groups = seen[ly.name]
        brute = min(_mean_l_aux(groups, bn, a, bb) for a in grid for bb in grid)
        ours = _mean_l_aux(groups, bn, ly.alpha, ly.beta)
        assert 0.0 <= ly.alpha <= 1.0 and 0.0 <= ly.beta <= 1.0
        assert ours <= brute * 1.01, (ly.name, ours, brute)
        # the estimator's own L_aux values are the same quantity on the same (fully kept) activations
        assert ly.l_aux == pytest.approx(ours, rel=1e-6)
        assert ly.l_aux_ema == pytest.approx(_mean_l_aux(groups, bn, 0.0, 0.0), rel=1e-6)
        assert ly.sampled_rows == 48


def test_estimates_fall_as_b_grows():
    """With running statistics equal to the data's, small normalization batches call for more of the
    example's own statistics than large ones."""
    from bncorrect.recalibration import recalibrate_stats

    model = toys.conv_net(seed=3)
    x, _ = toys.data(256, seed=4)
    batches = [(x[i : i + 64],) for i in range(0, 256, 64)]
    recal = recalibrate_stats(model, batches, upstream="eval")
    for name, (mean, var) in recal.stats.items():
        model.get_submodule(name).running_mean.copy_(mean)
        model.get_submodule(name).running_var.copy_(var)
    small = estimate_alpha_beta(model, batches, 2)
    large = estimate_alpha_beta(model, batches, 32)
    for s, big in zip(small.layers, large.layers, strict=True):
        assert s.alpha > big.alpha and s.beta > big.beta, (s, big)
        assert s.l_aux_ema > big.l_aux_ema


def test_model_is_not_modified():
    model = toys.conv_net(seed=5, dropout=0.5).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types_before = [type(m) for m in model.modules()]
    x, _ = toys.data(32)
    estimate_alpha_beta(model, [(x,)], 4)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in model.modules()] == types_before
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_dropout_stays_in_eval_and_results_are_deterministic():
    x, _ = toys.data(64, seed=6)
    batches = [(x[i : i + 32],) for i in range(0, 64, 32)]
    with_dropout = estimate_alpha_beta(toys.conv_net(seed=7, dropout=0.9), batches, 2, seed=11)
    again = estimate_alpha_beta(toys.conv_net(seed=7, dropout=0.9), batches, 2, seed=11)
    without = estimate_alpha_beta(toys.conv_net(seed=7, dropout=0.0), batches, 2, seed=11)
    assert with_dropout.as_dict() == again.as_dict() == without.as_dict()


def test_short_batches_are_cut_to_whole_normalization_batches():
    x, _ = toys.data(23)
    result = estimate_alpha_beta(toys.conv_net(), [(x[:10],), (x[10:23],)], 4)
    assert result.examples == 8 + 12 and result.dropped == 3


def test_layer_batch_size_patterns():
    x, _ = toys.data(64)
    result = estimate_alpha_beta(toys.conv_net(), [(x,)], 2, layer_batch_size={"10": 16})
    sizes = {ly.name: ly.train_batch_size for ly in result.layers}
    assert sizes == {"1": 2, "5": 2, "10": 16}


def test_b1_on_layer_without_spatial_axes_is_refused():
    x, _ = toys.data(8)
    with pytest.raises(UsageError, match="variance of one example"):
        estimate_alpha_beta(toys.conv_net(), [(x,)], 1)


def test_b1_is_fine_with_spatial_axes():
    x, _ = toys.data(8, shape=(2, 16))
    result = estimate_alpha_beta(toys.conv1d_net(), [(x,)], 1)
    assert result.layers[0].alpha > 0.9  # B = 1: training normalizes each example by itself


def test_nan_activations_name_the_layer():
    x, _ = toys.data(8)
    x[3, 0, 2, 2] = float("nan")
    with pytest.raises(NumericalError, match="layer 1"):
        estimate_alpha_beta(toys.conv_net(), [(x,)], 2)


def test_empty_and_misshapen_data():
    with pytest.raises(DataError, match="no complete normalization batch"):
        estimate_alpha_beta(toys.conv_net(), [], 2)
    with pytest.raises(DataError, match="failed on a data batch"):
        estimate_alpha_beta(toys.conv_net(), [(torch.randn(4, 5, 8, 8),)], 2)


def test_reservoir_memory_is_bounded_and_uniform():
    gen = torch.Generator().manual_seed(0)
    res = SampleReservoir(channels=1, capacity=50, positions=1, generator=gen)
    counts = np.zeros(1000)
    for _ in range(40):
        res = SampleReservoir(channels=1, capacity=50, positions=1, generator=gen)
        for start in range(0, 1000, 100):
            ids = torch.arange(start, start + 100, dtype=torch.float32).reshape(100, 1, 1)
            z = torch.zeros(100, 1)
            res.add(ids, z, z, z, z)
        assert res.values.shape[0] == 50 and res.seen == 1000 and res.filled == 50
        kept = res.values[:, 0, 0].long().numpy()
        assert len(set(kept.tolist())) == 50
        counts[kept] += 1
    # each example kept with probability 50/1000: compare first and second half (no bias to early/late)
    first, second = counts[:500].sum(), counts[500:].sum()
    assert abs(first - second) / (first + second) < 0.1


def test_minimise_on_grid_finds_off_grid_minimum():
    target = torch.tensor([0.3141, 0.7777], dtype=torch.float64)
    a, b, _ = minimise_on_grid(lambda al, be: (al - target[0]).abs() + (be - target[1]).square())
    assert a == pytest.approx(0.3141, abs=1e-3) and b == pytest.approx(0.7777, abs=1e-3)
