"""The library functions leave a module passed in untouched and return a corrected copy."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from bncorrect import api
from bncorrect.errors import UsageError
from bncorrect.layers import CorrectedNorm, corrected_layers

from .toys import conv_net, data


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def val_npz(tmp_path):
    x, y = data(48)
    path = tmp_path / "val.npz"
    np.savez(path, x=x.numpy(), y=y.numpy())
    return path


@pytest.mark.parametrize(
    "command",
    [
        lambda net, d: api.rule(net, 2),
        lambda net, d: api.weight(net, 0.2),
        lambda net, d: api.apply(net, api.weight(conv_net(), 0.3, 0.1).corrections),
        lambda net, d: api.estimate(net, d, 2, device="cpu"),
        lambda net, d: api.recalibrate(net, d, device="cpu"),
    ],
    ids=["rule", "weight", "apply", "estimate", "recalibrate"],
)
def test_commands_leave_the_module_passed_in_unchanged(command, val_npz):
    net = conv_net()
    before = _snapshot(net)
    x, _ = data(6, seed=3)
    with torch.no_grad():
        logits_before = net(x)
    outcome = command(net, val_npz)
    assert not any(isinstance(m, CorrectedNorm) for m in net.modules())
    after = _snapshot(net)
    assert after.keys() == before.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(net(x), logits_before, rtol=0, atol=0)
    assert outcome.model is not net
    assert corrected_layers(outcome.model), "the returned model carries the correction"


@pytest.mark.parametrize(
    "command",
    [
        lambda src, d: api.weight(src, 0.4, 0.2),
        lambda src, d: api.estimate(src, d, 2, device="cpu"),
        lambda src, d: api.recalibrate(src, d, device="cpu"),
    ],
    ids=["weight", "estimate", "recalibrate"],
)
def test_an_opened_model_serves_several_commands_unchanged(command, val_npz):
    """A LoadedModel from open_model passed to a command is not corrected in place: the next command on
    it starts from the model as loaded (running statistics included)."""
    net = conv_net()
    source = api.open_model(net)
    before = _snapshot(source.model)
    outcome = command(source, val_npz)
    assert outcome.model is not source.model
    assert not any(isinstance(m, CorrectedNorm) for m in source.model.modules())
    after = _snapshot(source.model)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    x, _ = data(6, seed=3)
    plain = api.weight(source, 0.0).model  # weight 0 on the same opened model: the plain network
    with torch.no_grad():
        torch.testing.assert_close(plain(x), net(x), rtol=0, atol=0)


def test_returned_model_is_corrected_as_reported():
    net = conv_net()
    outcome = api.weight(net, 0.25, 0.1)
    layers = corrected_layers(outcome.model)
    assert set(layers) == set(outcome.corrections.layers)
    for layer in layers.values():
        assert float(layer.alpha) == pytest.approx(0.25) and float(layer.beta) == pytest.approx(0.1)


class _Unpicklable(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = conv_net()
        self.lock = threading.Lock()  # deepcopy refuses locks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_module_that_cannot_be_copied_gives_a_clear_error():
    with pytest.raises(UsageError, match="cannot copy the model") as info:
        api.weight(_Unpicklable(), 0.1)
    assert "save the model and pass its path" in (info.value.hint or "")
