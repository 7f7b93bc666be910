r"""Online EvalNorm: learn each BN layer's alpha/beta while the model trains (EvalNorm §3.4, eqs. 7-9).

EvalNorm's "online estimation" minimises the same auxiliary loss as the offline pass, during ordinary
training, with stop-gradients so that the model's own training is untouched. :class:`OnlineEvalNorm`
attaches a forward pre-hook to every correctable BN layer (:func:`bncorrect.layers.find_norm_layers`).
At every call of a layer in training mode, with ``x`` its input (detached: ``<x>`` in the paper), ``mu_E``,
``var_E`` the layer's running statistics (EMA) as they are when the batch arrives (before the layer's own
EMA update with it, so the example is not part of the EMA it is compared with, as at inference) and
``mu_B``, ``var_B`` the statistics of its normalization batch (groups of ``train_batch_size`` examples,
or the whole batch the layer receives)::

    mu_hat  = alpha * <mu_i> + (1 - alpha) * mu_E                                          (eq. 7)
    var_hat = beta * <var_i> + (1 - beta) * var_E + beta * (1 - beta) * (<mu_i> - mu_E)^2   (eq. 8)
    L_aux   = mean | <(x - mu_B) / sigma_B> - (<x> - mu_hat) / sigma_hat |                   (eq. 9)

(:func:`bncorrect.correction.l_aux_given_stats`; the formulas live there only). Each layer owns its
alpha/beta (scalars, or (C,) vectors with ``per_channel``) and its own optimizer (Adam by default),
separate from the model's; the gradient of L_aux reaches only alpha and beta because every model tensor
enters detached, and nothing in the model (parameters, gradients, buffers, random state) is read for
writing or changed.

Decisions where the paper is silent:

- **When the step happens**: inside the hook, one optimizer step per layer call. The layer's data exist
  only there, so no activations or graphs are kept between calls and the training loop needs no change
  (attach, train, :meth:`OnlineEvalNorm.save`). Gradient accumulation over micro-batches is fine: each
  micro-batch is its own normalization batch.
- **The [0, 1] constraint**: projection. alpha and beta are plain tensors clamped to [0, 1] after every
  step (projected gradient). A sigmoid parameterisation cannot reach the boundary values, and 0 (large
  B) and 1 (B = 1 with spatial axes, where training-mode BN is instance normalization) are real optima.
- **Which layers learn**: only layers in training mode (a BN layer kept in eval mode while the rest of the
  model trains normalizes with its EMA in training too: there is no gap to correct).
- **What is saved**: the iterates averaged over recent steps (an exponential average with decay
  ``average``, bias-corrected; Polyak-Ruppert averaging), which removes most of the jitter a constant
  step size leaves around the optimum of the L1 objective. ``average=0`` saves the last iterate.
- A non-finite L_aux (NaN/Inf activations) gets a zero gradient for that step and is counted
  (``non_finite_steps``) instead of stopping training; the hook never synchronises with the device.

:meth:`OnlineEvalNorm.save` writes a corrections file (``method = evalnorm-online``) that
``bncorrect apply`` and the export read like any other.
"""

from __future__ import annotations

import functools
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import correction as C
from ..corrections import Corrections, LayerCorrection, save_corrections
from ..errors import DataError, NoBatchNormError, UsageError
from ..layers import find_norm_layers

__all__ = ["OnlineEvalNorm", "OptimizerFactory"]

#: Builds the optimizer of one layer from its parameters ``[alpha, beta]``.
OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]

METHOD = "evalnorm-online"


@dataclass
class _Layer:
    """Online state of one BN layer."""

    name: str
    module: nn.Module  # the module the hook sits on (a BN layer, or a CorrectedNorm wrapping one)
    norm: nn.Module  # the BN layer itself (running statistics, eps, training flag)
    alpha: Tensor
    beta: Tensor
    optimizer: torch.optim.Optimizer
    recent: deque[Tensor]  # (L_aux at the step's alpha/beta, L_aux at alpha = beta = 0) per step
    avg_alpha: Tensor  # exponential averages of the iterates (not bias-corrected)
    avg_beta: Tensor
    steps: int = 0
    non_finite: Tensor | None = None  # device-side count of steps with a non-finite L_aux
    examples: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)
    handle: Any = None


class OnlineEvalNorm:
    """Learns EvalNorm alpha/beta for every BN layer of ``model`` during its training.

    ``train_batch_size``: the normalization batch size B when the model normalizes groups of B examples
    inside larger batches (ghost batches); None: each layer's whole input batch is its normalization batch
    (plain BN, B = the per-device batch size). ``lr``: Adam learning rate (ignored when ``optimizer`` is
    given; ``optimizer(params)`` builds one optimizer per layer). ``init``: starting alpha = beta (default:
    the rule of thumb 1/B^2 when B is given, else 0). ``layers``: names to learn (default: every
    correctable BN layer). ``average``: decay of the average of the iterates that is saved (0: the last
    iterate). ``data``: what the model is trained on, recorded in the saved file. ``metrics_window``: how
    many recent steps the reported L_aux values average over.

    Usage::

        online = OnlineEvalNorm(model, train_batch_size=2)
        for x, y in loader:                       # the ordinary training loop, unchanged
            loss = criterion(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
        online.save("evalnorm.safetensors")       # bncorrect apply model.pt evalnorm.safetensors -o ...
        online.detach()
    """

    def __init__(
        self,
        model: nn.Module,
        train_batch_size: int | None = None,
        *,
        lr: float = 1e-2,
        init: float | None = None,
        per_channel: bool = False,
        layers: Iterable[str] | None = None,
        optimizer: OptimizerFactory | None = None,
        data: str | None = None,
        average: float = 0.99,
        metrics_window: int = 100,
    ) -> None:
        if train_batch_size is not None and train_batch_size < 1:
            raise UsageError(f"train_batch_size must be >= 1 (or None), got {train_batch_size}")
        if not lr > 0:
            raise UsageError(f"lr must be > 0, got {lr}")
        if not 0.0 <= average < 1.0:
            raise UsageError(f"average must lie in [0, 1), got {average}")
        if metrics_window < 1:
            raise UsageError(f"metrics_window must be >= 1, got {metrics_window}")
        if init is None:
            init = C.rule_of_thumb(train_batch_size) if train_batch_size is not None else 0.0
        if not 0.0 <= init <= 1.0:
            raise UsageError(f"init must lie in [0, 1], got {init}")
        self.train_batch_size = train_batch_size
        self.average = float(average)
        self.data = data
        self._layers: dict[str, _Layer] = {}
        found = find_norm_layers(model)
        wanted = None if layers is None else list(layers)
        if wanted is not None:
            known = {ly.name for ly in found}
            unknown = [n for n in wanted if n not in known]
            if unknown:
                raise UsageError(
                    f"layers not in the model: {', '.join(unknown)}",
                    hint=f"the model's BN layers: {', '.join(sorted(known)) or 'none'}",
                )
        # layers with broken stored statistics too: training replaces them (momentum updates)
        usable = [
            ly for ly in found if ly.correctable or (ly.stats_problem and ly.reason == ly.stats_problem)
        ]
        chosen = [ly for ly in usable if wanted is None or ly.name in wanted]
        if not chosen:
            if found:
                reasons = "; ".join(f"{ly.name}: {ly.reason}" for ly in found if ly.reason)
                raise NoBatchNormError(
                    f"no BatchNorm layer can be learned online ({reasons or 'none chosen'})"
                )
            raise NoBatchNormError(
                "the model has no BatchNorm layer",
                hint="online EvalNorm learns alpha/beta for BatchNorm layers that keep running statistics",
            )
        make = optimizer or (lambda params: torch.optim.Adam(params, lr=lr))
        for ly in chosen:
            norm = getattr(ly.module, "norm", ly.module)
            rm = norm.running_mean
            dtype = torch.float64 if rm.dtype == torch.float64 else torch.float32
            shape = (ly.channels,) if per_channel else ()
            alpha = torch.full(shape, float(init), dtype=dtype, device=rm.device, requires_grad=True)
            beta = torch.full(shape, float(init), dtype=dtype, device=rm.device, requires_grad=True)
            state = _Layer(
                ly.name,
                ly.module,
                norm,
                alpha,
                beta,
                make([alpha, beta]),
                deque(maxlen=metrics_window),
                torch.zeros_like(alpha, requires_grad=False),
                torch.zeros_like(beta, requires_grad=False),
            )
            state.handle = ly.module.register_forward_pre_hook(functools.partial(self._observe, state))
            self._layers[ly.name] = state

    # ------------------------------------------------------------------ hook
    def _observe(self, state: _Layer, module: nn.Module, args: tuple[Any, ...]) -> None:
        norm = state.norm
        if not norm.training or not args or not isinstance(args[0], Tensor):
            return
        if torch.is_inference_mode_enabled():
            return  # inference tensors cannot enter an autograd graph; nothing is trained here anyway
        x = args[0].detach()
        if x.dim() < 2 or x.shape[1] != norm.running_mean.numel():
            return  # the layer itself rejects the input
        group = self.train_batch_size or x.shape[0]
        if x.dim() == 2 and min(group, x.shape[0]) < 2:
            raise UsageError(
                f"layer {state.name} normalizes (N, C) inputs without spatial axes: with a normalization "
                f"batch of {min(group, x.shape[0])} example its training-mode variance is that of one "
                "example, which is undefined",
                hint="pass the normalization batch size the model trains with (train_batch_size >= 2)",
            )
        rm = norm.running_mean.detach()
        rv = norm.running_var.detach()
        eps = float(norm.eps)
        with torch.enable_grad():
            mu_i, var_i = C.example_stats(x)
            mu_b, var_b = C.group_stats(mu_i, var_i, self.train_batch_size)
            loss = C.l_aux_given_stats(x, mu_b, var_b, mu_i, var_i, rm, rv, eps, state.alpha, state.beta)
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        # No host synchronisation per step (this runs inside every training forward): a non-finite L_aux
        # is not tested with an `if`, its gradient is replaced by zero on the device and counted.
        finite = torch.isfinite(loss.detach())
        with torch.no_grad():
            for p in (state.alpha, state.beta):
                if p.grad is not None:
                    p.grad = torch.where(finite, p.grad, torch.zeros_like(p.grad))
        state.optimizer.step()
        with torch.no_grad():
            state.alpha.clamp_(0.0, 1.0)
            state.beta.clamp_(0.0, 1.0)
            state.avg_alpha.mul_(self.average).add_(state.alpha, alpha=1.0 - self.average)
            state.avg_beta.mul_(self.average).add_(state.beta, alpha=1.0 - self.average)
            base = C.l_aux_given_stats(x, mu_b, var_b, mu_i, var_i, rm, rv, eps, 0.0, 0.0)
        state.recent.append(torch.stack([loss.detach(), base.to(loss.dtype), finite.to(loss.dtype)]))
        bad = (~finite).to(torch.int64)
        state.non_finite = bad if state.non_finite is None else state.non_finite + bad
        state.examples += int(x.shape[0])
        state.batch_sizes[min(group, int(x.shape[0]))] += 1
        state.steps += 1

    # ------------------------------------------------------------------ results
    @property
    def layer_names(self) -> list[str]:
        return list(self._layers)

    @property
    def attached(self) -> bool:
        return any(s.handle is not None for s in self._layers.values())

    def steps(self) -> dict[str, int]:
        """Number of optimizer steps taken per layer."""
        return {n: s.steps for n, s in self._layers.items()}

    def coefficients(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Name -> (alpha, beta) as saved: the iterates averaged over recent steps (bias-corrected
        exponential average with decay ``average``; the last iterate when ``average`` is 0, or before any
        step). Detached copies on the CPU, in [0, 1]."""
        out = {}
        for n, s in self._layers.items():
            if s.steps == 0 or self.average == 0.0:
                a, b = s.alpha.detach(), s.beta.detach()
            else:
                scale = 1.0 - self.average**s.steps
                a = (s.avg_alpha / scale).clamp(0.0, 1.0)
                b = (s.avg_beta / scale).clamp(0.0, 1.0)
            out[n] = (a.cpu().clone(), b.cpu().clone())
        return out

    def iterates(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Name -> (alpha, beta) of the last step (what the optimizers hold), detached copies on the CPU."""
        return {
            n: (s.alpha.detach().cpu().clone(), s.beta.detach().cpu().clone())
            for n, s in self._layers.items()
        }

    def layer_metrics(self) -> dict[str, dict[str, float | int | None]]:
        """Per layer: L_aux at the learned alpha/beta and at alpha = beta = 0 (plain EMA), each the mean over
        the last ``metrics_window`` steps with a finite L_aux, plus steps, steps whose L_aux was NaN/Inf
        (their gradient was replaced by zero) and examples seen."""
        out: dict[str, dict[str, float | int | None]] = {}
        for n, s in self._layers.items():
            rows = torch.stack(list(s.recent)).cpu().double() if s.recent else torch.zeros(0, 3)
            ok = rows[rows[:, 2] > 0, :2]
            mean = ok.mean(0).tolist() if ok.shape[0] else [None, None]
            out[n] = {
                "l_aux": mean[0],
                "l_aux_ema": mean[1],
                "steps": s.steps,
                "non_finite_steps": 0 if s.non_finite is None else int(s.non_finite),
                "examples": s.examples,
            }
        return out

    def normalization_batch_size(self) -> int | None:
        """B as recorded in the file: ``train_batch_size``, else the most frequent batch size seen."""
        if self.train_batch_size is not None:
            return self.train_batch_size
        counts: Counter[int] = Counter()
        for s in self._layers.values():
            counts.update(s.batch_sizes)
        return counts.most_common(1)[0][0] if counts else None

    def corrections(self, data: str | None = None) -> Corrections:
        """The learned alpha/beta as :class:`~bncorrect.corrections.Corrections` (``evalnorm-online``).

        Layers that never ran in training mode are left out (they stay plain BN when applied) and listed
        under ``unseen_layers`` in the metrics; DataError when no layer took a step.
        """
        seen = {n: s for n, s in self._layers.items() if s.steps > 0}
        if not seen:
            raise DataError(
                "online EvalNorm has taken no step: no BN layer ran in training mode while attached",
                hint="attach OnlineEvalNorm before training and keep the model in train() mode",
            )
        coeffs = self.coefficients()
        layers = {n: LayerCorrection(*coeffs[n]) for n in seen}
        metrics: dict[str, Any] = {
            "layers": {n: m for n, m in self.layer_metrics().items() if n in seen},
            "steps": max(s.steps for s in seen.values()),
            "projection": "clamp to [0, 1] after each step",
        }
        unseen = [n for n in self._layers if n not in seen]
        if unseen:
            metrics["unseen_layers"] = unseen
        return Corrections(
            layers,
            METHOD,
            self.normalization_batch_size(),
            None,
            data if data is not None else self.data,
            metrics,
        )

    def save(self, path: str | Path, data: str | None = None) -> Path:
        """Write the corrections file (safetensors, DESIGN §5) for ``bncorrect apply``/export."""
        return save_corrections(self.corrections(data), path)

    # ------------------------------------------------------------------ lifecycle
    def detach(self) -> None:
        """Remove every hook; the learned values stay readable and savable."""
        for s in self._layers.values():
            if s.handle is not None:
                s.handle.remove()
                s.handle = None

    def __enter__(self) -> OnlineEvalNorm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()
