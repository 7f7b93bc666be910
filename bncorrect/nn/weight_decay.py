r"""Optimizer parameter groups with and without weight decay on normalization parameters (Four Things,
sec. 3.3).

Weight decay scales every decayed parameter by (1 - lr * lambda) per step. On the scale and shift of
normalization layers (gamma, beta) it is a regularizer of its own -- it is never undone by a later
normalization along paths to the output that skip one (ResNets) -- and the paper found it helps ResNets on
tasks that overfit and hurts Inception-style nets; common recipes switch it off. :func:`param_groups`
makes the choice explicit: every parameter of the model lands in exactly one group:

- ``"norm"``:  gamma/beta of normalization layers, decay ``norm_weight_decay`` (default 0);
- ``"bias"``:  other parameters named ``bias``, decay ``bias_weight_decay`` (default: ``weight_decay``);
- ``"decay"``: everything else, decay ``weight_decay``.

Normalization layers: torch's BatchNorm (all, incl. SyncBatchNorm and every BN subclass such as the
layers of :mod:`bncorrect.nn`), InstanceNorm, GroupNorm, LayerNorm, RMSNorm, LocalResponseNorm,
:class:`~bncorrect.nn.FullBatchNorm` (its gamma/beta only, not its Linear/Conv), BN-like modules that
bncorrect corrects (``bncorrect.layers.is_batchnorm_like``, e.g. FrozenBatchNorm2d), and any types passed
as ``norm_types``. A norm layer's own parameters (not its children's) count as norm parameters. The
paper's code decays gamma towards 1; optimizer weight decay decays towards 0 (the paper found no
difference between the two, only whether decay was applied at all).

Empty groups are left out; each group carries ``"name"`` and ``"weight_decay"`` keys (torch optimizers
keep extra keys). Shared (tied) parameters appear once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..errors import UsageError
from ..layers import is_batchnorm_like
from .full_batch import FullBatchNorm

__all__ = ["NORM_TYPES", "is_norm_layer", "param_groups"]

#: Module types whose own parameters are normalization parameters.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    _BatchNorm,
    _InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    FullBatchNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def is_norm_layer(module: nn.Module, extra: tuple[type[nn.Module], ...] = ()) -> bool:
    """True for the normalization layers whose parameters go to the ``"norm"`` group."""
    return isinstance(module, NORM_TYPES + extra) or is_batchnorm_like(module)


def _check_decay(label: str, value: float) -> float:
    v = float(value)
    if not v >= 0.0:
        raise UsageError(f"{label} must be >= 0, got {value}")
    return v


def param_groups(
    model: nn.Module,
    weight_decay: float,
    norm_weight_decay: float = 0.0,
    bias_weight_decay: float | None = None,
    *,
    norm_types: Iterable[type[nn.Module]] = (),
) -> list[dict[str, Any]]:
    """Parameter groups for ``torch.optim`` (see the module docstring); every parameter exactly once."""
    wd = _check_decay("weight_decay", weight_decay)
    groups: dict[str, dict[str, Any]] = {
        "norm": {"name": "norm", "weight_decay": _check_decay("norm_weight_decay", norm_weight_decay)},
        "bias": {
            "name": "bias",
            "weight_decay": wd
            if bias_weight_decay is None
            else _check_decay("bias_weight_decay", bias_weight_decay),
        },
        "decay": {"name": "decay", "weight_decay": wd},
    }
    members: dict[str, list[nn.Parameter]] = {k: [] for k in groups}
    extra = tuple(norm_types)
    seen: set[int] = set()
    for module in model.modules():
        norm = is_norm_layer(module, extra)
        for name, param in module.named_parameters(recurse=False):
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            key = "norm" if norm else "bias" if name == "bias" else "decay"
            members[key].append(param)
    return [{**groups[k], "params": members[k]} for k in ("decay", "bias", "norm") if members[k]]
