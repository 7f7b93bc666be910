r"""Ghost Batch Normalization (Four Things, sec. 3.2; Hoffer et al. 2017).

In training, a batch of N examples is split into K = N / G disjoint *consecutive* ghost batches of G
examples, and each example is normalized with the statistics of its own ghost batch only. For example i in
ghost batch k(i) = floor(i / G) and channel c, over the ghost batch's examples and the spatial axes::

    mu_k     = mean of x[j, c, ...] over j with k(j) = k(i)
    var_k    = biased variance of the same values
    y[i, c]  = gamma_c * (x[i, c] - mu_k) / sqrt(var_k + eps) + beta_c

N must be a multiple of G (else :class:`~bncorrect.errors.UsageError`: use a batch size that is a multiple
of G, e.g. ``drop_last=True``). With G = N this is ``nn.BatchNorm`` exactly.

Running statistics: each ghost batch contributes its mean and its *unbiased* variance (Bessel's correction
over its G * spatial values, as ``nn.BatchNorm`` stores), folded in with ``running_update`` (see
:mod:`bncorrect.nn.running_stats`): ``"per_step"`` (default) makes one update per forward with the mean of
the K ghost statistics (momentum keeps its per-step meaning); ``"per_group"`` makes K updates in sequence,
i.e. exactly ``nn.BatchNorm`` applied to each ghost batch in turn.

Inference is exactly ``nn.BatchNorm`` with the running statistics (with ``track_running_stats=False``,
as in torch, there are none and eval mode normalizes with ghost-batch statistics too). The layers subclass
``nn.BatchNorm`` and keep its ``state_dict`` keys, so a checkpoint loads into plain ``nn.BatchNorm*d`` (or use
:func:`bncorrect.nn.convert_to_batchnorm`). The normalization batch of a ghost-BN model is G: bncorrect's
post-hoc corrections use B = G (``bncorrect rule/estimate --train-batch-size G``), and
``bncorrect.layers.correct_model`` corrects these layers directly (through their eval forward).

:func:`convert_to_ghost` swaps every ``nn.BatchNorm1d/2d/3d`` of a model (exact types; subclasses that add
behaviour, SyncBatchNorm and lazy BN are left alone) for the ghost version with the same state.
"""

from __future__ import annotations

import math

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import correction as C
from ..errors import UsageError
from .base import GroupedBatchNorm
from .convert import batchnorm_options, convert_plain_batchnorm
from .running_stats import RunningUpdate, check_running_update

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "check_group_size", "convert_to_ghost"]


def check_group_size(batch_size: int, group_size: int | None, what: str = "ghost batch size") -> int:
    """The number of examples per normalization group; ``batch_size`` must be a multiple of it."""
    g = batch_size if group_size is None else int(group_size)
    if g < 1:
        raise UsageError(f"{what} must be >= 1, got {g}")
    if batch_size % g != 0:
        raise UsageError(
            f"batch size {batch_size} is not a multiple of the {what} {g}",
            hint=f"use a batch size that is a multiple of {g} (e.g. DataLoader(..., drop_last=True) with a "
            f"multiple of {g} as batch_size)",
        )
    return g


def spatial_size(x: Tensor) -> int:
    """Number of positions per (example, channel)."""
    return math.prod(x.shape[2:])


class _GhostBatchNorm(GroupedBatchNorm):
    def __init__(
        self,
        num_features: int,
        group_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        running_update: RunningUpdate = "per_step",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if int(group_size) < 1:
            raise UsageError(f"group_size must be >= 1, got {group_size}")
        self.group_size = int(group_size)
        self.running_update = check_running_update(running_update)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, running_update={self.running_update}"

    def group_statistics(self, x: Tensor) -> tuple[Tensor, Tensor, int, int]:
        g = check_group_size(x.shape[0], self.group_size)
        mu_i, var_i = C.example_stats(x)
        mean, var = C.group_stats(mu_i, var_i, g)  # (N, C): each row its ghost batch's statistics
        return mean, var, g, g * spatial_size(x)


class GhostBatchNorm1d(_GhostBatchNorm):
    """Ghost BN for (N, C) or (N, C, L) input (see the module docstring)."""

    plain_type = nn.BatchNorm1d


class GhostBatchNorm2d(_GhostBatchNorm):
    """Ghost BN for (N, C, H, W) input (see the module docstring)."""

    plain_type = nn.BatchNorm2d


class GhostBatchNorm3d(_GhostBatchNorm):
    """Ghost BN for (N, C, D, H, W) input (see the module docstring)."""

    plain_type = nn.BatchNorm3d


def convert_to_ghost(
    model: nn.Module, group_size: int, *, running_update: RunningUpdate = "per_step", strict: bool = True
) -> nn.Module:
    """Swap every ``nn.BatchNorm1d/2d/3d`` in ``model`` for Ghost BN with ghost batch size ``group_size``.

    Recursive; the root itself may be a BN layer, so use the returned module. Parameters, buffers
    (``num_batches_tracked`` included) and the train/eval flag are carried over, so the ``state_dict`` keys
    and values are unchanged. With ``strict`` a model without any plain BN layer raises
    :class:`NoBatchNormError`.
    """
    if int(group_size) < 1:
        raise UsageError(f"group_size must be >= 1, got {group_size}")
    check_running_update(running_update)

    def build(_name: str, module: _BatchNorm, cls: type[_BatchNorm]) -> nn.Module:
        opts = batchnorm_options(module)
        return cls(module.num_features, group_size, running_update=running_update, **opts)

    return convert_plain_batchnorm(
        model,
        (GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d),
        build,
        what="ghost batch norm",
        strict=strict,
    )
