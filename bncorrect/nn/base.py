r"""What the BN-type layer families of :mod:`bncorrect.nn` share (Ghost BN, Batch Renorm, Batch-Group Norm).

Each family subclasses ``nn.BatchNorm`` (so parameters, buffers and ``state_dict`` keys are BN's) and has
one class per input rank, which names the plain torch class it stands in for as ``plain_type``::

    plain_type       input
    nn.BatchNorm1d   (N, C) or (N, C, L)
    nn.BatchNorm2d   (N, C, H, W)
    nn.BatchNorm3d   (N, C, D, H, W)

In eval mode with running statistics every such layer *is* that plain BN
(:meth:`RankedBatchNorm.plain_forward`)::

    y = weight * (x - running_mean) / sqrt(running_var + eps) + bias

:class:`GroupedBatchNorm` is the training forward of the families that normalize each (example, channel)
with the biased statistics of its group of consecutive examples (Ghost BN: a ghost batch; Batch-Group Norm:
an example group and a channel group), every group being one normalization batch of ``g`` examples::

    y[i, c]  = weight_c * (x[i, c] - mean[i, c]) / sqrt(var[i, c] + eps) + bias_c
    running <- fold of each group's mean and unbiased variance var * n / (n - 1), n = values per channel
               of a group (``running_update``, :mod:`bncorrect.nn.running_stats`)

The family supplies the statistics (:meth:`GroupedBatchNorm.group_statistics`); the formulas are those of
:mod:`bncorrect.correction` and :mod:`bncorrect.nn.running_stats`.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import correction as C
from ..errors import UsageError
from .running_stats import RunningUpdate, unbiased, update_running_stats

__all__ = ["GroupedBatchNorm", "RankedBatchNorm"]

#: The input ranks (``x.dim()``) each plain BN class takes.
_INPUT_DIMS: dict[type[_BatchNorm], tuple[int, ...]] = {
    nn.BatchNorm1d: (2, 3),
    nn.BatchNorm2d: (4,),
    nn.BatchNorm3d: (5,),
}


class RankedBatchNorm(_BatchNorm):
    """Base of a BN-type layer that stands in for ``plain_type`` (``nn.BatchNorm1d/2d/3d``): it takes the
    same input ranks, and :meth:`plain_forward` is that plain BN's eval forward."""

    plain_type: ClassVar[type[_BatchNorm]]

    def _check_input_dim(self, x: Tensor) -> None:
        dims = _INPUT_DIMS[self.plain_type]
        if x.dim() not in dims:
            shown = " or ".join(f"{d}D" for d in dims)
            raise UsageError(f"{type(self).__name__} expects {shown} input, got {x.dim()}D")

    def plain_forward(self, x: Tensor) -> Tensor:
        """``nn.BatchNorm`` in eval mode: normalize with the running statistics."""
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class GroupedBatchNorm(RankedBatchNorm):
    """Base of a layer that normalizes groups of consecutive examples separately (module docstring).

    Subclasses set ``running_update`` and implement :meth:`group_statistics`. Eval mode with running
    statistics is plain BN; otherwise (training, or no running statistics) the group statistics normalize,
    and in training they are folded into the running statistics when these are tracked.
    """

    running_update: RunningUpdate

    def group_statistics(self, x: Tensor) -> tuple[Tensor, Tensor, int, int]:
        """(mean, var, g, n): the biased statistics each (example, channel) is normalized with, both (N, C)
        and equal within each group of ``g`` consecutive examples, and ``n``, the number of values per
        channel in a group (for Bessel's correction)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training and self.track_running_stats:
            return self.plain_forward(x)
        mean, var, g, count = self.group_statistics(x)
        if self.training:
            var_unbiased = unbiased(var[::g], count)
            if self.track_running_stats:
                update_running_stats(self, mean[::g], var_unbiased, self.running_update)
        return C.normalize(x, mean, var, self.eps, self.weight, self.bias)
