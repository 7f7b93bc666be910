r"""Batch Renormalization (Ioffe 2017, sec. 3, Algorithm 1).

Training, per channel, over the batch and spatial axes (``mu``, ``sigma``: the moving statistics)::

    mu_B    = mean of x                      sigma_B = sqrt(biased variance of x + eps)
    r       = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
    d       = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
    y       = gamma * ((x - mu_B) / sigma_B * r + d) + beta
    mu     <- mu + alpha * (mu_B - mu)       sigma <- sigma + alpha * (sigma_B - sigma)

r and d are computed with the moving statistics from *before* this step's update and are constants for
backpropagation (``detach``). Inference: ``y = gamma * (x - mu) / sigma + beta``.

How the paper's quantities map onto ``nn.BatchNorm``'s buffers (so inference is plain BN and checkpoints
load into ``nn.BatchNorm*d``): ``mu = running_mean`` and ``sigma = sqrt(running_var + eps)``. As in
Algorithm 1, eps sits inside sigma_B (and so inside sigma).

- ``moving_std=True`` (default, the paper): the moving average is kept on sigma itself, as Algorithm 1
  does, and stored as ``running_var = sigma^2 - eps`` (never negative: sigma_B >= sqrt(eps)).
- ``moving_std=False`` (torch): ``running_var`` is the moving average of the unbiased batch variance, as
  ``nn.BatchNorm`` keeps it; with r_max = 1, d_max = 0 the layer is then ``nn.BatchNorm`` exactly
  (outputs, gradients and running statistics).

``momentum`` is the paper's update rate alpha (default 0.01, the paper's value; it must be a number).
``r_max`` and ``d_max`` are numbers or :class:`Ramp` schedules over the step counter, which is
``num_batches_tracked`` (BN's own buffer: the number of training forwards before this one, so no extra
``state_dict`` key). The paper's schedules are :data:`PAPER_R_MAX` (1 for the first 5k steps, then linearly
to 3 at 40k) and :data:`PAPER_D_MAX` (0 for the first 5k steps, then linearly to 5 at 25k), the defaults;
"gradually relaxed" is read as linear. With r_max = 1 and d_max = 0 the training forward is BN's.

:func:`convert_to_renorm` swaps every ``nn.BatchNorm1d/2d/3d`` for Batch Renorm with the same state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import correction as C
from ..errors import UsageError
from .base import RankedBatchNorm
from .convert import convert_plain_batchnorm
from .running_stats import unbiased, update_running_stats

__all__ = [
    "PAPER_D_MAX",
    "PAPER_R_MAX",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "Ramp",
    "convert_to_renorm",
    "renorm_scale_shift",
]


@dataclass(frozen=True)
class Ramp:
    """A value that is ``start`` up to step ``begin``, ``end`` from step ``finish``, linear in between."""

    start: float
    end: float
    begin: int
    finish: int

    def __post_init__(self) -> None:
        if self.finish < self.begin or self.begin < 0:
            raise UsageError(f"Ramp needs 0 <= begin <= finish, got begin={self.begin}, finish={self.finish}")

    def __call__(self, step: int) -> float:
        if step <= self.begin:
            return float(self.start)
        if step >= self.finish:
            return float(self.end)
        frac = (step - self.begin) / (self.finish - self.begin)
        return float(self.start + (self.end - self.start) * frac)


#: The paper's r_max schedule (sec. 4): 1 for the first 5k steps, then up to 3 at 40k steps.
PAPER_R_MAX = Ramp(1.0, 3.0, 5_000, 40_000)
#: The paper's d_max schedule (sec. 4): 0 for the first 5k steps, then up to 5 at 25k steps.
PAPER_D_MAX = Ramp(0.0, 5.0, 5_000, 25_000)

Bound = float | Ramp


def _value(bound: Bound, step: int) -> float:
    return bound(step) if isinstance(bound, Ramp) else float(bound)


def _check_bounds(r_max: Bound, d_max: Bound) -> None:
    r_values = (r_max.start, r_max.end) if isinstance(r_max, Ramp) else (r_max,)
    d_values = (d_max.start, d_max.end) if isinstance(d_max, Ramp) else (d_max,)
    if any(not float(v) >= 1.0 for v in r_values):
        raise UsageError(f"r_max must be >= 1 (1 disables the r correction), got {r_max}")
    if any(not float(v) >= 0.0 for v in d_values):
        raise UsageError(f"d_max must be >= 0 (0 disables the d correction), got {d_max}")


def renorm_scale_shift(
    mu_b: Tensor, var_b: Tensor, mu: Tensor, sigma: Tensor, eps: float, r_max: float, d_max: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-channel (s, t, r, d) with (x - mu_B) / sigma_B * r + d = x * s + t; r, d detached."""
    sigma_b = torch.sqrt(var_b + eps)
    r = (sigma_b / sigma).clamp(1.0 / r_max, r_max).detach()
    d = ((mu_b - mu) / sigma).clamp(-d_max, d_max).detach()
    s = r / sigma_b
    t = d - mu_b * s
    return s, t, r, d


class _BatchRenorm(RankedBatchNorm):
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.01,
        affine: bool = True,
        r_max: Bound = PAPER_R_MAX,
        d_max: Bound = PAPER_D_MAX,
        moving_std: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        if momentum is None or not 0.0 < float(momentum) <= 1.0:
            raise UsageError(f"Batch Renorm's momentum (update rate) must lie in (0, 1], got {momentum}")
        _check_bounds(r_max, d_max)
        super().__init__(num_features, eps, float(momentum), affine, True, device, dtype)
        self.r_max = r_max
        self.d_max = d_max
        self.moving_std = bool(moving_std)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, moving_std={self.moving_std}"

    def current_bounds(self) -> tuple[float, float]:
        """(r_max, d_max) at the current step (``num_batches_tracked``)."""
        step = int(self.num_batches_tracked)  # type: ignore[arg-type]
        return _value(self.r_max, step), _value(self.d_max, step)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training:
            return self.plain_forward(x)
        count = x.numel() // max(x.shape[1], 1)
        r_max, d_max = self.current_bounds()
        mu_b, var_b = C.batch_stats(x)
        dt = mu_b.dtype
        mu = self.running_mean.to(dt)  # type: ignore[union-attr]
        sigma = torch.sqrt(self.running_var.to(dt) + self.eps)  # type: ignore[union-attr]
        s, t, _, _ = renorm_scale_shift(mu_b, var_b, mu, sigma, self.eps, r_max, d_max)
        self._update(mu_b.detach(), var_b.detach(), sigma, count)
        if self.weight is not None:
            s = s * self.weight.to(dt)
            t = t * self.weight.to(dt)
        if self.bias is not None:
            t = t + self.bias.to(dt)
        y = torch.addcmul(C.expand_to(t, x), x.to(dt), C.expand_to(s, x))
        return y.to(x.dtype)

    @torch.no_grad()
    def _update(self, mu_b: Tensor, var_b: Tensor, sigma: Tensor, count: int) -> None:
        var_u = unbiased(var_b, count)
        if not self.moving_std:
            update_running_stats(self, mu_b[None], var_u[None], "per_step")
            return
        a = float(self.momentum)  # type: ignore[arg-type]
        rm, rv = self.running_mean, self.running_var
        assert rm is not None and rv is not None and self.num_batches_tracked is not None
        new_mu = rm.to(mu_b.dtype) + a * (mu_b - rm.to(mu_b.dtype))
        new_sigma = sigma + a * (torch.sqrt(var_b + self.eps) - sigma)
        rm.copy_(new_mu.to(rm.dtype))
        rv.copy_((new_sigma.square() - self.eps).clamp_min(0.0).to(rv.dtype))
        self.num_batches_tracked.add_(1)


class BatchRenorm1d(_BatchRenorm):
    """Batch Renorm for (N, C) or (N, C, L) input (see the module docstring)."""

    plain_type = nn.BatchNorm1d


class BatchRenorm2d(_BatchRenorm):
    """Batch Renorm for (N, C, H, W) input (see the module docstring)."""

    plain_type = nn.BatchNorm2d


class BatchRenorm3d(_BatchRenorm):
    """Batch Renorm for (N, C, D, H, W) input (see the module docstring)."""

    plain_type = nn.BatchNorm3d


def convert_to_renorm(
    model: nn.Module,
    *,
    r_max: Bound = PAPER_R_MAX,
    d_max: Bound = PAPER_D_MAX,
    momentum: float = 0.01,
    moving_std: bool = True,
    strict: bool = True,
) -> nn.Module:
    """Swap every ``nn.BatchNorm1d/2d/3d`` in ``model`` for Batch Renorm; returns the (possibly new) root.

    Parameters, running statistics and ``num_batches_tracked`` (the schedule's step counter) are carried
    over unchanged; ``momentum`` becomes the renorm update rate. Layers with ``track_running_stats=False``
    cannot be renormalized (no moving statistics) and raise :class:`UsageError`.
    """
    _check_bounds(r_max, d_max)

    def build(name: str, module: _BatchNorm, cls: type[_BatchNorm]) -> nn.Module:
        if not module.track_running_stats or module.running_mean is None:
            raise UsageError(
                f"{name or 'the model'}: BatchNorm without running statistics cannot become Batch Renorm",
                hint="Batch Renorm normalizes with moving statistics; use track_running_stats=True",
            )
        return cls(
            module.num_features,
            eps=module.eps,
            momentum=momentum,
            affine=module.affine,
            r_max=r_max,
            d_max=d_max,
            moving_std=moving_std,
            device=module.running_mean.device,
            dtype=module.running_mean.dtype,
        )

    return convert_plain_batchnorm(
        model, (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d), build, what="Batch Renorm", strict=strict
    )
