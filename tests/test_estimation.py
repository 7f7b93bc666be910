from __future__ import annotations

import copy
import itertools
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from bncorrect import correction as C
from bncorrect.errors import DataError, NumericalError, UsageError
from bncorrect.estimation import (
    DEFAULT_SAMPLE_BUDGET,
    EvalNormEstimator,
    SampleReservoir,
    estimate_alpha_beta,
    minimise_on_grid,
)

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
        assert ly.sampled_examples == 48 and ly.sampled_rows == 48 * bn.num_features


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


def _wide_net_and_data(n: int) -> tuple[nn.Module, torch.Tensor]:
    """Conv(3 -> 512, 2x2 stride 2) -> BN(512) on 8x8 inputs (4x4 maps), examples with their own scale and
    shift, BN running statistics those of the data (so the optimum is inside the square)."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 512, 2, 2, bias=False), nn.BatchNorm2d(512)).eval()
    scale = 0.5 + torch.rand(n, 1, 1, 1, generator=g)
    shift = 0.5 * torch.randn(n, 3, 1, 1, generator=g)
    x = torch.randn(n, 3, 8, 8, generator=g) * scale + shift
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(model[0].weight.shape, generator=g) / 12**0.5)
        h = model[0](x).double()
        model[1].running_mean.copy_(h.mean((0, 2, 3)))
        model[1].running_var.copy_(h.var((0, 2, 3), unbiased=False))
    return model, x


def _full_data_l_aux(groups: list[np.ndarray], bn: nn.Module) -> Callable[[float, float], float]:
    """DESIGN §3 on every (example, channel, position) of the pass, in float64 torch: a function of
    (alpha, beta)."""
    x = torch.from_numpy(np.stack(groups))  # (groups, B, C, H, W)
    mu_b = x.mean(dim=(1, 3, 4), keepdim=True)
    var_b = x.var(dim=(1, 3, 4), unbiased=False, keepdim=True)
    target = (x - mu_b) / torch.sqrt(var_b + bn.eps)
    mu_i = x.mean(dim=(3, 4), keepdim=True)
    var_i = x.var(dim=(3, 4), unbiased=False, keepdim=True)
    mu_e = bn.running_mean.double().reshape(1, 1, -1, 1, 1)
    var_e = bn.running_var.double().reshape(1, 1, -1, 1, 1)
    d = mu_i - mu_e

    def f(alpha: float, beta: float) -> float:
        mu_hat = mu_e + alpha * d
        var_hat = beta * var_i + (1 - beta) * var_e + beta * (1 - beta) * d * d
        # target - estimate, estimate = (x - mu_hat) / sqrt(var_hat + eps), in one fused op
        diff = torch.addcmul(target, x - mu_hat, torch.rsqrt(var_hat + bn.eps), value=-1.0)
        return float(diff.abs_().mean())

    return f


def test_wide_layer_default_sampling_reaches_full_data_minimum():
    """Default settings on a wide layer (C = 512, 4x4 maps, 256 examples: 4x the default sample budget,
    so only a quarter of the (example, channel) rows are kept and 4096 of them are solved on): the
    estimate is at the minimum of L_aux over every activation of the pass."""
    n, b = 256, 2
    model, x = _wide_net_and_data(n)
    result = estimate_alpha_beta(model, [(x[i : i + 64],) for i in range(0, n, 64)], b)
    (ly,) = result.layers
    assert ly.sampled_rows * ly.positions < n * 512 * 16  # the sampling path, not the whole pass
    full = _full_data_l_aux(_bn_inputs_in_training_mode(model, x, b)["1"], model[1])
    grid = [i / 10 for i in range(11)]
    brute = {(a, bb): full(a, bb) for a in grid for bb in grid}
    a0, b0 = min(brute, key=brute.__getitem__)
    ours = full(ly.alpha, ly.beta)
    assert 0.1 < a0 < 0.9 and 0.1 < b0 < 0.9  # an interior minimum: the test can tell a wrong estimate
    # within the brute-force grid's resolution of its argmin, and at least as good as its minimum
    assert abs(ly.alpha - a0) <= 0.1 and abs(ly.beta - b0) <= 0.1, (ly.alpha, ly.beta, a0, b0)
    assert ours <= brute[a0, b0] * 1.001, (ours, brute[a0, b0])
    # and a minimum of the full-data L_aux at a finer resolution around it (steps of 0.02)
    near = [
        full(min(1.0, max(0.0, ly.alpha + i * 0.02)), min(1.0, max(0.0, ly.beta + j * 0.02)))
        for i in (-1, 0, 1)
        for j in (-1, 0, 1)
    ]
    assert ours <= min(near) * 1.001, (ours, min(near))
    # the reported L_aux (on the 4096 rows solved on) estimates the full-data one
    assert ly.l_aux == pytest.approx(ours, rel=0.03)
    assert ly.l_aux_ema == pytest.approx(full(0.0, 0.0), rel=0.03)


def _feed(
    est: EvalNormEstimator, n: int, shape: tuple[int, ...], batch: int = 64, fresh: bool = True
) -> None:
    """Feed ``n`` examples of activations of ``shape`` (C, *spatial), statistics as bncorrect computes them
    for groups of 2 (``fresh=False``: the same values in every batch, for tests that only count rows)."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(batch, *shape, generator=g)
    for start in range(0, n, batch):
        if fresh and start:
            x = torch.randn(batch, *shape, generator=g)
        xb = x[: min(batch, n - start)]
        mu_i, var_i = C.example_stats(xb)
        mu_b, var_b = C.group_stats(mu_i, var_i, 2)
        est.observe(xb, mu_i, var_i, mu_b, var_b)


def _estimator(channels: int, seed: int = 0, **kw) -> EvalNormEstimator:
    gen = torch.Generator().manual_seed(seed)
    return EvalNormEstimator("l", torch.zeros(channels), torch.ones(channels), 1e-5, 2, generator=gen, **kw)


def test_wide_layers_keep_hundreds_of_examples_by_default():
    """A ResNet-50 last-stage layer (C = 2048, 7x7) over 1024 examples: the default budget of 2^19 values
    holds 5 whole examples of 2048 x 49 values, or 10240 (example, channel) rows of 49, 5 per channel,
    drawn from the examples independently for each channel."""
    est = _estimator(2048)
    _feed(est, 1024, (2048, 7, 7), fresh=False)
    res = est.reservoir
    assert res is not None and res.values is not None
    assert res.distinct_examples() >= 900
    assert res.channels * res.filled * res.positions <= DEFAULT_SAMPLE_BUDGET
    # the 256-example wide net of the brute-force test keeps rows of every example
    model, x = _wide_net_and_data(256)
    (ly,) = estimate_alpha_beta(model, [(x,)], 2).layers
    assert ly.sampled_examples == ly.examples == 256


def test_reservoir_memory_is_flat_in_the_data():
    sizes = []
    for n in (512, 2048):
        est = _estimator(64)
        _feed(est, n, (64, 8, 8))
        res = est.reservoir
        assert res is not None and res.seen == n
        held = sum(t.numel() for t in vars(res).values() if isinstance(t, torch.Tensor))
        assert held == res.stored_elements()
        sizes.append(held)
    assert sizes[0] == sizes[1] == 64 * 128 * (64 + 5)  # 2^19 / 64 values: 128 rows per channel


def test_reservoir_is_reproducible_and_seeded():
    def run(seed: int) -> tuple[torch.Tensor, float, float]:
        est = _estimator(32, seed, sample_budget=1 << 12)
        _feed(est, 300, (32, 4, 4))
        assert est.reservoir is not None
        r = est.solve()
        return est.reservoir.example.clone(), r.alpha, r.beta

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]
    assert not torch.equal(first[0], other[0])
    # the memory layout of the activations changes nothing (channels_last has no (N * C, L) view)
    x = torch.randn(40, 8, 6, 6)
    mu_i, var_i = C.example_stats(x)
    kept = []
    for layout in (x, x.to(memory_format=torch.channels_last)):
        res = SampleReservoir(8, 5, 16, torch.Generator().manual_seed(3))
        for i in range(0, 40, 10):
            s = slice(i, i + 10)
            res.add(layout[s], mu_i[s], var_i[s], mu_i[s], var_i[s])
        kept.append((res.values, res.stats, res.example))
    assert all(torch.equal(a, b) for a, b in zip(*kept, strict=True))


def _chi2_quantile(df: int, z: float) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at standard normal quantile z."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * h**0.5) ** 3


def test_reservoir_rows_are_a_uniform_sample():
    """Each (example, channel) row is kept with probability capacity / examples whatever its position in
    the pass and in its batch (batches straddling the filling point, larger than the reservoir, of one
    example), the channels draw their examples independently, and every row carries its own values and
    statistics."""
    channels, capacity, n, reps = 3, 4, 30, 1000
    batches = [7, 1, 12, 10]
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(n, channels)
    distinct = []
    inputs, start = [], 0
    for m in batches:
        ids = torch.arange(start, start + m, dtype=torch.float64)
        # value = 100 * example + 10 * channel + position: a row's values say where they came from
        x = ids.reshape(m, 1, 1) * 100 + torch.arange(channels).reshape(1, -1, 1) * 10 + torch.arange(5)
        stat = ids.reshape(m, 1) * 100 + torch.arange(channels) * 10.0
        inputs.append((x, stat, stat + 1, stat + 2, stat + 3))
        start += m
    chans = torch.arange(channels).reshape(-1, 1)
    for _ in range(reps):
        res = SampleReservoir(channels, capacity, positions=2, generator=gen)
        for batch in inputs:
            res.add(*batch)
        assert res.seen == n and res.filled == capacity and res.values is not None
        assert res.stored_elements() == channels * capacity * (2 + 5)
        origin = res.example * 100 + chans * 10  # (C, k)
        offset = res.values.double() - origin.unsqueeze(-1)  # the positions kept: in 0..4, distinct
        assert bool(((offset >= 0) & (offset <= 4) & (offset == offset.round())).all())
        assert bool((offset[..., 0] != offset[..., 1]).all())
        assert all(torch.equal(res.stats[j], origin.double() + j) for j in range(4))
        assert bool((res.example.sort(dim=1).values.diff(dim=1) > 0).all())  # k different examples each
        counts[res.example, chans] += 1
        distinct.append(res.distinct_examples())
    expected = reps * capacity / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    df = channels * (n - 1)  # each channel's counts sum to reps * capacity
    assert _chi2_quantile(df, -3.09) < chi2 < _chi2_quantile(df, 3.09), chi2  # two-sided, p = 0.002
    # no bias between batches (an off-by-one in the draws, [0, t) for [0, t], favours late examples)
    ends = np.cumsum([0, *batches])
    per_batch = np.array([float(counts[a:z].sum()) for a, z in itertools.pairwise(ends)])
    want = reps * channels * capacity * np.array(batches) / n
    assert float(((per_batch - want) ** 2 / want).sum()) < 16.27  # chi-square(3) at p = 0.001
    # independent channels: expected distinct examples n * (1 - (1 - k/n)^C) = 10.48, sd ~1.1 per rep
    assert np.mean(distinct) == pytest.approx(n * (1 - (1 - capacity / n) ** channels), abs=0.2)


def test_minimise_on_grid_finds_off_grid_minimum():
    target = torch.tensor([0.3141, 0.7777], dtype=torch.float64)
    a, b, _ = minimise_on_grid(lambda al, be: (al - target[0]).abs() + (be - target[1]).square())
    assert a == pytest.approx(0.3141, abs=1e-3) and b == pytest.approx(0.7777, abs=1e-3)
