from __future__ import annotations

import pytest
import torch
from torch import nn

from bncorrect.errors import UsageError
from bncorrect.layers import correct_model
from bncorrect.nn import (
    BatchGroupNorm2d,
    BatchRenorm2d,
    FullBatchNorm,
    GhostBatchNorm2d,
    Moments,
    param_groups,
)


class FrozenBN2d(nn.Module):
    """Not a BN subclass (torchvision's FrozenBatchNorm2d shape), but BN-like: bncorrect corrects it."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.eps = 1e-5
        self.weight = nn.Parameter(torch.ones(c))  # parameters here so that they must be found
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))


class ScaleNorm(nn.Module):
    """A user's own normalization layer, passed through ``norm_types``."""

    def __init__(self) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(()))


def _model() -> tuple[nn.Module, dict[str, list[nn.Parameter]]]:
    fbn = FullBatchNorm(
        nn.Linear(4, 4), Moments(3, torch.zeros(4, dtype=torch.float64), torch.eye(4).double())
    )
    tied = nn.Linear(4, 4, bias=False)
    frozen = nn.Linear(4, 4)
    frozen.requires_grad_(False)
    model = nn.ModuleDict(
        {
            "conv": nn.Conv2d(3, 4, 3),
            "bn": nn.BatchNorm2d(4),
            "ghost": GhostBatchNorm2d(4, 2),
            "renorm": BatchRenorm2d(4),
            "bgn": BatchGroupNorm2d(4, 2),
            "corrected": correct_model(nn.Sequential(nn.BatchNorm2d(4)), 0.1),
            "gn": nn.GroupNorm(2, 4),
            "ln": nn.LayerNorm(4),
            "inorm": nn.InstanceNorm2d(4, affine=True),
            "rms": nn.RMSNorm(4),
            "frozen_bn": FrozenBN2d(4),
            "fbn": fbn,
            "tied_a": tied,
            "tied_b": nn.Sequential(tied),
            "head": nn.Linear(4, 2),
            "frozen": frozen,
            "scale": ScaleNorm(),
        }
    )
    m = model
    expected = {
        "norm": [
            *m["bn"].parameters(),
            *m["ghost"].parameters(),
            *m["renorm"].parameters(),
            *m["bgn"].parameters(),
            *m["corrected"].parameters(),
            *m["gn"].parameters(),
            *m["ln"].parameters(),
            *m["inorm"].parameters(),
            *m["rms"].parameters(),
            *m["frozen_bn"].parameters(),
            fbn.weight,
            fbn.bias,
            m["scale"].g,
        ],
        "bias": [m["conv"].bias, fbn.layer.bias, m["head"].bias, m["frozen"].bias],
        "decay": [m["conv"].weight, fbn.layer.weight, tied.weight, m["head"].weight, m["frozen"].weight],
    }
    return model, expected


def test_every_parameter_exactly_once_in_the_right_group():
    model, expected = _model()
    groups = param_groups(model, 5e-4, norm_types=[ScaleNorm])
    by_name = {g["name"]: g for g in groups}
    assert [g["name"] for g in groups] == ["decay", "bias", "norm"]
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids))
    assert set(all_ids) == {id(p) for p in model.parameters()}
    for name, params in expected.items():
        assert {id(p) for p in by_name[name]["params"]} == {id(p) for p in params}, name
    assert by_name["decay"]["weight_decay"] == 5e-4
    assert by_name["bias"]["weight_decay"] == 5e-4  # bias_weight_decay defaults to weight_decay
    assert by_name["norm"]["weight_decay"] == 0.0


def test_without_norm_types_a_custom_layer_is_decayed_and_empty_groups_are_dropped():
    model, _ = _model()
    groups = param_groups(model, 1e-4, norm_weight_decay=1e-5, bias_weight_decay=0.0)
    by_name = {g["name"]: g for g in groups}
    assert id(model["scale"].g) in {id(p) for p in by_name["decay"]["params"]}
    assert by_name["norm"]["weight_decay"] == 1e-5 and by_name["bias"]["weight_decay"] == 0.0
    only_linear = param_groups(nn.Linear(3, 3, bias=False), 1e-4)
    assert [g["name"] for g in only_linear] == ["decay"]


def test_an_optimizer_step_decays_only_what_it_should():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), GhostBatchNorm2d(3, 2), nn.Linear(3, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(2.0)
    opt = torch.optim.SGD(param_groups(model, 0.1, bias_weight_decay=0.05), lr=1.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.all(model[0].weight == 2.0 * (1 - 0.1)) and torch.all(model[3].weight == 1.8)
    assert torch.all(model[0].bias == 2.0 * (1 - 0.05))
    for bn in (model[1], model[2]):
        assert torch.all(bn.weight == 2.0) and torch.all(bn.bias == 2.0)  # no decay on gamma/beta


def test_negative_decay_is_refused():
    with pytest.raises(UsageError, match="weight_decay must be >= 0"):
        param_groups(nn.Linear(2, 2), -1.0)
    with pytest.raises(UsageError, match="norm_weight_decay must be >= 0"):
        param_groups(nn.Linear(2, 2), 0.1, norm_weight_decay=-0.1)
    with pytest.raises(UsageError, match="bias_weight_decay must be >= 0"):
        param_groups(nn.Linear(2, 2), 0.1, bias_weight_decay=float("nan"))
