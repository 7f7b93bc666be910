from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bncorrect.errors import DataError, UsageError
from bncorrect.recalibration import PopulationMoments, recalibrate_stats

from . import toys


@pytest.mark.parametrize("exact", [True, False])
def test_inference_consistent_equals_full_batch_layer_by_layer(exact):
    model = toys.conv_net(seed=1)
    x, _ = toys.data(100, seed=2)
    batches = [(x[i : i + 32],) for i in range(0, 100, 32)]  # uneven last batch
    result = recalibrate_stats(model, batches, upstream="eval", exact=exact)
    assert result.examples == 100 and result.exact == exact and result.converged
    # layer by layer: one partial pass per layer; iterative: a chain of 3 BN layers (depth 2) is exact
    # after 3 passes, and the 4th finds nothing changed
    assert result.passes == (3 if exact else 4)
    assert result.scheme == ("layer by layer" if exact else "iterative")
    assert result.max_change is not None and result.max_change < 1e-6
    # direct computation: the whole data at once, each layer with the earlier ones already recalibrated
    ref = copy.deepcopy(model).double()
    h = x.double()
    with torch.no_grad():
        for name, module in ref.named_children():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                dims = (0, *range(2, h.dim()))
                mean, var = h.mean(dims), h.var(dims, unbiased=False)
                got_mean, got_var = result.stats[name]
                torch.testing.assert_close(got_mean.double(), mean, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(got_var.double(), var, rtol=1e-5, atol=1e-5)
                module.running_mean.copy_(mean)
                module.running_var.copy_(var)
            h = module(h)


def test_training_consistent_agrees_with_fvcore_precise_bn():
    from fvcore.nn.precise_bn import update_bn_stats

    model = toys.conv_net(seed=3)
    x, _ = toys.data(96, seed=4)
    result = recalibrate_stats(
        model, [(x[i : i + 32],) for i in range(0, 96, 32)], upstream="train", batch_size=4
    )
    ref = copy.deepcopy(model).train()
    update_bn_stats(ref, [x[i : i + 4] for i in range(0, 96, 4)], num_iters=24)
    for name, (mean, var) in result.stats.items():
        bn = ref.get_submodule(name)
        torch.testing.assert_close(mean, bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var, bn.running_var, rtol=1e-5, atol=1e-6)


def test_population_moments_chan_merge_is_exact_and_stable():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 2, 3, generator=g, dtype=torch.float64) * 1e-3 + 1e4  # large mean, tiny spread
    pm = PopulationMoments(2)
    for i in range(0, 1000, 7):
        pm.add(x[i : i + 7])
    torch.testing.assert_close(pm.mean, x.mean((0, 2)), rtol=1e-12, atol=0)
    torch.testing.assert_close(pm.variance(), x.var((0, 2), unbiased=False), rtol=1e-6, atol=0)


def test_model_untouched_and_options_checked():
    model = toys.conv_net(seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, _ = toys.data(16)
    recalibrate_stats(model, [(x,)], upstream="eval")
    recalibrate_stats(model, [(x,)], upstream="eval", exact=True)
    recalibrate_stats(model, [(x,)], upstream="train", batch_size=4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(UsageError, match="--batch-size"):
        recalibrate_stats(model, [(x,)], upstream="train")
    with pytest.raises(UsageError, match="re-iterable"):
        recalibrate_stats(model, iter([(x,)]), upstream="eval")
    for exact in (True, False):
        with pytest.raises(DataError, match="empty"):
            recalibrate_stats(model, [], upstream="eval", exact=exact)
    with pytest.raises(UsageError, match="tolerance"):
        recalibrate_stats(model, [(x,)], tolerance=0.0)
    with pytest.raises(UsageError, match="at least 2 passes"):
        recalibrate_stats(model, [(x,)], max_passes=1)
