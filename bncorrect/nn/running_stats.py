r"""Running-statistics updates shared by the training-side BN layers of :mod:`bncorrect.nn`.

``nn.BatchNorm`` keeps, per channel, ``running_mean`` and ``running_var`` and updates them once per training
forward (``num_batches_tracked`` counts the updates)::

    n_t     = num_batches_tracked + 1
    f       = momentum                      (momentum=None: f = 1 / n_t, the cumulative average)
    running = (1 - f) * running + f * v     v: the batch mean, or the batch variance with Bessel's
                                            correction n / (n - 1), n = values per channel in the batch

A layer that normalizes K disjoint groups of one batch separately (ghost batches, example groups) has K
values ``v_1 .. v_K`` per channel. Two ways to fold them in are offered (``running_update``):

- ``"per_step"`` (the default of every layer here): one update per forward with the mean of the K values::

      running = (1 - f) * running + f * mean_j v_j,          num_batches_tracked += 1

  This is the average of the running statistics of K copies of ``nn.BatchNorm`` each run on one group from
  the same state. ``momentum`` keeps its per-step meaning, so the moving average still spans about
  1/momentum steps however small the groups are.

- ``"per_group"``: K updates in sequence, exactly as ``nn.BatchNorm`` applied to each group in turn (the
  loop over chunks of Hoffer et al.'s and TabNet's ghost BN implementations)::

      running = (1 - m)^K * running + sum_j m (1 - m)^(K - j) v_j,   num_batches_tracked += K
      (momentum None: running = (n_0 * running + sum_j v_j) / (n_0 + K))

  Here the moving average spans about 1/momentum *groups*, i.e. fewer examples the smaller the groups.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import UsageError

RunningUpdate = Literal["per_step", "per_group"]

__all__ = ["RunningUpdate", "check_running_update", "unbiased", "update_running_stats"]


def check_running_update(value: str) -> RunningUpdate:
    """Validate a ``running_update`` option."""
    if value not in get_args(RunningUpdate):
        raise UsageError(f"running_update must be one of {get_args(RunningUpdate)}, got {value!r}")
    return value  # type: ignore[return-value]


def unbiased(var: Tensor, count: int) -> Tensor:
    """Biased variance over ``count`` values -> unbiased (Bessel's correction), as nn.BatchNorm stores it."""
    if count < 2:
        raise UsageError(
            f"a normalization group has {count} value per channel; at least 2 are needed in training",
            hint="use larger normalization groups (more examples per group, or more spatial positions)",
        )
    return var * (count / (count - 1))


def _weights(module: _BatchNorm, k: int, mode: RunningUpdate) -> tuple[float, Tensor]:
    """(keep, w): running = keep * running + sum_j w_j v_j for the K group values."""
    n0 = int(module.num_batches_tracked)  # type: ignore[arg-type]
    m = module.momentum
    if mode == "per_step":
        f = 1.0 / (n0 + 1) if m is None else float(m)
        return 1.0 - f, torch.full((k,), f / k, dtype=torch.float64)
    if m is None:
        return n0 / (n0 + k), torch.full((k,), 1.0 / (n0 + k), dtype=torch.float64)
    m = float(m)
    powers = torch.arange(k - 1, -1, -1, dtype=torch.float64)  # K - j for j = 1..K
    return (1.0 - m) ** k, m * (1.0 - m) ** powers


@torch.no_grad()
def update_running_stats(module: _BatchNorm, means: Tensor, variances: Tensor, mode: RunningUpdate) -> None:
    """Fold K groups' statistics into ``module``'s running buffers.

    ``means``, ``variances``: (K, C), one row per normalization group, variances already unbiased.
    """
    rm, rv, nbt = module.running_mean, module.running_var, module.num_batches_tracked
    if rm is None or rv is None or nbt is None:
        return
    k = means.shape[0]
    keep, w = _weights(module, k, mode)
    for buf, vals in ((rm, means), (rv, variances)):
        v = vals.detach().to(torch.float64)
        new = keep * buf.to(torch.float64) + (w.to(v.device).reshape(-1, 1) * v).sum(0)
        buf.copy_(new.to(buf.dtype))
    nbt.add_(1 if mode == "per_step" else k)
