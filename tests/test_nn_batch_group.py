from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bncorrect.errors import NoBatchNormError, UsageError
from bncorrect.nn import (
    BatchGroupNorm1d,
    BatchGroupNorm2d,
    BatchGroupNorm3d,
    GhostBatchNorm2d,
    convert_to_batch_group,
    convert_to_batchnorm,
)

from .bn_layers import forward_backward, randomize_bn


def _input(shape, seed):
    g = torch.Generator().manual_seed(seed)
    offsets = torch.randn(shape[1], generator=g, dtype=torch.float64).reshape(
        1, -1, *([1] * (len(shape) - 2))
    )
    return torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 3 * offsets


def _reference(x: np.ndarray, gc: int, ge: int, gamma, beta, eps):
    """Loop over (example group, channel group) blocks; returns y and per-(example group, channel) stats."""
    n, c = x.shape[:2]
    cg = c // gc
    y = np.empty_like(x)
    means = np.empty((n // ge, c))
    uvars = np.empty((n // ge, c))
    for e in range(n // ge):
        for g in range(gc):
            rows, chans = slice(e * ge, (e + 1) * ge), slice(g * cg, (g + 1) * cg)
            block = x[rows, chans]
            mu, var = block.mean(), block.var()
            shape = (1, cg) + (1,) * (x.ndim - 2)
            y[rows, chans] = gamma[chans].reshape(shape) * (block - mu) / np.sqrt(var + eps) + beta[
                chans
            ].reshape(shape)
            means[e, chans] = mu
            uvars[e, chans] = block.var(ddof=1)
    return y, means, uvars


@pytest.mark.parametrize(
    ("cls", "shape", "gc", "ge"),
    [
        (BatchGroupNorm2d, (4, 6, 3, 3), 2, 2),
        (BatchGroupNorm2d, (6, 6, 2, 3), 3, 3),
        (BatchGroupNorm1d, (8, 4), 2, 2),
        (BatchGroupNorm1d, (4, 4, 5), 4, 1),
        (BatchGroupNorm3d, (4, 4, 2, 2, 3), 2, 4),
    ],
)
def test_matches_blockwise_reference(cls, shape, gc, ge):
    layer = randomize_bn(cls(shape[1], gc, ge, momentum=0.2).double()).train()
    rm0, rv0 = layer.running_mean.clone(), layer.running_var.clone()
    x = _input(shape, 1)
    y = layer(x)
    gamma, beta = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    y_ref, means, uvars = _reference(x.numpy(), gc, ge, gamma, beta, layer.eps)
    np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(
        layer.running_mean.numpy(), 0.8 * rm0.numpy() + 0.2 * means.mean(0), atol=1e-12
    )
    np.testing.assert_allclose(layer.running_var.numpy(), 0.8 * rv0.numpy() + 0.2 * uvars.mean(0), atol=1e-12)
    layer.eval()
    torch.testing.assert_close(
        layer(x),
        F.batch_norm(
            x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps
        ),
        rtol=0,
        atol=0,
    )


def test_one_channel_per_group_whole_batch_is_batchnorm():
    bn = randomize_bn(nn.BatchNorm2d(4).double()).train()
    bgn = BatchGroupNorm2d(4, channel_groups=4).double()
    bgn.load_state_dict(bn.state_dict())
    bgn.train()
    r = _input((6, 4, 3, 3), 9)
    for step in range(2):
        x = _input((6, 4, 3, 3), step)
        got = forward_backward(bgn, x, r)
        for a, b in zip(got, forward_backward(bn, x, r), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
        expected = F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        torch.testing.assert_close(got[0], expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(bgn.running_mean, bn.running_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(bgn.running_var, bn.running_var, rtol=0, atol=1e-12)
    assert int(bgn.num_batches_tracked) == int(bn.num_batches_tracked) == 2


@pytest.mark.parametrize(("cls", "shape"), [(BatchGroupNorm2d, (3, 6, 4, 4)), (BatchGroupNorm1d, (5, 6))])
def test_one_example_per_group_is_group_norm(cls, shape):
    layer = randomize_bn(cls(6, channel_groups=3, examples_per_group=1).double()).train()
    x = _input(shape, 2)
    r = _input(shape, 3)
    got = forward_backward(layer, x, r)
    xr = x.clone().requires_grad_(True)
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    y = F.group_norm(xr, 3, w, b, layer.eps)
    (y * r).sum().backward()
    for a, e in zip(got, (y.detach(), xr.grad, w.grad, b.grad), strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-10)


def test_one_channel_per_group_is_ghost_batchnorm():
    bgn = randomize_bn(BatchGroupNorm2d(3, 3, 2).double()).train()
    ghost = GhostBatchNorm2d(3, 2).double()
    ghost.load_state_dict(bgn.state_dict())
    ghost.train()
    x = _input((6, 3, 3, 3), 4)
    torch.testing.assert_close(bgn(x), ghost(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(bgn.running_mean, ghost.running_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(bgn.running_var, ghost.running_var, rtol=0, atol=1e-12)


def test_running_stats_are_shared_within_a_channel_group():
    bgn = BatchGroupNorm2d(6, 2, 2, momentum=1.0).double().train()
    bgn(_input((4, 6, 3, 3), 5))
    rm, rv = bgn.running_mean.reshape(2, 3), bgn.running_var.reshape(2, 3)
    torch.testing.assert_close(rm, rm[:, :1].expand(2, 3), rtol=0, atol=0)
    torch.testing.assert_close(rv, rv[:, :1].expand(2, 3), rtol=0, atol=0)


def test_without_running_stats_eval_uses_group_statistics():
    layer = BatchGroupNorm2d(4, 2, 1, track_running_stats=False).double()
    x = _input((3, 4, 3, 3), 6)
    torch.testing.assert_close(layer.eval()(x), F.group_norm(x, 2, layer.weight, layer.bias, layer.eps))


@pytest.mark.parametrize(
    ("cls", "shape"),
    [(BatchGroupNorm1d, (4, 4)), (BatchGroupNorm2d, (4, 4, 2, 3)), (BatchGroupNorm3d, (4, 4, 2, 2, 2))],
)
def test_gradcheck(cls, shape):
    layer = cls(4, 2, 2).double().train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_convert_round_trip():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6)
    )
    randomize_bn(model[1].double(), 1)
    randomize_bn(model[4].double(), 2)
    model.double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_to_batch_group(model, channel_groups=2, examples_per_group=2)
    assert isinstance(converted[1], BatchGroupNorm2d) and converted[4].channel_groups == 2
    assert list(converted.state_dict()) == list(before)
    x = _input((4, 2, 5, 5), 3)
    y = converted.eval()(x)
    plain = convert_to_batchnorm(converted)
    assert type(plain[1]) is nn.BatchNorm2d
    torch.testing.assert_close(plain.eval()(x), y, rtol=0, atol=0)
    fresh = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6)
    )
    fresh.double().load_state_dict(converted.state_dict(), strict=True)
    for k, v in before.items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0)


def test_bad_groupings():
    with pytest.raises(UsageError, match="channel_groups must divide the number of channels 6"):
        BatchGroupNorm2d(6, 4)
    with pytest.raises(UsageError, match="channel_groups must divide"):
        BatchGroupNorm2d(6, 0)
    with pytest.raises(UsageError, match="examples_per_group must be >= 1"):
        BatchGroupNorm2d(6, 3, 0)
    with pytest.raises(UsageError, match="not a multiple of the examples_per_group 4"):
        BatchGroupNorm2d(6, 3, 4).train()(torch.randn(6, 6, 2, 2))
    with pytest.raises(UsageError, match="expected 6 channels"):
        BatchGroupNorm2d(6, 3).train()(torch.randn(4, 5, 2, 2))
    with pytest.raises(UsageError, match="at least 2 are needed"):
        BatchGroupNorm1d(4, 4, 1).train()(torch.randn(4, 4))  # one value per group: no variance
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(6)))
    with pytest.raises(UsageError, match=r"1\.0: 6 channels cannot be split into 4 channel groups"):
        convert_to_batch_group(model, channel_groups=4)
    with pytest.raises(NoBatchNormError):
        convert_to_batch_group(nn.Sequential(nn.ReLU()), channel_groups=1)
