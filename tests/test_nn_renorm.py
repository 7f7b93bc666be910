from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from bncorrect.errors import NoBatchNormError, UsageError
from bncorrect.nn import (
    PAPER_D_MAX,
    PAPER_R_MAX,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    Ramp,
    convert_to_batchnorm,
    convert_to_renorm,
)

from .bn_layers import forward_backward, randomize_bn

CASES = {
    "1d-2d-input": (nn.BatchNorm1d, BatchRenorm1d, (8, 3)),
    "1d-3d-input": (nn.BatchNorm1d, BatchRenorm1d, (6, 3, 5)),
    "2d": (nn.BatchNorm2d, BatchRenorm2d, (4, 3, 4, 5)),
    "3d": (nn.BatchNorm3d, BatchRenorm3d, (3, 3, 2, 3, 4)),
}


def _input(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 + 1.5


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("moving_std", [True, False])
def test_rmax_one_dmax_zero_is_batchnorm(case, moving_std):
    bn_cls, renorm_cls, shape = CASES[case]
    bn = randomize_bn(bn_cls(shape[1], momentum=0.1).double()).train()
    renorm = renorm_cls(shape[1], momentum=0.1, r_max=1.0, d_max=0.0, moving_std=moving_std).double()
    renorm.load_state_dict(bn.state_dict())
    renorm.train()
    r = _input(shape, 99)
    for step in range(3):
        x = _input(shape, step)
        for a, b in zip(forward_backward(renorm, x, r), forward_backward(bn, x, r), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert int(renorm.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    if not moving_std:  # torch's running statistics: exactly nn.BatchNorm's
        torch.testing.assert_close(renorm.running_mean, bn.running_mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(renorm.running_var, bn.running_var, rtol=0, atol=1e-12)


def _algorithm1(xs, mu, sigma, gamma, beta, eps, alpha, r_max, d_max):
    """Ioffe's Algorithm 1, straightforwardly in numpy float64, for (N, C) inputs; yields y, r, d per step."""
    out = []
    for x in xs:
        mu_b = x.mean(axis=0)
        sigma_b = np.sqrt(((x - mu_b) ** 2).mean(axis=0) + eps)
        r = np.clip(sigma_b / sigma, 1.0 / r_max, r_max)
        d = np.clip((mu_b - mu) / sigma, -d_max, d_max)
        y = gamma * ((x - mu_b) / sigma_b * r + d) + beta
        out.append((y, r, d))
        mu = mu + alpha * (mu_b - mu)
        sigma = sigma + alpha * (sigma_b - sigma)
    return out, mu, sigma


def test_paper_algorithm_outputs_and_moving_statistics():
    c, eps, alpha = 4, 1e-3, 0.3
    layer = randomize_bn(BatchRenorm1d(c, eps=eps, momentum=alpha, r_max=1.5, d_max=0.5).double()).train()
    mu0 = layer.running_mean.numpy().copy()
    sigma0 = np.sqrt(layer.running_var.numpy() + eps)
    gamma, beta = layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy()
    xs = [_input((6, c), s).numpy() for s in range(4)]
    ref, mu, sigma = _algorithm1(xs, mu0, sigma0, gamma, beta, eps, alpha, 1.5, 0.5)
    clipped_r = clipped_d = 0
    for x, (y_ref, r_ref, d_ref) in zip(xs, ref, strict=True):
        np.testing.assert_allclose(layer(torch.from_numpy(x)).detach().numpy(), y_ref, rtol=0, atol=1e-12)
        clipped_r += int(np.isclose(np.abs(np.log(r_ref)), np.log(1.5)).sum())
        clipped_d += int(np.isclose(np.abs(d_ref), 0.5).sum())
    assert clipped_r > 0 and clipped_d > 0  # the clipping is exercised
    np.testing.assert_allclose(layer.running_mean.numpy(), mu, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.sqrt(layer.running_var.numpy() + eps), sigma, rtol=0, atol=1e-12)
    # inference: gamma * (x - mu) / sigma + beta with the moving statistics
    x = _input((5, c), 50).numpy()
    y = layer.eval()(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(y, gamma * (x - mu) / sigma + beta, rtol=0, atol=1e-12)


def test_r_and_d_are_constants_in_the_gradient():
    c, eps = 3, 1e-5
    layer = randomize_bn(BatchRenorm2d(c, eps=eps, r_max=2.0, d_max=1.0).double(), seed=3).train()
    mu = layer.running_mean.clone()
    sigma = torch.sqrt(layer.running_var + eps)
    x = _input((4, c, 3, 3), 7)
    rr = _input((4, c, 3, 3), 8)
    got = forward_backward(layer, x, rr)

    xr = x.clone().requires_grad_(True)
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    dims = (0, 2, 3)
    mu_b = xr.mean(dims)
    sigma_b = torch.sqrt(((xr - mu_b.reshape(1, -1, 1, 1)) ** 2).mean(dims) + eps)
    with torch.no_grad():
        r = (sigma_b / sigma).clamp(0.5, 2.0)
        d = ((mu_b - mu) / sigma).clamp(-1.0, 1.0)
    shape = (1, -1, 1, 1)
    xhat = (xr - mu_b.reshape(shape)) / sigma_b.reshape(shape) * r.reshape(shape) + d.reshape(shape)
    y = w.reshape(shape) * xhat + b.reshape(shape)
    (y * rr).sum().backward()
    assert not torch.allclose(r, torch.ones_like(r))
    for a, e in zip(got, (y.detach(), xr.grad, w.grad, b.grad), strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-10)


@pytest.mark.parametrize("case", list(CASES))
def test_gradcheck(case):
    _, renorm_cls, shape = CASES[case]
    shape = (4, 2, *(min(s, 3) for s in shape[2:]))
    layer = randomize_bn(renorm_cls(2, r_max=1.5, d_max=0.5).double(), seed=2).train()
    # Moving statistics far from the batch's: r and d are clipped in every channel, so they are locally
    # constant and the finite differences see exactly the stop-gradient derivative (the unclipped case is
    # checked against an explicit detach in test_r_and_d_are_constants_in_the_gradient).
    with torch.no_grad():
        layer.running_mean.fill_(100.0)
        layer.running_var.fill_(1e4)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    state = copy.deepcopy(layer.state_dict())

    def f(x, w, b):
        layer.load_state_dict(state)  # the same moving statistics (and so r, d regime) at every call
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_ramp_and_paper_schedules():
    ramp = Ramp(1.0, 3.0, 10, 30)
    assert [ramp(s) for s in (0, 10, 20, 30, 100)] == [1.0, 1.0, 2.0, 3.0, 3.0]
    assert PAPER_R_MAX(0) == 1.0 and PAPER_R_MAX(5_000) == 1.0 and PAPER_R_MAX(40_000) == 3.0
    assert PAPER_R_MAX(22_500) == pytest.approx(2.0)
    assert (
        PAPER_D_MAX(5_000) == 0.0 and PAPER_D_MAX(15_000) == pytest.approx(2.5) and PAPER_D_MAX(25_000) == 5.0
    )
    layer = BatchRenorm1d(3, r_max=Ramp(1.0, 2.0, 1, 3), d_max=Ramp(0.0, 1.0, 0, 2)).train()
    seen = []
    for step in range(4):
        seen.append(layer.current_bounds())
        layer(torch.randn(5, 3, generator=torch.Generator().manual_seed(step)))
    assert seen == [(1.0, 0.0), (1.0, 0.5), (1.5, 1.0), (2.0, 1.0)]
    assert int(layer.num_batches_tracked) == 4
    assert set(layer.state_dict()) == set(nn.BatchNorm1d(3).state_dict())  # the step counter is BN's own


def test_convert_to_renorm_and_back():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4))
    model.append(nn.BatchNorm1d(4))
    randomize_bn(model[1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_to_renorm(model, r_max=2.0, d_max=1.0, momentum=0.05)
    assert isinstance(converted[1], BatchRenorm2d) and isinstance(converted[5], BatchRenorm1d)
    assert converted[1].momentum == 0.05 and converted[1].r_max == 2.0
    after = converted.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)
    x = torch.randn(2, 2, 4, 4)
    y_eval = converted.eval()(x)
    back = convert_to_batchnorm(converted)
    assert type(back[1]) is nn.BatchNorm2d and type(back[5]) is nn.BatchNorm1d
    torch.testing.assert_close(back.eval()(x), y_eval, rtol=0, atol=0)


def test_bad_arguments():
    with pytest.raises(UsageError, match="r_max must be >= 1"):
        BatchRenorm2d(3, r_max=0.5)
    with pytest.raises(UsageError, match="d_max must be >= 0"):
        BatchRenorm2d(3, d_max=Ramp(0.0, -1.0, 0, 10))
    with pytest.raises(UsageError, match="momentum"):
        BatchRenorm2d(3, momentum=None)
    with pytest.raises(UsageError, match="begin <= finish"):
        Ramp(1.0, 3.0, 10, 5)
    with pytest.raises(UsageError, match="expects 5D input"):
        BatchRenorm3d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(UsageError, match="at least 2 are needed"):
        BatchRenorm1d(3).train()(torch.randn(1, 3))
    with pytest.raises(UsageError, match="without running statistics"):
        convert_to_renorm(nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)))
    with pytest.raises(NoBatchNormError):
        convert_to_renorm(nn.Sequential(nn.Linear(2, 2)))
    bn = nn.BatchNorm2d(3)
    assert convert_to_renorm(nn.Sequential(nn.Linear(2, 2)), strict=False)[0].in_features == 2
    assert isinstance(convert_to_renorm(bn), BatchRenorm2d)  # the root itself is converted
