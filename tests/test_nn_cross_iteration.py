"""Cross-Iteration BN (bncorrect.nn.cross_iteration): BN limits, Taylor compensation, eqs. 9-11, gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from bncorrect.errors import NoBatchNormError, UsageError
from bncorrect.layers import find_norm_layers
from bncorrect.nn.convert import convert_to_batchnorm
from bncorrect.nn.cross_iteration import (
    CrossIterationBatchNorm2d,
    IterationRecord,
    compensate,
    convert_to_cross_iteration,
    pool_statistics,
)


def _pair(window: int, burn_in: int = 0, seed: int = 0, dtype=torch.float32, bias: bool = True):
    torch.manual_seed(seed)
    conv = nn.Conv2d(2, 3, 3, bias=bias).to(dtype)
    bn = CrossIterationBatchNorm2d(3, conv, window=window, burn_in=burn_in).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return nn.Sequential(conv, bn)


def _plain_twin(model: nn.Sequential) -> nn.Sequential:
    """The same conv and an nn.BatchNorm2d with the same state."""
    twin = copy.deepcopy(model)
    bn = nn.BatchNorm2d(3).to(model[1].weight.dtype)
    bn.load_state_dict(model[1].state_dict())
    twin[1] = bn
    return twin


def _inputs(steps: int, n: int = 2, seed: int = 1, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 2, 5, 5, generator=g) * 1.3 + 0.4).to(dtype) for _ in range(steps)]


def _sgd_run(model: nn.Sequential, xs: list[torch.Tensor], lr: float = 0.1):
    """Training iterations: returns (outputs, gradients) per iteration and updates the model."""
    g = torch.Generator().manual_seed(7)
    outs, grads = [], []
    model.train()
    for x in xs:
        y = model(x)
        r = torch.randn(y.shape, generator=g, dtype=y.dtype)
        model.zero_grad()
        (y * r).sum().backward()
        outs.append(y.detach().clone())
        grads.append([p.grad.clone() for p in model.parameters()])
        _sgd_step(model, lr)
    return outs, grads


def _sgd_step(model: nn.Module, lr: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(lr * p.grad)


def test_window_one_is_batchnorm_bitwise():
    cbn = _pair(window=1)
    bn = _plain_twin(cbn)
    xs = _inputs(3)
    out_a, grads_a = _sgd_run(cbn, xs)
    out_b, grads_b = _sgd_run(bn, xs)
    for a, b in zip(out_a, out_b, strict=True):
        assert torch.equal(a, b)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(ga, gb, strict=True))
    sa, sb = cbn.state_dict(), bn.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert cbn[1].history == []


def test_burn_in_is_batchnorm_then_pooling_starts():
    cbn = _pair(window=3, burn_in=2)
    bn = _plain_twin(cbn)
    xs = _inputs(4)
    out_a, grads_a = _sgd_run(cbn, xs)
    out_b, grads_b = _sgd_run(bn, xs)
    for i in range(2):  # burn-in: exactly BN, nothing recorded
        assert torch.equal(out_a[i], out_b[i])
        assert all(torch.equal(u, v) for u, v in zip(grads_a[i], grads_b[i], strict=True))
    # first iteration after burn-in: the window holds only the current batch -> BN up to rounding
    torch.testing.assert_close(out_a[2], out_b[2], atol=1e-5, rtol=1e-5)
    # then older iterations enter the statistics
    assert not torch.allclose(out_a[3], out_b[3], atol=1e-3)
    assert len(cbn[1].history) == 2
    assert int(cbn[1].num_batches_tracked) == 4


def test_unchanged_weights_and_repeated_batch_equal_batchnorm():
    # the same batch k times at the same weights: every compensated statistic equals the current one,
    # so the pooled statistics are the batch statistics (and the running statistics follow BN's).
    cbn = _pair(window=3, dtype=torch.float64)
    bn = _plain_twin(cbn)
    x = _inputs(1, n=3, dtype=torch.float64)[0]
    cbn.train()
    bn.train()
    for _ in range(4):
        ya, yb = cbn(x), bn(x)
        torch.testing.assert_close(ya, yb, atol=1e-12, rtol=1e-12)
    assert len(cbn[1].history) == 2
    torch.testing.assert_close(cbn[1].running_mean, bn[1].running_mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(cbn[1].running_var, bn[1].running_var, atol=1e-12, rtol=0)


def _record_then_step(model: nn.Sequential, x: torch.Tensor, direction: list[torch.Tensor], h: float):
    """Record iteration statistics of ``x``, move the conv's weights by h * direction, and return
    (compensated (mean, var), directly recomputed (mean, var)) of ``x`` at the new weights."""
    m = copy.deepcopy(model)
    conv, cbn = m[0], m[-1]
    m.train()
    m(x)
    with torch.no_grad():
        for p, d in zip([conv.weight, conv.bias], direction, strict=True):
            p.add_(h * d)
        mean_c, var_c = cbn.compensated_history()[0]
        inp = m[:-1](x)
        direct_var, direct_mean = torch.var_mean(inp, dim=(0, 2, 3), correction=0)
    return (mean_c, var_c), (direct_mean, direct_var)


def test_compensation_exact_mean_and_second_order_variance_for_conv_input():
    model = _pair(window=2, dtype=torch.float64)
    x = _inputs(1, n=3, dtype=torch.float64)[0]
    g = torch.Generator().manual_seed(5)
    direction = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in model[0].parameters()]
    errors = []
    for h in (0.02, 0.01):
        (mc, vc), (md, vd) = _record_then_step(model, x, direction, h)
        # the BN input is linear in the conv's weights: the first-order mean is exact
        torch.testing.assert_close(mc, md, atol=1e-12, rtol=0)
        errors.append((vc - vd).abs().max().item())
    # the second moment is quadratic in the weights: the first-order error is exactly O(h^2)
    assert errors[1] > 0
    assert errors[0] / errors[1] == pytest.approx(4.0, rel=0.02)


def test_compensation_error_quarters_when_the_step_halves_through_a_nonlinearity():
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, 3).double()
    cbn = CrossIterationBatchNorm2d(3, conv, window=2).double()
    model = nn.Sequential(conv, nn.Tanh(), cbn)  # channel c still comes from conv's filter c
    x = _inputs(1, n=3, dtype=torch.float64)[0]
    g = torch.Generator().manual_seed(6)
    direction = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in conv.parameters()]
    mean_err, var_err, naive_err = [], [], []
    for h in (0.004, 0.002, 0.001):
        (mc, vc), (md, vd) = _record_then_step(model, x, direction, h)
        mean_err.append((mc - md).abs().max().item())
        var_err.append((vc - vd).abs().max().item())
        m0 = model[:-1](x).mean(dim=(0, 2, 3))  # stale: the statistics at the old weights
        naive_err.append((m0 - md).abs().max().item())
    for errs in (mean_err, var_err):
        assert errs[0] / errs[1] == pytest.approx(4.0, rel=0.15)
        assert errs[1] / errs[2] == pytest.approx(4.0, rel=0.15)
    # and compensation beats using the stale statistics by far (first-order vs zeroth-order error)
    assert all(c < 0.05 * n for c, n in zip(mean_err, naive_err, strict=True))


def test_compensate_matches_full_jacobian_reference():
    # independent reference: the full Jacobian of the statistics w.r.t. all conv weights (not only each
    # channel's own filter), contracted with the weight change
    torch.manual_seed(4)
    conv = nn.Conv2d(2, 3, 3, groups=1).double()
    x = _inputs(1, n=2, dtype=torch.float64)[0]
    w0, b0 = conv.weight.detach().clone(), conv.bias.detach().clone()

    def stats(w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = nn.functional.conv2d(x, w, b)
        return y.mean(dim=(0, 2, 3)), y.square().mean(dim=(0, 2, 3))

    (jm_w, jm_b), (jn_w, jn_b) = torch.autograd.functional.jacobian(stats, (w0, b0))
    cbn = CrossIterationBatchNorm2d(3, conv, window=2).double()
    cbn.train()
    cbn(conv(x))
    g = torch.Generator().manual_seed(8)
    dw = torch.randn(w0.shape, generator=g, dtype=torch.float64) * 0.05
    db = torch.randn(b0.shape, generator=g, dtype=torch.float64) * 0.05
    with torch.no_grad():
        conv.weight.add_(dw)
        conv.bias.add_(db)
    mu0, nu0 = stats(w0, b0)
    mu_ref = mu0 + (jm_w * dw).sum(dim=(1, 2, 3, 4)) + jm_b @ db
    nu_ref = nu0 + (jn_w * dw).sum(dim=(1, 2, 3, 4)) + jn_b @ db
    mean_c, var_c = cbn.compensated_history()[0]
    torch.testing.assert_close(mean_c, mu_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(var_c, nu_ref - mu_ref.square(), atol=1e-12, rtol=0)


def test_pool_statistics_is_eqs_9_to_11_with_the_max_guard():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(4, generator=g, dtype=torch.float64)
    var = torch.rand(4, generator=g, dtype=torch.float64) + 0.1
    past_means = torch.randn(3, 4, generator=g, dtype=torch.float64)
    past_vars = torch.randn(3, 4, generator=g, dtype=torch.float64)  # some negative: Taylor overshoot
    assert (past_vars < 0).any()
    mu_bar, var_bar = pool_statistics(mean, var, past_means, past_vars)
    means = torch.cat([mean[None], past_means])
    nus = torch.cat([(var + mean**2)[None], past_vars + past_means**2])  # compensated second moments
    nu_bar = torch.maximum(nus, means**2).mean(0)  # eq. 10
    ref_mu = means.mean(0)  # eq. 9
    torch.testing.assert_close(mu_bar, ref_mu, atol=1e-12, rtol=0)
    torch.testing.assert_close(var_bar, nu_bar - ref_mu**2, atol=1e-12, rtol=0)  # eq. 11
    assert (var_bar >= 0).all()
    same = pool_statistics(mean, var, None, None)
    assert same[0] is mean and same[1] is var


def test_compensate_without_gradients_returns_stored_statistics():
    rec = IterationRecord(torch.ones(2), torch.full((2,), 2.0), None, None, None)
    m, v = compensate(rec, torch.zeros(2, 3))
    assert torch.equal(m, rec.mean) and torch.equal(v, rec.var)


def test_training_forward_matches_reference_implementation():
    model = _pair(window=3, dtype=torch.float64)
    conv, cbn = model[0], model[1]
    xs = _inputs(3, n=2, dtype=torch.float64)
    thetas, affine, outs = [], [], []
    model.train()
    for x in xs:
        thetas.append((conv.weight.detach().clone(), conv.bias.detach().clone()))
        affine.append((cbn.weight.detach().clone(), cbn.bias.detach().clone()))
        y = model(x)
        outs.append(y.detach())
        model.zero_grad()
        y.square().sum().backward()
        _sgd_step(model, 0.05)

    def stats(x, w, b):
        z = nn.functional.conv2d(x, w, b)
        return z.mean(dim=(0, 2, 3)), z.square().mean(dim=(0, 2, 3))

    # iteration 2 from scratch: compensate iterations 1 and 0 to theta_2 (eqs. 7-8), pool (eqs. 9-11)
    w2, b2 = thetas[2]
    mus, nus = [], []
    for t in (2, 1, 0):
        wt, bt = thetas[t]
        mu, nu = stats(xs[t], wt, bt)
        (jm_w, jm_b), (jn_w, jn_b) = torch.autograd.functional.jacobian(
            lambda w, b, t=t: stats(xs[t], w, b), (wt, bt)
        )
        dw, db = w2 - wt, b2 - bt
        mus.append(mu + (jm_w * dw).sum(dim=(1, 2, 3, 4)) + jm_b @ db)
        nus.append(nu + (jn_w * dw).sum(dim=(1, 2, 3, 4)) + jn_b @ db)
    mu_t, nu_t = torch.stack(mus), torch.stack(nus)
    mu_bar = mu_t.mean(0)
    var_bar = torch.maximum(nu_t, mu_t**2).mean(0) - mu_bar**2
    z = nn.functional.conv2d(xs[2], w2, b2)
    gamma, beta = affine[2]
    ref = (z - mu_bar.view(1, -1, 1, 1)) / torch.sqrt(var_bar.view(1, -1, 1, 1) + cbn.eps)
    ref = ref * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
    torch.testing.assert_close(outs[2], ref, atol=1e-10, rtol=1e-10)


def test_gradcheck_training_forward_double():
    model = _pair(window=3, dtype=torch.float64)
    _sgd_run(model, _inputs(2, dtype=torch.float64), lr=0.05)  # two iterations of history
    assert len(model[1].history) == 2
    x = _inputs(1, n=2, seed=9, dtype=torch.float64)[0].requires_grad_()
    gamma = model[1].weight.detach().clone().requires_grad_()
    beta = model[1].bias.detach().clone().requires_grad_()

    def f(inp, g, b):
        m = copy.deepcopy(model)  # fresh history and counters for every evaluation
        return functional_call(m, {"1.weight": g, "1.bias": b}, (inp,))

    assert torch.autograd.gradcheck(f, (x, gamma, beta), eps=1e-6, atol=1e-6, fast_mode=True)


def test_gradcheck_pool_statistics_double():
    g = torch.Generator().manual_seed(2)
    mean = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    var = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    pm = torch.randn(2, 3, generator=g, dtype=torch.float64)
    pv = torch.rand(2, 3, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda m, v: pool_statistics(m, v, pm, pv), (mean, var))


def test_eval_is_batchnorm_with_running_statistics():
    model = _pair(window=3)
    _sgd_run(model, _inputs(4))
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict(model[1].state_dict())
    plain.eval()
    model.eval()
    x = _inputs(1, n=4, seed=3)[0]
    z = model[0](x)
    assert torch.equal(model[1](z), plain(z))


def test_no_grad_training_forward_is_batchnorm_and_not_recorded():
    model = _pair(window=3)
    twin = _plain_twin(model)
    model.train()
    twin.train()
    x = _inputs(1)[0]
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))
    assert model[1].history == []


def test_naive_cbn_pools_stale_statistics():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3).double()
    cbn = CrossIterationBatchNorm2d(3, conv, window=2, compensate=False).double()
    model = nn.Sequential(conv, cbn).train()
    x0, x1 = _inputs(2, n=2, dtype=torch.float64)
    model(x0)
    rec = cbn.history[0]
    assert rec.grad_mean is None
    with torch.no_grad():
        conv.weight.mul_(1.1)
    y = model(x1)
    z = conv(x1).detach()
    var1, mu1 = torch.var_mean(z, dim=(0, 2, 3), correction=0)
    mu_bar, var_bar = pool_statistics(mu1, var1, rec.mean[None], rec.var[None])
    ref = (z - mu_bar.view(1, -1, 1, 1)) / torch.sqrt(var_bar.view(1, -1, 1, 1) + cbn.eps)
    ref = ref * cbn.weight.view(1, -1, 1, 1) + cbn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)


def test_frozen_conv_is_not_compensated():
    model = _pair(window=2)
    for p in model[0].parameters():
        p.requires_grad_(False)
    model.train()
    x = _inputs(1)[0]
    model(x)
    assert model[1].history[0].grad_mean is None


def test_state_dict_and_history_reset():
    model = _pair(window=3)
    _sgd_run(model, _inputs(2))
    assert len(model[1].history) == 2
    assert set(model.state_dict()) == {
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    }
    model.load_state_dict(model.state_dict())
    assert model[1].history == []
    copied = copy.deepcopy(model)
    assert copied[1].conv is copied[0]  # the pair stays linked in a copy of the model
    assert find_norm_layers(model)[0].name == "1"  # post-hoc tools see a BN layer


def test_convert_sequential_pairs_and_back():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 3, 3), nn.BatchNorm2d(3)),
        nn.BatchNorm2d(3),  # not after a conv: left alone
    )
    x = _inputs(1, n=3)[0]
    model.train()
    model(x)  # non-trivial running statistics
    model.eval()
    before = model(x)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    out = convert_to_cross_iteration(model, window=3, burn_in=5)
    assert out is model
    assert isinstance(model[1], CrossIterationBatchNorm2d) and model[1].conv is model[0]
    assert isinstance(model[3][1], CrossIterationBatchNorm2d) and model[3][1].conv is model[3][0]
    assert type(model[4]) is nn.BatchNorm2d
    assert model[1].window == 3 and model[1].burn_in == 5 and int(model[1].num_batches_tracked) == 1
    sd = model.state_dict()
    assert sd.keys() == keys.keys() and all(torch.equal(sd[k], keys[k]) for k in keys)
    assert torch.equal(model(x), before)
    back = convert_to_batchnorm(model)
    assert type(back[1]) is nn.BatchNorm2d and type(back[3][1]) is nn.BatchNorm2d


def test_bad_construction_and_inputs():
    conv = nn.Conv2d(2, 3, 3)
    with pytest.raises(UsageError, match=r"nn\.Conv2d"):
        CrossIterationBatchNorm2d(3, nn.Linear(2, 3))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="output channels"):
        CrossIterationBatchNorm2d(4, conv)
    with pytest.raises(UsageError, match="window"):
        CrossIterationBatchNorm2d(3, conv, window=0)
    with pytest.raises(UsageError, match="burn_in"):
        CrossIterationBatchNorm2d(3, conv, burn_in=-1)
    cbn = CrossIterationBatchNorm2d(3, conv, window=2).train()
    with pytest.raises(UsageError, match="4D"):
        cbn(torch.randn(2, 3, 4))
    # an input that does not come from the conv
    with pytest.raises(UsageError, match="does not depend"):
        cbn(torch.randn(2, 3, 4, 4))
    other = nn.Conv2d(2, 3, 3)
    with pytest.raises(UsageError, match="does not depend"):
        cbn(other(torch.randn(2, 2, 6, 6)))
    with pytest.raises(NoBatchNormError):
        convert_to_cross_iteration(nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU()))
    with pytest.raises(UsageError, match="window"):
        convert_to_cross_iteration(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)), window=0)
    untracked = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(UsageError, match="track_running_stats"):
        convert_to_cross_iteration(untracked)
    assert type(untracked[1]) is nn.BatchNorm2d  # nothing half-converted
