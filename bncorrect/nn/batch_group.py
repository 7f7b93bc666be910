r"""Batch-Group Normalization: Batch and Group Normalization generalized (Four Things, sec. 3.4).

Statistics are computed over groups of channels *and* groups of examples: the C channels are split into
``channel_groups`` = Gc consecutive groups of C / Gc channels (as ``nn.GroupNorm``), the batch of N
examples into N / Ge consecutive groups of ``examples_per_group`` = Ge examples (as Ghost BN; None: the
whole batch). For example i in example group e(i) and channel c in channel group g(c)::

    S(i, c)  = { x[j, c', p] : e(j) = e(i), g(c') = g(c), p a spatial position }
    mu       = mean of S(i, c)           var = biased variance of S(i, c)
    y[i, c]  = gamma_c * (x[i, c] - mu) / sqrt(var + eps) + beta_c

Gc = C (one channel per group) and Ge = N is ``nn.BatchNorm``; Ge < N with Gc = C is Ghost BN; Ge = 1 is
``nn.GroupNorm(Gc, C)``. The paper targets B = 2 with the channel groups of a tuned GroupNorm. The
section defers details to the authors' TensorFlow code (ceciliaresearch/four_things_batch_norm), which
groups consecutive examples and consecutive channels in training exactly as above; it keeps per-channel
moving averages of E[x] and E[x^2] and pools them per channel group at inference, whereas this layer keeps
moving averages of the group statistics themselves (below), which makes inference plain BN. N must be a
multiple of Ge and C of Gc, else :class:`~bncorrect.errors.UsageError`.

Running statistics, kept per channel: ``running_mean[c]`` and ``running_var[c]`` are moving averages of the
statistics channel c was *normalized with* in training, i.e. of its channel group's mean and unbiased
variance (Bessel's correction over the Ge * C/Gc * spatial values of the group), so all channels of a
group hold the same values. Example groups are folded in as in Ghost BN (``running_update``, see
:mod:`bncorrect.nn.running_stats`). So inference is exactly ``nn.BatchNorm`` with these buffers: the
checkpoint loads into plain ``nn.BatchNorm*d`` with unchanged eval outputs, and bncorrect's post-hoc
correction (``correct_model``, ``rule``, ``weight``) applies per channel. Note that it blends each
*channel's* own example statistics into the running ones: with Gc = C that is exactly the paper's inference
example weighing (and ``estimate`` with B = Ge targets the training normalization); with Gc < C the
paper's weighing would blend the example's *channel-group* statistics instead (not provided here), and
``estimate``'s target (per-channel statistics over B examples) is not this layer's training normalization.
With ``track_running_stats=False`` eval mode normalizes with the group statistics too (with Ge = 1:
GroupNorm at inference as well).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import correction as C
from ..errors import UsageError
from .base import GroupedBatchNorm
from .convert import batchnorm_options, convert_plain_batchnorm
from .ghost import check_group_size, spatial_size
from .running_stats import RunningUpdate, check_running_update

__all__ = [
    "BatchGroupNorm1d",
    "BatchGroupNorm2d",
    "BatchGroupNorm3d",
    "batch_group_stats",
    "channel_group_stats",
    "convert_to_batch_group",
]


def channel_group_stats(mu_i: Tensor, var_i: Tensor, channel_groups: int) -> tuple[Tensor, Tensor]:
    """Per-example statistics (N, C) -> per-example statistics of each channel group (N, Gc)."""
    n, c = mu_i.shape
    cg = c // channel_groups
    # The rows of the transposed (C/Gc, N*Gc) views are the channels of one group; group_stats combines
    # them (law of total variance) exactly as it combines examples.
    mu_g, var_g = C.group_stats(
        mu_i.reshape(n * channel_groups, cg).T, var_i.reshape(n * channel_groups, cg).T
    )
    return mu_g[0].reshape(n, channel_groups), var_g[0].reshape(n, channel_groups)


def batch_group_stats(x: Tensor, channel_groups: int, examples_per_group: int) -> tuple[Tensor, Tensor]:
    """(mean, biased var), both (N, C): the statistics each (example, channel) of ``x`` is normalized with."""
    mu_i, var_i = C.example_stats(x)
    mu_g, var_g = channel_group_stats(mu_i, var_i, channel_groups)
    mu_b, var_b = C.group_stats(mu_g, var_g, examples_per_group)
    cg = x.shape[1] // channel_groups
    return mu_b.repeat_interleave(cg, dim=1), var_b.repeat_interleave(cg, dim=1)


def _check_channel_groups(num_features: int, channel_groups: int) -> int:
    gc = int(channel_groups)
    if gc < 1 or num_features % gc != 0:
        raise UsageError(
            f"channel_groups must divide the number of channels {num_features}, got {channel_groups}",
            hint=f"use channel_groups={num_features} for BatchNorm-like or a divisor such as "
            f"{max(d for d in range(1, min(num_features, 32) + 1) if num_features % d == 0)}",
        )
    return gc


class _BatchGroupNorm(GroupedBatchNorm):
    def __init__(
        self,
        num_features: int,
        channel_groups: int,
        examples_per_group: int | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        running_update: RunningUpdate = "per_step",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.channel_groups = _check_channel_groups(num_features, channel_groups)
        if examples_per_group is not None and int(examples_per_group) < 1:
            raise UsageError(f"examples_per_group must be >= 1 or None, got {examples_per_group}")
        self.examples_per_group = None if examples_per_group is None else int(examples_per_group)
        self.running_update = check_running_update(running_update)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, channel_groups={self.channel_groups}, "
            f"examples_per_group={self.examples_per_group}, running_update={self.running_update}"
        )

    def _check_input_dim(self, x: Tensor) -> None:
        super()._check_input_dim(x)
        if x.shape[1] != self.num_features:
            raise UsageError(f"expected {self.num_features} channels, got input of shape {tuple(x.shape)}")

    def group_statistics(self, x: Tensor) -> tuple[Tensor, Tensor, int, int]:
        ge = check_group_size(x.shape[0], self.examples_per_group, "examples_per_group")
        mean, var = batch_group_stats(x, self.channel_groups, ge)
        return mean, var, ge, ge * (self.num_features // self.channel_groups) * spatial_size(x)


class BatchGroupNorm1d(_BatchGroupNorm):
    """Batch-Group Norm for (N, C) or (N, C, L) input (see the module docstring)."""

    plain_type = nn.BatchNorm1d


class BatchGroupNorm2d(_BatchGroupNorm):
    """Batch-Group Norm for (N, C, H, W) input (see the module docstring)."""

    plain_type = nn.BatchNorm2d


class BatchGroupNorm3d(_BatchGroupNorm):
    """Batch-Group Norm for (N, C, D, H, W) input (see the module docstring)."""

    plain_type = nn.BatchNorm3d


def convert_to_batch_group(
    model: nn.Module,
    channel_groups: int,
    examples_per_group: int | None = None,
    *,
    running_update: RunningUpdate = "per_step",
    strict: bool = True,
) -> nn.Module:
    """Swap every ``nn.BatchNorm1d/2d/3d`` in ``model`` for Batch-Group Norm; returns the (new) root.

    ``channel_groups`` must divide every converted layer's channel count (else :class:`UsageError` naming
    the layer). State and ``state_dict`` keys are carried over unchanged.
    """
    check_running_update(running_update)
    if examples_per_group is not None and int(examples_per_group) < 1:
        raise UsageError(f"examples_per_group must be >= 1 or None, got {examples_per_group}")

    def build(name: str, module: _BatchNorm, cls: type[_BatchNorm]) -> nn.Module:
        if module.num_features % int(channel_groups) != 0 or int(channel_groups) < 1:
            raise UsageError(
                f"{name or 'the model'}: {module.num_features} channels cannot be split into "
                f"{channel_groups} channel groups",
                hint="pick a channel_groups that divides every BN layer's channel count",
            )
        opts = batchnorm_options(module)
        return cls(
            module.num_features, channel_groups, examples_per_group, running_update=running_update, **opts
        )

    return convert_plain_batchnorm(
        model,
        (BatchGroupNorm1d, BatchGroupNorm2d, BatchGroupNorm3d),
        build,
        what="Batch-Group Norm",
        strict=strict,
    )
