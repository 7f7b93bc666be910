from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bncorrect.errors import DataError, UsageError
from bncorrect.layers import find_norm_layers
from bncorrect.nn import FullBatchNorm, Moments, conv_patches, input_moments


def _data(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Correlated features with a non-zero mean (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    mix = torch.randn(shape[1], shape[1], generator=g, dtype=torch.float64)
    x = torch.einsum("ij,nj...->ni...", mix, x)
    return x + torch.arange(shape[1], dtype=torch.float64).reshape(1, -1, *([1] * (len(shape) - 2)))


def _loader(x: torch.Tensor, batch: int, labels: bool = True):
    y = torch.zeros(x.shape[0], dtype=torch.long)
    for i in range(0, x.shape[0], batch):
        yield (x[i : i + batch], y[i : i + batch]) if labels else x[i : i + batch]


def _direct_stats(z: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    zc = z.movedim(channel_dim, -1).reshape(-1, z.shape[channel_dim])
    return zc.mean(0), zc.var(0, correction=0)


def test_linear_moments_and_statistics():
    x = _data((203, 5))
    moments = input_moments(nn.Linear(5, 3), _loader(x, 37))  # uneven last batch
    assert moments.count == 203
    xn = x.numpy()
    np.testing.assert_allclose(moments.mean.numpy(), xn.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(moments.cov.numpy(), np.cov(xn, rowvar=False, bias=True), rtol=0, atol=1e-10)
    layer = nn.Linear(5, 3).double()
    fbn = FullBatchNorm(layer, moments)
    mean, var = fbn.statistics()
    z = layer(x).detach()
    m_ref, v_ref = _direct_stats(z, -1)
    torch.testing.assert_close(mean.detach(), m_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(var.detach(), v_ref, rtol=0, atol=1e-6)
    assert (
        float((mean.detach() - m_ref).abs().max()) < 1e-10
        and float((var.detach() - v_ref).abs().max()) < 1e-10
    )


def test_linear_on_sequences_uses_every_position():
    x = _data((40, 4, 6)).transpose(1, 2).contiguous()  # (N, L, features)
    layer = nn.Linear(4, 2).double()
    fbn = FullBatchNorm.from_data(layer, _loader(x, 16, labels=False))
    mean, var = fbn.statistics()
    m_ref, v_ref = _direct_stats(layer(x).detach(), -1)
    torch.testing.assert_close(mean.detach(), m_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(var.detach(), v_ref, rtol=0, atol=1e-10)
    y = fbn(x)
    assert y.shape == (40, 6, 2)
    eps = fbn.eps
    torch.testing.assert_close(y, (layer(x) - m_ref) / torch.sqrt(v_ref + eps) * fbn.weight + fbn.bias)


CONVS = {
    "conv2d-pad-stride-dilation": (
        lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=2),
        (30, 3, 9, 8),
    ),
    "conv2d-grouped": (lambda: nn.Conv2d(4, 6, (2, 3), padding=(1, 0), groups=2), (30, 4, 6, 7)),
    "conv2d-depthwise-same": (lambda: nn.Conv2d(3, 3, 4, padding="same", groups=3), (20, 3, 6, 6)),
    "conv2d-reflect-no-bias": (
        lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect", bias=False),
        (20, 2, 5, 5),
    ),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=2), (25, 3, 11)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, padding=1), (10, 2, 3, 4, 3)),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("case", list(CONVS))
def test_conv_statistics_equal_direct_dataset_statistics(case):
    make, shape = CONVS[case]
    torch.manual_seed(0)
    conv = make().double()
    x = _data(shape, 1)
    fbn = FullBatchNorm.from_data(conv, _loader(x, 7))
    mean, var = fbn.statistics()
    z = conv(x).detach()
    m_ref, v_ref = _direct_stats(z, 1)
    assert float((mean.detach() - m_ref).abs().max()) <= 1e-6
    assert float((var.detach() - v_ref).abs().max()) <= 1e-6
    y = fbn(x)
    view = (1, -1, *([1] * (z.dim() - 2)))
    expected = (z - m_ref.reshape(view)) / torch.sqrt(v_ref + fbn.eps).reshape(view)
    expected = expected * fbn.weight.reshape(view) + fbn.bias.reshape(view)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(fbn.eval()(x), y, rtol=0, atol=0)  # the same in training and inference


@pytest.mark.parametrize("case", ["conv2d-pad-stride-dilation", "conv2d-reflect-no-bias", "conv1d", "conv3d"])
def test_patches_reproduce_the_convolution(case):
    make, shape = CONVS[case]
    torch.manual_seed(0)
    conv = make().double()
    x = _data(shape, 2)[:3]
    rows = conv_patches(x, conv)
    z = conv(x).detach()
    lin = rows @ conv.weight.detach().reshape(conv.out_channels, -1).T
    if conv.bias is not None:
        lin = lin + conv.bias.detach()
    expected = z.movedim(1, -1).reshape(-1, conv.out_channels)
    torch.testing.assert_close(lin, expected, rtol=0, atol=1e-12)


def test_gradcheck():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 2, 2, padding=1).double()
    x_data = _data((12, 2, 3, 3), 3)
    fbn = FullBatchNorm.from_data(conv, [x_data])
    x = _data((1, 2, 2, 2), 4).requires_grad_(True)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in fbn.named_parameters()}
    names = list(params)

    def f(x, *values):
        return torch.func.functional_call(fbn, dict(zip(names, values, strict=True)), (x,))

    assert set(names) == {"weight", "bias", "layer.weight", "layer.bias"}
    assert torch.autograd.gradcheck(f, (x, *params.values()))


def test_differentiable_in_the_weight_and_trains():
    x = _data((64, 3), 5)
    layer = nn.Linear(3, 2)
    fbn = FullBatchNorm.from_data(layer, _loader(x, 16))
    before = layer.weight.detach().clone()
    opt = torch.optim.SGD(fbn.parameters(), lr=0.1)
    loss = (fbn(x.float())[:, 0] - x[:, 0].float()).square().mean()
    loss.backward()
    assert layer.weight.grad is not None and float(layer.weight.grad.abs().sum()) > 0
    opt.step()
    assert not torch.equal(before, layer.weight.detach())
    # the statistics follow the new weight: normalized outputs over the dataset still have mean 0
    with torch.no_grad():
        y = fbn(x.float())
    torch.testing.assert_close(y.mean(0), fbn.bias.detach(), rtol=0, atol=1e-5)


def test_state_dict_round_trip_and_not_a_bn_layer():
    x = _data((30, 4), 6)
    fbn = FullBatchNorm.from_data(nn.Linear(4, 2), _loader(x, 8))
    other = FullBatchNorm(nn.Linear(4, 2))
    other.load_state_dict(fbn.state_dict())
    torch.testing.assert_close(other(x.float()), fbn(x.float()), rtol=0, atol=0)
    assert int(other.input_count) == 30
    assert (
        find_norm_layers(nn.Sequential(fbn)) == []
    )  # no running statistics: nothing for bncorrect to correct


def test_errors():
    with pytest.raises(UsageError, match=r"needs an nn\.Linear or nn\.Conv"):
        FullBatchNorm(nn.BatchNorm1d(3))
    with pytest.raises(UsageError, match="no input moments yet"):
        FullBatchNorm(nn.Linear(3, 2))(torch.randn(4, 3))
    bad = Moments(10, torch.zeros(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64))
    with pytest.raises(UsageError, match="do not fit"):
        FullBatchNorm(nn.Linear(3, 2), bad)
    with pytest.raises(DataError, match="no data"):
        input_moments(nn.Linear(3, 2), [])
    with pytest.raises(DataError, match=r"does not fit nn\.Linear with 3 features"):
        input_moments(nn.Linear(3, 2), [torch.randn(4, 5)])
    with pytest.raises(DataError, match="does not fit Conv2d with 3 input channels"):
        input_moments(nn.Conv2d(3, 2, 1), [torch.randn(4, 2, 5, 5)])
    with pytest.raises(DataError, match="cannot find the input"):
        input_moments(nn.Linear(3, 2), [{"x": torch.randn(4, 3)}])
    moments = input_moments(nn.Linear(3, 2), [{"x": torch.randn(4, 3)}], transform=lambda b: b["x"])
    assert moments.count == 4
