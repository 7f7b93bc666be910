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
