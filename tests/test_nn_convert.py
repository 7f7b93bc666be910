"""Converters of bncorrect.nn, and the training-side layers together with bncorrect's post-hoc tool."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bncorrect.errors import NoBatchNormError, UsageError
from bncorrect.layers import CorrectedNorm, correct_model, find_norm_layers, normalization_mode
from bncorrect.nn import (
    BatchGroupNorm2d,
    BatchRenorm2d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    convert_to_batchnorm,
    convert_to_ghost,
)

from . import toys
from .reference import corrected_bn_reference


class BNAct(nn.BatchNorm2d):
    """A BN subclass that adds behaviour after normalizing: converters must leave it alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


def _corrected_reference(layer: nn.Module, inp: torch.Tensor, alpha: float, beta: float):
    """DESIGN §2's corrected layer on ``inp`` with ``layer``'s statistics and affine parameters."""
    return corrected_bn_reference(
        inp.numpy(),
        layer.running_mean.numpy(),
        layer.running_var.numpy(),
        layer.weight.detach().numpy(),
        layer.bias.detach().numpy(),
        layer.eps,
        alpha,
        beta,
    )


def _mixed_model() -> nn.Module:
    model = nn.Sequential(
        nn.Conv3d(2, 3, 1),
        nn.BatchNorm3d(3),
        nn.Flatten(2),
        nn.BatchNorm1d(3),
        nn.Sequential(nn.Unflatten(2, (4, 4)), nn.BatchNorm2d(3), BNAct(3), nn.SyncBatchNorm(3)),
    )
    return toys._init(model, seed=3).train()


def test_convert_to_ghost_keeps_state_and_round_trips():
    model = _mixed_model()
    params_before = {n: p for n, p in model.named_parameters()}
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    ghost = convert_to_ghost(model, 2)
    assert type(ghost[1]) is GhostBatchNorm3d and type(ghost[3]) is GhostBatchNorm1d
    assert type(ghost[4][1]) is GhostBatchNorm2d
    assert type(ghost[4][2]) is BNAct and type(ghost[4][3]) is nn.SyncBatchNorm  # left alone
    assert all(m.training for m in ghost.modules())
    assert list(ghost.state_dict()) == list(sd_before)
    for k, v in ghost.state_dict().items():
        torch.testing.assert_close(v, sd_before[k], rtol=0, atol=0)
    for n, p in ghost.named_parameters():
        assert p is params_before[n]  # the same Parameter objects: an existing optimizer keeps working
    # a ghost checkpoint loads into the plain model, strictly
    plain = _mixed_model()
    plain.load_state_dict(ghost.state_dict(), strict=True)
    back = convert_to_batchnorm(ghost)
    assert (
        type(back[1]) is nn.BatchNorm3d
        and type(back[3]) is nn.BatchNorm1d
        and type(back[4][1]) is nn.BatchNorm2d
    )
    assert list(back.state_dict()) == list(sd_before)
    x = torch.randn(4, 2, 2, 2, 4)
    torch.testing.assert_close(back.eval()(x), plain.eval()(x), rtol=0, atol=0)


def test_converting_the_root_and_negative_cases():
    bn = nn.BatchNorm2d(3).eval()
    ghost = convert_to_ghost(bn, 4)
    assert isinstance(ghost, GhostBatchNorm2d) and not ghost.training and ghost.group_size == 4
    assert type(convert_to_batchnorm(ghost)) is nn.BatchNorm2d
    with pytest.raises(NoBatchNormError):
        convert_to_ghost(nn.Sequential(nn.Linear(2, 2), BNAct(2)), 2)
    assert isinstance(convert_to_ghost(nn.Linear(2, 2), 2, strict=False), nn.Linear)
    with pytest.raises(NoBatchNormError):
        convert_to_batchnorm(nn.Sequential(nn.BatchNorm2d(2)))
    with pytest.raises(UsageError, match="group_size must be >= 1"):
        convert_to_ghost(nn.BatchNorm2d(2), 0)
    with pytest.raises(UsageError, match="running_update"):
        convert_to_ghost(nn.BatchNorm2d(2), 2, running_update="never")


def test_ghost_train_then_posthoc_correction():
    """Train a ghost-BN model 2 steps; bncorrect corrects it as is and after loading it into plain BN."""
    g = 4
    model = convert_to_ghost(toys.conv_net(seed=0).train(), g)
    x, y = toys.data(16, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = model[1].running_mean.clone()
    for step in range(2):
        xb, yb = x[step * 8 : (step + 1) * 8], y[step * 8 : (step + 1) * 8]
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    assert not torch.equal(before, model[1].running_mean)

    # bncorrect sees the ghost layers themselves (they subclass BN) and can correct them
    found = find_norm_layers(model)
    assert [ly.type for ly in found] == ["GhostBatchNorm2d", "GhostBatchNorm2d", "GhostBatchNorm1d"]
    assert all(ly.correctable for ly in found)

    # ... and the same checkpoint loaded into the plain architecture
    plain = toys.conv_net(seed=5)
    plain.load_state_dict(model.state_dict(), strict=True)

    # the estimator's training-mode normalization with B = G reproduces ghost training exactly
    probe = toys.data(8, seed=2)[0]
    ghost_copy = copy.deepcopy(model)
    ghost_train_out = ghost_copy.train()(probe)
    wrapped_plain = correct_model(copy.deepcopy(plain), 0.0)
    with torch.no_grad(), normalization_mode(wrapped_plain, "batch", g):
        batch_mode_out = wrapped_plain(probe)
    torch.testing.assert_close(batch_mode_out, ghost_train_out.detach(), rtol=0, atol=1e-5)

    alpha = 1.0 / g**2
    corrected_ghost = correct_model(copy.deepcopy(model), alpha).eval()
    corrected_plain = correct_model(copy.deepcopy(plain), alpha).eval()
    assert all(isinstance(corrected_ghost[i], CorrectedNorm) for i in (1, 5, 10))
    with torch.no_grad():
        out_ghost = corrected_ghost(probe)
        out_plain = corrected_plain(probe)
        out_ema = plain.eval()(probe)
    torch.testing.assert_close(out_ghost, out_plain, rtol=0, atol=1e-5)
    assert float((out_ghost - out_ema).abs().max()) > 1e-3  # the correction does something

    # one corrected ghost layer against the straightforward reference of DESIGN §2
    layer = copy.deepcopy(model[1]).eval()
    wrapped = CorrectedNorm(layer, 0.3, 0.2).eval()
    inp = torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(4)) * 2 + 0.5
    ref = _corrected_reference(layer, inp, 0.3, 0.2)
    with torch.no_grad():
        np.testing.assert_allclose(wrapped(inp).numpy(), ref, rtol=0, atol=1e-5)
    # in training mode the wrapped layer is still ghost BN
    wrapped.train()
    layer_train = copy.deepcopy(model[1]).train()
    torch.testing.assert_close(wrapped(inp), layer_train(inp), rtol=0, atol=0)


@pytest.mark.parametrize(
    "make", [lambda: BatchRenorm2d(6, r_max=2.0, d_max=1.0), lambda: BatchGroupNorm2d(6, 3, 2)]
)
def test_other_layers_are_corrected_through_their_eval_forward(make):
    layer = toys._init(nn.Sequential(make()), seed=1)[0].eval()
    inp = torch.randn(3, 6, 4, 4, generator=torch.Generator().manual_seed(5))
    wrapped = CorrectedNorm(layer, 0.25).eval()
    ref = _corrected_reference(layer, inp, 0.25, 0.25)
    with torch.no_grad():
        np.testing.assert_allclose(wrapped(inp).numpy(), ref, rtol=0, atol=1e-5)
