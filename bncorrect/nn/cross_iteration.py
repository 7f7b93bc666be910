r"""Cross-Iteration Batch Normalization (CBN; Yao et al., paper 001), for convolutional layers.

With few examples per iteration, BN's batch statistics are noisy. CBN pools the statistics of the last
``k`` iterations (the *window*), after compensating the older ones for the change of the network weights
since they were taken, with a first-order Taylor polynomial in the weights of the layer that produces the
BN input (the preceding convolution, weights ``theta``). For BN channel ``c`` at iteration ``t``, with
``mu_t``, ``nu_t`` the mean and second moment of the BN input over the batch and spatial axes (sec. 3.1;
``sigma_t^2 = nu_t - mu_t^2``) and ``d = theta_t - theta_{t-tau}``::

    mu_{t-tau}(theta_t) ~ mu_{t-tau}(theta_{t-tau}) + d mu_{t-tau} / d theta_{t-tau} . d      (eqs. 5, 7)
    nu_{t-tau}(theta_t) ~ nu_{t-tau}(theta_{t-tau}) + d nu_{t-tau} / d theta_{t-tau} . d      (eqs. 6, 8)

(eqs. 5-6 are the full Taylor polynomials; eqs. 7-8 truncate the gradients to the producing layer ``l``,
as the paper does: earlier layers' weight changes are not compensated.) Pooled over the window::

    mu_bar    = 1/k sum_{tau=0}^{k-1} mu_{t-tau}(theta_t)                                           (eq. 9)
    nu_bar    = 1/k sum_{tau=0}^{k-1} max(nu_{t-tau}(theta_t), mu_{t-tau}(theta_t)^2)              (eq. 10)
    sigma_bar^2 = nu_bar - mu_bar^2                                                                (eq. 11)
    y         = gamma * (x - mu_bar) / sqrt(sigma_bar^2 + eps) + b          (the normalization after eq. 11)

The max in eq. 10 guards against a compensated second moment below the squared mean (a negative
variance), which the Taylor approximation can produce; ``max(nu, mu^2) - mu^2 = max(sigma^2, 0)``, so this
module computes eqs. 9-11 in the algebraically identical, cancellation-free form

    sigma_bar^2 = mean_tau max(sigma_{t-tau}^2(theta_t), 0) + mean_tau (mu_{t-tau}(theta_t) - mu_bar)^2

(:func:`pool_statistics`). (The authors' released code instead drops an iteration whose compensated
variance is negative from both averages; we follow the paper's eq. 10.) As in Algorithm 1 (Appendix A):
the current iteration's statistics keep their gradient, the older iterations' statistics, gradients and
weights are stored detached and receive none ("those of the previous iterations are fixed", sec. 3.3), and
the compensation uses the current weights as constants (as the authors' code does).

The gradients ``d mu / d theta`` and ``d nu / d theta`` of the current iteration are taken with
``torch.autograd.grad`` of the BN input's channel means and mean squares with respect to the convolution's
weight (and bias, when it has one: the bias is part of that layer's weights), with the graph kept for the
ordinary backward. Output channel ``c`` of a convolution depends only on its own filter ``theta[c]``, so
one gradient of the channel sums gives every channel's own gradient at once (Appendix B's structure);
stored per iteration as (C, P) with P the number of weights per output channel.

Burn-in (sec. 3.3): for the first ``burn_in`` training iterations (counted by ``num_batches_tracked``)
the window is 1 and CBN is exactly BN; history is recorded from the first iteration after it. The window
then fills up over ``k - 1`` iterations. Inference is BN with the moving statistics (Table 6: "the
inference stage of CBN is the same as that of BN"); the moving statistics are updated, as ``nn.BatchNorm``
does, with the current iteration's batch mean and unbiased variance (as in the authors' code).

Constraints and behaviour, decided here:

- The layer needs the convolution that produces its input: ``CrossIterationBatchNorm2d(C, conv=conv)``.
  ``conv`` is kept as a plain reference (not a submodule: it stays where it is in the model, its
  parameters are not duplicated in ``state_dict``, and a deep copy of the model keeps the pair linked).
  Output channel c of ``conv`` must be channel c of the BN input (conv -> BN directly, or through
  elementwise operations). :func:`convert_to_cross_iteration` pairs Conv2d -> BatchNorm2d in
  ``nn.Sequential`` containers.
- A training forward that cannot take gradients (under ``torch.no_grad``) is plain BN for that call and
  does not touch the history. Convolution parameters with ``requires_grad=False`` are treated as constant
  (no compensation term). ``compensate=False`` pools without compensation ("Naive CBN", sec. 4.3).
- Each training forward is one iteration (a layer called twice per step counts twice; activation
  checkpointing, which re-runs the forward, is not supported). The history is not part of
  ``state_dict``; loading a state dict, moving to another device or :meth:`reset_history` clears it.
- ``k`` is the window including the current iteration (``window=1`` is BN). The paper picks ``k`` so that
  ``k`` times the per-device batch is at least 16 (sec. 4.1, Table 3) and saturates around ``k = 8``.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import correction as C
from ..errors import NoBatchNormError, UsageError
from .convert import transfer_state
from .running_stats import unbiased, update_running_stats

__all__ = [
    "CrossIterationBatchNorm2d",
    "IterationRecord",
    "compensate",
    "convert_to_cross_iteration",
    "pool_statistics",
]


@dataclass
class IterationRecord:
    """What CBN keeps of one past iteration, per channel: statistics at the weights of that iteration,
    their gradients with respect to the producing layer's weights, and those weights. Detached.

    ``mean``, ``var``: (C,) (biased variance); ``grad_mean``, ``grad_sq``, ``theta``: (C, P).
    """

    mean: Tensor
    var: Tensor
    grad_mean: Tensor | None
    grad_sq: Tensor | None
    theta: Tensor | None


def compensate(record: IterationRecord, theta_now: Tensor | None) -> tuple[Tensor, Tensor]:
    """(mean, var) of a past iteration at the current weights, first-order Taylor (eqs. 7-8).

    mu' = mu + g_mu . d,  nu' = nu + g_nu . d  with d = theta_now - theta_then (per channel), and
    var' = nu' - mu'^2 = var + g_nu . d - (g_mu . d) (2 mu + g_mu . d), which avoids forming nu and mu^2.
    The result may be negative; :func:`pool_statistics` applies eq. 10's guard. Without gradients
    (nothing to compensate) the stored statistics come back unchanged.
    """
    if record.grad_mean is None or record.grad_sq is None or record.theta is None or theta_now is None:
        return record.mean, record.var
    delta = theta_now.to(record.theta.dtype) - record.theta
    d_mean = (record.grad_mean * delta).sum(dim=1)
    d_sq = (record.grad_sq * delta).sum(dim=1)
    return record.mean + d_mean, record.var + d_sq - d_mean * (2 * record.mean + d_mean)


def pool_statistics(
    mean: Tensor, var: Tensor, past_means: Tensor | None = None, past_vars: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Eqs. 9-11: the window's mean and variance from the current (C,) statistics and the (k-1, C)
    compensated statistics of past iterations (None or empty: just the current ones).

    mu_bar = mean of the k means; sigma_bar^2 = mean_tau max(sigma_tau^2, 0) + mean_tau (mu_tau - mu_bar)^2,
    which equals nu_bar - mu_bar^2 with nu_bar = mean_tau max(nu_tau, mu_tau^2) (eq. 10). The current
    variance is a batch variance (never negative) and is not clamped, so its gradient is untouched.
    """
    if past_means is None or past_vars is None or past_means.shape[0] == 0:
        return mean, var
    means = torch.cat([mean.unsqueeze(0), past_means.to(mean.dtype)])
    variances = torch.cat([var.unsqueeze(0), past_vars.to(var.dtype).clamp_min(0.0)])
    mu_bar = means.mean(dim=0)
    return mu_bar, variances.mean(dim=0) + (means - mu_bar).square().mean(dim=0)


class CrossIterationBatchNorm2d(nn.BatchNorm2d):
    """BN over (N, C, H, W) whose training statistics pool the last ``window`` iterations (module docstring).

    ``conv``: the ``nn.Conv2d`` whose output channel c feeds channel c of this layer (kept as a reference,
    not a submodule). ``window``: k, iterations pooled including the current one (1: plain BN).
    ``burn_in``: training iterations (``num_batches_tracked``) with plain BN before pooling starts.
    ``compensate``: False pools without Taylor compensation (the paper's "Naive CBN" baseline).
    The ``state_dict`` has exactly ``nn.BatchNorm2d``'s keys; eval mode is ``nn.BatchNorm2d``.
    """

    plain_type: ClassVar[type[_BatchNorm]] = nn.BatchNorm2d

    def __init__(
        self,
        num_features: int,
        conv: nn.Conv2d,
        window: int = 4,
        burn_in: int = 0,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        compensate: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        if int(window) < 1:
            raise UsageError(f"window must be >= 1 (1 is plain BN), got {window}")
        if int(burn_in) < 0:
            raise UsageError(f"burn_in must be >= 0, got {burn_in}")
        self.window = int(window)
        self.burn_in = int(burn_in)
        self.compensate = bool(compensate)
        self.set_conv(conv)
        self._history: deque[IterationRecord] = deque(maxlen=self.window - 1)

    # ------------------------------------------------------------------ the producing convolution
    @property
    def conv(self) -> nn.Conv2d:
        return self.__dict__["_conv"]

    def set_conv(self, conv: nn.Conv2d) -> None:
        """Point the layer at the convolution that produces its input (clears the history)."""
        if not isinstance(conv, nn.Conv2d):
            raise UsageError(
                f"conv must be the nn.Conv2d that produces this layer's input, got {type(conv).__name__}",
                hint="pass conv=<the Conv2d before this BN>, or use convert_to_cross_iteration(model)",
            )
        if conv.out_channels != self.num_features:
            raise UsageError(
                f"conv has {conv.out_channels} output channels but the layer has {self.num_features}",
                hint="pass the Conv2d whose output this BN layer normalizes",
            )
        self.__dict__["_conv"] = conv  # a reference, not a submodule
        if "_history" in self.__dict__:
            self.reset_history()

    def reset_history(self) -> None:
        """Forget the stored iterations (the window refills over the next ``window - 1`` iterations)."""
        self._history.clear()

    @property
    def history(self) -> list[IterationRecord]:
        """Stored past iterations, newest first (at most ``window - 1``)."""
        return list(self._history)

    def _theta(self, dtype: torch.dtype) -> Tensor | None:
        """The current weights of ``conv`` that are trained, per output channel: (C, P), detached."""
        parts = [p.detach().reshape(self.num_features, -1).to(dtype) for p in self._trained_params()]
        return torch.cat(parts, dim=1) if parts else None

    def _trained_params(self) -> list[Tensor]:
        conv = self.conv
        return [p for p in (conv.weight, conv.bias) if p is not None and p.requires_grad]

    def compensated_history(self) -> list[tuple[Tensor, Tensor]]:
        """(mean, var) of every stored iteration at the conv's current weights (eqs. 7-8), newest first."""
        if not self._history:
            return []
        theta = self._theta(self._history[0].mean.dtype) if self.compensate else None
        return [compensate(r, theta) for r in self._history]

    # ------------------------------------------------------------------ forward
    def extra_repr(self) -> str:
        c = self.conv
        return (
            f"{super().extra_repr()}, window={self.window}, burn_in={self.burn_in}, "
            f"compensate={self.compensate}, conv=Conv2d({c.in_channels}, {c.out_channels}, "
            f"kernel_size={c.kernel_size})"
        )

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise UsageError(f"CrossIterationBatchNorm2d expects 4D input (N, C, H, W), got {x.dim()}D")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if (
            not self.training
            or self.window == 1
            or int(self.num_batches_tracked) < self.burn_in  # type: ignore[arg-type]
            or not torch.is_grad_enabled()
        ):
            return super().forward(x)  # nn.BatchNorm2d exactly (running statistics in eval)
        return self._cross_iteration_forward(x)

    def _current_gradients(self, mean: Tensor, sq: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """d mean / d theta and d (mean square) / d theta of this iteration, (C, P) each, detached."""
        params = self._trained_params()
        if not self.compensate or not params:
            return None, None
        if not mean.requires_grad:
            raise UsageError(
                "the input of CrossIterationBatchNorm2d does not depend on its conv's weights",
                hint="pass conv=<the Conv2d whose output this layer normalizes>",
            )
        grads = []
        for stat in (mean, sq):
            g = torch.autograd.grad(stat.sum(), params, retain_graph=True, allow_unused=True)
            if any(gi is None for gi in g):
                raise UsageError(
                    "the input of CrossIterationBatchNorm2d does not depend on its conv's weights",
                    hint="pass conv=<the Conv2d whose output this layer normalizes>",
                )
            grads.append(torch.cat([gi.reshape(self.num_features, -1).to(mean.dtype) for gi in g], dim=1))
        return grads[0], grads[1]

    def _cross_iteration_forward(self, x: Tensor) -> Tensor:
        if self._history and self._history[0].mean.device != x.device:
            self.reset_history()  # the model moved to another device
        mean, var = C.batch_stats(x)  # (C,), biased; keep their graph
        dims = (0, 2, 3)
        sq = x.to(mean.dtype).square().mean(dim=dims)  # nu_t, only for its gradient
        grad_mean, grad_sq = self._current_gradients(mean, sq)
        theta = self._theta(mean.dtype) if grad_mean is not None else None
        past = [compensate(r, theta) for r in self._history] if self.compensate else self._naive()
        past_means = torch.stack([m for m, _ in past]) if past else None
        past_vars = torch.stack([v for _, v in past]) if past else None
        mu_bar, var_bar = pool_statistics(mean, var, past_means, past_vars)
        count = x.shape[0] * x.shape[2] * x.shape[3]
        update_running_stats(self, mean.detach()[None], unbiased(var.detach(), count)[None], "per_step")
        self._history.appendleft(IterationRecord(mean.detach(), var.detach(), grad_mean, grad_sq, theta))
        return C.normalize(x, mu_bar, var_bar, self.eps, self.weight, self.bias)

    def _naive(self) -> list[tuple[Tensor, Tensor]]:
        return [(r.mean, r.var) for r in self._history]

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.reset_history()  # the stored iterations belong to other weights
        super()._load_from_state_dict(*args, **kwargs)


def _pairs(model: nn.Module) -> Iterator[tuple[nn.Sequential, str, nn.Conv2d, nn.BatchNorm2d]]:
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (_, a), (name_b, b) in itertools.pairwise(children):
            if isinstance(a, nn.Conv2d) and type(b) is nn.BatchNorm2d and a.out_channels == b.num_features:
                yield module, name_b, a, b


def convert_to_cross_iteration(
    model: nn.Module,
    window: int = 4,
    burn_in: int = 0,
    *,
    compensate: bool = True,
    strict: bool = True,
) -> nn.Module:
    """Swap every ``nn.BatchNorm2d`` that directly follows an ``nn.Conv2d`` inside an ``nn.Sequential``
    for :class:`CrossIterationBatchNorm2d` bound to that convolution; in place, returns ``model``.

    Parameters, buffers (``num_batches_tracked`` included) and the train/eval flag are carried over, so the
    ``state_dict`` is unchanged. BN layers elsewhere (not right after a Conv2d in a Sequential, e.g. in a
    custom forward) are left alone: construct those with ``conv=`` by hand. With ``strict`` a model without
    any such pair raises :class:`NoBatchNormError`.
    """
    if int(window) < 1:
        raise UsageError(f"window must be >= 1 (1 is plain BN), got {window}")
    if int(burn_in) < 0:
        raise UsageError(f"burn_in must be >= 0, got {burn_in}")
    found = list(_pairs(model))
    if strict and not found:
        raise NoBatchNormError(
            "the model has no nn.Conv2d -> nn.BatchNorm2d pair inside an nn.Sequential to convert",
            hint="construct CrossIterationBatchNorm2d(C, conv=...) by hand for BN layers in custom forwards",
        )
    for _, name, _, bn in found:
        if bn.running_mean is None or bn.running_var is None:
            raise UsageError(
                f"BatchNorm2d {name} has track_running_stats=False; CBN infers with running statistics"
            )
    for parent, name, conv, bn in found:
        ref = bn.running_mean
        new = CrossIterationBatchNorm2d(
            bn.num_features,
            conv,
            window,
            burn_in,
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
            compensate=compensate,
            device=ref.device,
            dtype=ref.dtype,
        )
        setattr(parent, name, transfer_state(bn, new))
    return model
