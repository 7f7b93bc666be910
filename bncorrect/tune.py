r"""``tune``: per-layer alpha/beta fitted to the validation metric, with a held-out guarantee.

Beyond both papers: EvalNorm fits per-layer coefficients to a proxy (L_aux), inference example weighing
fits one alpha to the metric. ``tune`` fits per-layer (alpha, beta) to the metric itself and only keeps
what a held-out part of the data confirms.

What it does (:func:`tune_model`):

1. **Split** the labelled validation data, seeded and stratified by label (:func:`stratified_split`; for
   segmentation masks one seeded draw per image, :func:`random_split`, since a mask holds many classes): a
   *fitting part* and a *held-out part* (``holdout``, default 0.3). The fitting part is split once more,
   the same way, into the examples the per-layer fit learns from and a *monitor* slice (``monitor``,
   default 0.25 of the fitting part) that stops it early and chooses the L1 strength.
2. **Candidates, on the fitting part**: EMA (alpha = beta = 0, plain BN); the rule 1/B^2; the best global
   alpha (:func:`bncorrect.sweep.sweep_alpha` over its grid, beta = alpha); EvalNorm offline
   (:func:`bncorrect.estimation.estimate_alpha_beta`) on the running statistics (kind ``evalnorm``) and,
   with ``recalibrate`` (the default), a second time on population statistics recalibrated on the fitting
   part first (:func:`bncorrect.recalibration.recalibrate_stats`, ``upstream`` :data:`DEFAULT_UPSTREAM` =
   ``train`` over shuffled groups of B, or ``eval`` with recalibrate's default choice of scheme; kind
   ``evalnorm-recal``, whose statistics replace the running ones wherever it is written; both estimates
   come from one estimation pass, :func:`estimate_pair`); both solve their
   grid search on ``solve_rows`` = :data:`DEFAULT_SOLVE_ROWS` = 1024 (example, channel) rows per layer
   instead of estimate's 4096 (the solve cost 1.4-1.8 sweeps at 4096 rows, and on the four samples x seeds
   0-2 the candidate tune chooses was the same at 4096, 1024 and 512 rows, the EvalNorm row's held-out NLL
   moving by at most 0.0013 at 1024 rows); and **per-layer alpha/beta fitted to the NLL**
   (:func:`fit_per_layer`, always from the best global alpha on the running statistics).
3. **Score every candidate on the held-out part** (NLL, top-1, top-5, with the sweep's paired differences
   from EMA; segmentation: pixel-nll, mIoU and pixel accuracy over the labelled pixels, the sweep's
   :class:`~bncorrect.sweep.SegmentationTally`) and choose the best by ``metric``. EMA is a candidate and
   wins ties, so the written correction is **never worse than EMA on the held-out part** (by ``metric``:
   for miou and the accuracies higher is better); when EMA wins, EMA is written and the notes say so (and,
   when the per-layer fit beat EMA on the fitting part but not on the held-out part, that it overfitted).

The per-layer fit (:func:`fit_per_layer`). The corrected layer (DESIGN §2) is differentiable in alpha and
beta. On a deep copy of the model (eval mode, every network parameter frozen) each correctable BN layer's
coefficients become leaf tensors requiring gradients, started from the best global alpha (alpha = beta =
a*), and Adam (cosine-decayed learning rate) minimises, on mini-batches of the fitting examples,

    loss_k = mean cross-entropy  +  lambda_k * s * sum_layers mean_channels (alpha + beta)

projecting every coefficient back to [0, 1] after each step. ``s`` is the EMA NLL on the fitting part
(so the strengths are relative to the loss), and the L1 term pulls each coefficient toward 0 with the same
force in every layer. Coefficients that the pull holds at 0 end exactly at 0 (the projection clips them
there); values below :data:`ZERO_SNAP` are set to 0 at the end. A layer with alpha = beta = 0 stays plain,
foldable BN in ONNX; the result counts them (``zero_layers``). The strengths of ``strengths`` (default
:data:`DEFAULT_STRENGTHS`: 0, 0.01, 0.1; 0.001 fitted like 0 on the samples) are fitted **side by side
in one pass**: the K coefficient sets are stacked along the batch axis, each BN layer normalizing row
block k with set k (as the sweep stacks candidates), so one forward and one backward serve all K. After
every epoch each set is scored on the monitor slice and the best snapshot kept (early stopping,
``patience`` epochs without improvement; a set that stops leaves the stack, so the sets still running
cost less per epoch, and its kept snapshot is final); the strength with the lowest monitor NLL is the tuned
candidate. ``per_channel`` fits vectors of length C instead of one scalar per layer. Each stacked BN layer
is one autograd node whose derivative is written out
(:func:`bncorrect.correction.corrected_scale_shift_backward` and the statistics' own), checked against
autograd op by op and finite differences in the tests; the L1 term's gradient, a constant, is added to the
NLL's rather than taken through autograd.

Segmentation (masks y (N, H, W), per-pixel logits (N, K, H, W), ``output_key`` for a dict output): the
metrics are the sweep's (:data:`bncorrect.sweep.SEGMENTATION_METRICS`; ``"nll"`` means pixel-nll), pixels
whose mask value is ``ignore_index`` count nowhere, every mask is checked (values 0..K-1 or the ignore
index) before any pass, and the per-layer fit minimises the mean pixel cross-entropy over the labelled
pixels of each mini-batch (:class:`PixelLoss`, passed to :func:`fit_per_layer` as its ``loss_fn``). Memory
stays bounded: the fit's mini-batches hold at most about :data:`DENSE_FIT_BYTES` of per-pixel logits for
all strengths, its monitor and the candidates' scoring are evaluated in pieces of at most
:data:`bncorrect.sweep.DENSE_PIECE_BYTES`, and the cache keeps its byte budget.

Where the held-out part is used, and what its numbers mean: the held-out part is touched once, after
everything is fitted, to score the candidates and choose among them (and for the guard). The L1 strength
and the stopping epoch are chosen on the monitor slice of the *fitting* part, not on the held-out part, so
the held-out numbers of every candidate are honest estimates of that candidate; only the chosen row's
number is slightly optimistic, by the choice among the five candidates.

What is cached (``cache_bytes``, default 1 GiB): the fitting and monitor examples, as decoded tensors on
the device, so an image folder is read once; and when the model is an ``nn.Sequential`` (nested
Sequentials are flattened) run with the default forward, the output of its *prefix* before the first
module holding a BN layer instead: that prefix (e.g. a stem convolution) does not depend on alpha or beta,
so it runs once per example, not once per step. Past the budget the batches are read from the loader every
epoch. Stacking and the prefix cut are checked, not trusted: on a probe batch with random coefficient sets
the fitting network must reproduce K separately corrected copies of the model
(:class:`~bncorrect.layers.CorrectedNorm`); otherwise the next simpler way is used (prefix cut -> the whole
model with the first BN layer fanning the batch out -> the batch repeated K times -> one coefficient set
per forward), recorded in ``FitResult.mode`` and the notes.

Prior strength and test-time adaptation (``--prior-strength N``). Test-time BN adaptation (Schneider et
al. 2020, "Improving robustness against common corruptions by covariate shift adaptation") blends the
training statistics, weighted as N pseudo-examples, with the test statistics:

    mu_TTA  = (N mu_E  + mu_i)  / (N + 1)
    var_TTA = (N var_E + var_i) / (N + 1)

With alpha = beta = w = 1/(N + 1) (:func:`alpha_from_prior_strength`) DESIGN §2 gives mu_hat = mu_E +
w (mu_i - mu_E) = mu_TTA exactly, and

    var_hat = w var_i + (1 - w) var_E + w (1 - w) d^2 = var_TTA + w (1 - w) d^2,     d = mu_i - mu_E,

i.e. var_hat = var_TTA + N d^2 / (N + 1)^2. The extra term is the between-group part of the law of total
variance: var_hat is the variance of the mixture "the population (mean mu_E, variance var_E) with weight
1 - w and the example's values with weight w" about its own mean mu_hat, while var_TTA is the convex blend
of the two variances, each about its own mean. The two agree when d = 0 (and at N = 0 or N -> infinity).

The library never prints: :meth:`TuneResult.table` returns rich tables, :func:`plot_tune` writes a PNG
and :func:`write_tune_report` a JSON file (both atomically).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from . import correction as C
from .errors import DataError, UsageError, spell
from .layers import (
    CorrectedNorm,
    correct_model,
    corrected_layers,
    is_batchnorm_like,
    uses_batch_statistics,
)
from .passes import Batch, ForwardFn, Progress, batch_size_of, default_forward, map_batch, resolve_device

if TYPE_CHECKING:
    from rich.table import Table

    from .estimation import EstimateResult
    from .recalibration import RecalibrateResult
    from .sweep import Candidate, SweepResult, SweepRow

__all__ = [
    "DEFAULT_HOLDOUT",
    "DEFAULT_MONITOR",
    "DEFAULT_STRENGTHS",
    "DEFAULT_UPSTREAM",
    "FitLoss",
    "FitResult",
    "PixelLoss",
    "StrengthFit",
    "TuneResult",
    "TuneRow",
    "alpha_from_prior_strength",
    "alphas_from_prior_strengths",
    "classification_loss",
    "dataset_labels",
    "estimate_pair",
    "fit_per_layer",
    "parse_prior_strengths",
    "parse_strengths",
    "plot_tune",
    "random_split",
    "stratified_split",
    "tune_model",
    "write_tune_report",
]

#: Fraction of the (labelled) validation data held out to score the candidates.
DEFAULT_HOLDOUT = 0.3
#: Fraction of the fitting part kept aside to stop the per-layer fit early and choose the L1 strength.
DEFAULT_MONITOR = 0.25
#: L1 strengths tried side by side, relative to the EMA NLL on the fitting part.
DEFAULT_STRENGTHS: tuple[float, ...] = (0.0, 1e-2, 1e-1)
#: Adam's learning rate at the start (cosine-decayed to 0 over ``max_epochs``).
DEFAULT_LR = 0.03
DEFAULT_MAX_EPOCHS = 10
DEFAULT_PATIENCE = 2
#: Examples per optimisation step (each step evaluates them for all K strengths).
DEFAULT_FIT_BATCH = 64
#: Decoded fitting/monitor examples (or prefix outputs) kept on the device up to this many bytes.
DEFAULT_CACHE_BYTES = 1 << 30
#: Fitted coefficients below this are set to exactly 0 at the end (a layer at alpha = beta = 0 is plain BN).
ZERO_SNAP = 1e-4
#: (example, channel) rows of each layer's sample the EvalNorm candidate's grid search uses (estimate's
#: default is 4096; see the module docstring for why tune uses fewer).
DEFAULT_SOLVE_ROWS = 1024
#: Examples of the probe batch that checks stacking and the prefix cut.
PROBE_EXAMPLES = 8
#: How the recalibrated EvalNorm candidate's population statistics are taken by default: training-consistent
#: (the model in training-mode normalization over groups of B, each group's statistics averaged; what the
#: EMA approximates and what EvalNorm's target, BN over B examples, normalizes with), one pass.
DEFAULT_UPSTREAM = "train"
#: Segmentation: at most about this many bytes of float32 per-pixel logits (all strengths together) per
#: optimisation step of the per-layer fit; the fit's mini-batches shrink for large maps (sweep-alpha's pieces
#: are :data:`bncorrect.sweep.DENSE_PIECE_BYTES`).
DENSE_FIT_BYTES = 64 << 20

#: Candidate kinds, simplest first: ties on the held-out metric go to the simpler correction.
KINDS = ("ema", "rule", "global", "evalnorm", "evalnorm-recal", "tuned")


# ---------------------------------------------------------------------------------------------- options
def alpha_from_prior_strength(n: float, option: str = "prior_strength") -> float:
    """``--prior-strength N``: the running statistics weigh as N pseudo-examples against the example's
    own, i.e. alpha = 1/(N + 1) (N = 0: the example's statistics only; large N: plain BN). See the module
    docstring for the relation to test-time BN adaptation."""
    if isinstance(n, bool) or not isinstance(n, int | float) or not math.isfinite(float(n)) or n < 0:
        raise UsageError(
            f"{spell(option, n)}: the prior strength must be a number >= 0",
            hint=f"N pseudo-examples of the running statistics: alpha = 1/(N+1), e.g. {spell(option, 3)} "
            "for alpha = 0.25",
        )
    return 1.0 / (float(n) + 1.0)


def _numbers(text: str, option: str, hint: str) -> list[float]:
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or any(p == "" for p in parts):
        raise UsageError(f"{spell(option, text)}: expected comma-separated numbers", hint=hint)
    out = []
    for p in parts:
        try:
            out.append(float(p))
        except ValueError:
            raise UsageError(f"{spell(option, text)}: {p!r} is not a number", hint=hint) from None
    return out


def parse_prior_strengths(text: str) -> list[float]:
    """``"0,1,3,15"`` -> ``[0.0, 1.0, 3.0, 15.0]`` (each >= 0)."""
    hint = "give prior strengths N >= 0, e.g. --prior-strengths 1,3,7,15 (alpha = 1/(N+1))"
    values = _numbers(text, "prior_strengths", hint)
    for v in values:
        alpha_from_prior_strength(v, "prior_strengths")
    return values


def alphas_from_prior_strengths(strengths: Iterable[float]) -> list[float]:
    """The alpha grid of prior strengths: 1/(N+1) each, sorted, duplicates removed."""
    return sorted({alpha_from_prior_strength(float(n), "prior_strengths") for n in strengths})


def parse_strengths(text: str) -> list[float]:
    """``--strengths 0,1e-3,1e-2,1e-1``: L1 strengths (>= 0, relative to the NLL), sorted, unique."""
    hint = "give L1 strengths >= 0 relative to the NLL, e.g. --strengths 0,0.001,0.01,0.1"
    values = _numbers(text, "strengths", hint)
    return check_strengths(values)


def check_strengths(values: Iterable[float]) -> list[float]:
    out = sorted({float(v) for v in values})
    if not out or any(not math.isfinite(v) or v < 0 for v in out):
        raise UsageError(
            f"{spell('strengths', ','.join(f'{v:g}' for v in out))}: L1 strengths must be numbers >= 0",
            hint="e.g. --strengths 0,0.001,0.01,0.1 (0: no pull toward plain BN)",
        )
    return out


def _check_fraction(value: float, option: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < float(value) < 1.0:
        raise UsageError(
            f"{spell(option, value)}: {what} must lie strictly between 0 and 1",
            hint=f"e.g. {spell(option, 0.3)}",
        )
    return float(value)


# ---------------------------------------------------------------------------------------------- the split
def stratified_split(labels: Tensor, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Split example indices 0..N-1 into ``(rest, part)`` with ``part`` holding round(fraction * N)
    examples, stratified by label: every class puts floor or ceil of fraction * n_c of its examples into
    ``part`` (the classes with the largest remainders, ties in a seeded random order, get the ceil), drawn
    by a permutation seeded with ``seed``. Both are sorted int64 tensors; the same labels and seed give the
    same split."""
    y = torch.as_tensor(labels).reshape(-1).long().cpu()
    n = int(y.numel())
    gen = torch.Generator().manual_seed(int(seed))
    classes = torch.unique(y).tolist()
    members = {c: (y == c).nonzero().reshape(-1) for c in classes}
    perms = {c: idx[torch.randperm(idx.numel(), generator=gen)] for c, idx in members.items()}
    quota = {c: fraction * idx.numel() for c, idx in members.items()}
    take = {c: math.floor(q) for c, q in quota.items()}
    total = math.floor(fraction * n + 0.5)
    left = total - sum(take.values())
    if left > 0:
        ties = torch.rand(len(classes), generator=gen).tolist()
        order = sorted(range(len(classes)), key=lambda i: (-(quota[classes[i]] - take[classes[i]]), ties[i]))
        for i in order[:left]:
            take[classes[i]] += 1
    part = [perms[c][: take[c]] for c in classes]
    rest = [perms[c][take[c] :] for c in classes]
    cat = lambda ts: torch.sort(torch.cat(ts)).values if ts else torch.zeros(0, dtype=torch.long)  # noqa: E731
    return cat(rest), cat(part)


def random_split(n: int, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Split example indices 0..n-1 into ``(rest, part)`` with ``part`` holding round(fraction * n) of them,
    drawn by a permutation seeded with ``seed`` (segmentation: one draw per image, since a mask holds many
    classes and stratifying by label does not apply). Both sorted int64; the same n and seed give the same
    split."""
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(int(n), generator=gen)
    take = math.floor(fraction * int(n) + 0.5)
    return torch.sort(perm[take:]).values, torch.sort(perm[:take]).values


def dataset_labels(dataset: Any, data_hint: str = "") -> Tensor:
    """The labels of every example of an indexable ``dataset``, as an int64 tensor: class labels (N,) or
    segmentation masks (N, H, W): a bncorrect array dataset's ``y``, an image folder's class indices, a
    ``targets`` attribute (torchvision), else ``dataset[i][1]`` for every i (which reads every example
    once). :class:`DataError` without labels or for labels of another shape; :class:`UsageError` for data
    that cannot be split by example."""
    where = data_hint or getattr(dataset, "description", None) or None
    if getattr(dataset, "has_labels", True) is False:
        raise DataError(
            "tune needs labels, and this data has none",
            path=getattr(dataset, "path", None) or where,
            hint="give .npz/.pt/.safetensors with a 'y' array of class labels (N,), or image folders with "
            "one folder per class",
        )
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise UsageError(
            f"tune splits the data into a fitting and a held-out part by example, and cannot index a "
            f"{type(dataset).__name__}",
            hint="pass a path (--data), arrays (x, y), or a map-style Dataset (len and [i]); not a "
            "DataLoader or an iterator of batches",
        )
    y: Any = None
    if isinstance(getattr(dataset, "y", None), Tensor):
        y = dataset.y
    elif isinstance(getattr(dataset, "files", None), list) and getattr(dataset, "classes", None) is not None:
        y = torch.tensor([int(label) for _, label in dataset.files], dtype=torch.long)
    elif getattr(dataset, "targets", None) is not None:
        y = torch.as_tensor(dataset.targets)
    else:
        y = (
            torch.stack([torch.as_tensor(dataset[i][1]) for i in range(len(dataset))])
            if len(dataset)
            else None
        )
    if y is None or len(dataset) == 0:
        raise DataError("the data holds no examples", path=where, hint="give labelled examples")
    y = torch.as_tensor(y)
    if y.dim() not in (1, 3) or y.is_floating_point() or y.is_complex():
        raise DataError(
            f"tune needs one integer class label per example (y of shape (N,)) or one mask of class indices "
            f"per image (y of shape (N, H, W)), got labels of shape {tuple(y.shape)} ({y.dtype})",
            path=where,
            hint="store the class index of each example as y, shape (N,), or segmentation masks as y, shape "
            "(N, H, W) (unlabelled pixels: the ignore index, default 255)",
        )
    return y.long()


class _Part(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """The examples ``indices`` of ``base``, with the attributes bncorrect's loaders read."""

    def __init__(
        self, base: Any, indices: Sequence[int], what: str, label_shape: tuple[int, ...] = ()
    ) -> None:
        self.base = base
        self.indices = [int(i) for i in indices]
        self.path = getattr(base, "path", None)
        self.has_labels = True
        self.skipped: list[str] = []
        self.num_classes = getattr(base, "num_classes", None)
        self.label_shape: tuple[int, ...] = tuple(label_shape)
        self.what = what
        base_text = getattr(base, "description", type(base).__name__)
        self.description = f"{base_text}; {what}: {len(self.indices)} examples"

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.base[self.indices[i]]

    def __getitems__(self, indices: Sequence[int]) -> Any:
        picked = [self.indices[i] for i in indices]
        if callable(getattr(self.base, "__getitems__", None)):
            return self.base.__getitems__(picked)
        return [self.base[i] for i in picked]

    def example_shape(self) -> tuple[int, ...]:
        return tuple(torch.as_tensor(self[0][0]).shape)


def _part_loader(
    part: _Part, batch_size: int, *, shuffle: bool, seed: int, num_workers: int, shard: bool = True
) -> Iterable[Batch]:
    """Batches ``(x, y)`` over ``part``: bncorrect's loader (seeded shuffle, clean errors from workers);
    under a process group this rank's shard of them (``shard``; the passes merge across ranks)."""
    from . import distributed
    from .data import make_loader

    where = (distributed.rank(), distributed.world_size()) if shard else None
    return make_loader(part, batch_size, shuffle=shuffle, seed=seed, num_workers=num_workers, shard=where)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- the layer
class _StackMismatch(Exception):
    """A stacked forward met a tensor that is neither the base batch nor K blocks of it."""


class _StackedNormFn(torch.autograd.Function):
    """The stacked corrected layer of :class:`_FitNorm` (``direct`` strategy) as one autograd node: the
    input ``x`` of ``blocks`` x m rows (``blocks`` = k, or 1 for the fan-out), the leaf coefficients
    ``alpha``, ``beta`` (K, P) of which the sets ``active`` (None: all K, k = K) are used, output row block j
    normalized with set j. Forward: :func:`~bncorrect.correction.example_stats`,
    :func:`~bncorrect.correction.corrected_scale_shift`, :func:`~bncorrect.correction.affine`. Backward:
    from ``g_s = sum(g x)`` and ``g_t = sum(g)`` per (row, channel),
    :func:`~bncorrect.correction.corrected_scale_shift_backward` for the small (row, channel) terms, and
    ``grad_x = sum_blocks g s + g_mu / L + g_var 2 (x - mu) / L``: the same derivatives autograd takes
    through those functions, without one autograd node per small operation (about twenty per layer)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        alpha: Tensor,
        beta: Tensor,
        active: Tensor | None,
        k: int,
        m: int,
        norm: nn.Module,
    ) -> Tensor:
        c = x.shape[1]
        blocks = x.shape[0] // m
        mu_i, var_i = C.example_stats(x)
        dt = mu_i.dtype
        rm, rv, eps = norm.running_mean.to(dt), norm.running_var.to(dt), float(norm.eps)
        weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
        ctx.coef = (alpha.shape[0], alpha.dtype)
        if active is not None:
            alpha, beta = alpha.index_select(0, active), beta.index_select(0, active)
        a, b = alpha.to(dt)[:, None, :], beta.to(dt)[:, None, :]
        mu3, var3 = mu_i.reshape(blocks, m, c), var_i.reshape(blocks, m, c)
        s, t = C.corrected_scale_shift(mu3, var3, rm, rv, a, b, eps, weight, bias)  # (k, m, c)
        ctx.save_for_backward(x, mu3, var3, a, b, s.expand(k, m, c))
        ctx.meta = (k, m, blocks, norm, active)
        # y = x * s + t as one broadcast over (k, m, c, L) (blocks = 1: the fan-out, no copy of x per
        # block), written into a fresh output tensor: the result must not be a view of a tensor made here,
        # which autograd refuses to let the next layer modify in place (torchvision's ReLU(inplace=True))
        x4 = x.reshape(blocks, m, c, -1)
        x4 = x4 if x4.dtype == s.dtype else x4.to(s.dtype)
        out = torch.empty((k * m, *x.shape[1:]), dtype=s.dtype, device=x.device)
        torch.addcmul(t[..., None], x4, s[..., None], out=out.view(k, m, c, -1))
        return out if out.dtype == x.dtype else out.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, mu3, var3, a, b, s = ctx.saved_tensors
        k, m, blocks, norm, active = ctx.meta
        dt = mu3.dtype
        c = x.shape[1]
        values = math.prod(x.shape[2:])
        g4 = g.to(dt).reshape(k, m, c, values)
        x4 = x.to(dt).reshape(blocks, m, c, values)
        g_t = g4.sum(-1)
        g_s = (g4 * x4).sum(-1)
        rm, rv = norm.running_mean.to(dt), norm.running_var.to(dt)
        weight = getattr(norm, "weight", None)
        g_mu, g_var, g_a, g_b = C.corrected_scale_shift_backward(
            g_s, g_t, mu3, var3, rm, rv, a, b, float(norm.eps), weight
        )
        g_alpha = g_a.sum(1) if a.shape[-1] == c else g_a.sum((1, 2))[:, None]  # (k, P)
        g_beta = g_b.sum(1) if b.shape[-1] == c else g_b.sum((1, 2))[:, None]
        g_x = None
        if ctx.needs_input_grad[0]:
            if blocks == 1:  # the fan-out: the k blocks' gradients add up
                through_s = (g4 * s[..., None]).sum(0, keepdim=True)  # the x * s term
                g_mu, g_var = g_mu.sum(0, keepdim=True), g_var.sum(0, keepdim=True)
            if x.dim() == 2:  # mean = x, var = 0 (a constant)
                g_x = (g4 * s[..., None] if blocks > 1 else through_s).squeeze(-1) + g_mu
            else:  # g s + g_mu / L + g_var * 2 (x - mu) / L, in one temporary of the size of x
                scale = g_var * (2.0 / values)
                shift = g_mu / values - scale * mu3
                g_x = torch.addcmul(shift[..., None], x4, scale[..., None])
                g_x = g_x.add_(through_s) if blocks == 1 else g_x.addcmul_(g4, s[..., None])
            g_x = g_x.reshape(x.shape).to(x.dtype)
        k_all, coef_dtype = ctx.coef
        g_alpha, g_beta = g_alpha.to(coef_dtype), g_beta.to(coef_dtype)
        if active is not None:  # the sets left out get no gradient
            zeros = torch.zeros(k_all, g_alpha.shape[1], dtype=coef_dtype, device=g_alpha.device)
            g_alpha, g_beta = zeros.index_add(0, active, g_alpha), zeros.index_add(0, active, g_beta)
        return g_x, g_alpha, g_beta, None, None, None, None


class _FitNorm(nn.Module):
    """One BN layer with K differentiable coefficient sets (leaf tensors ``alpha``, ``beta`` of shape
    (K, P), P = 1 or C). With ``stack = (K, m, expand)`` it normalizes a stacked batch, row block k with
    set k (``expand``: an input of the base m rows is fanned out to the K blocks); without, the whole input
    with set ``current``. The arithmetic is :func:`bncorrect.correction.corrected_scale_shift` (direct) or
    the input map (layers corrected through their own forward), as in :class:`CorrectedNorm`. A stacked pass
    of a ``direct`` layer runs as one autograd node (:class:`_StackedNormFn`, while ``fused``; else through
    autograd op by op, the reference the tests compare it with)."""

    #: stacked direct passes through :class:`_StackedNormFn`
    fused: bool = True

    def __init__(self, norm: nn.Module, strategy: str, k: int, width: int, alpha0: float, beta0: float):
        super().__init__()
        self.norm = norm
        self.strategy = strategy
        rm = norm.running_mean
        dt = torch.float64 if rm.dtype == torch.float64 else torch.float32
        self.alpha = torch.full((k, width), float(alpha0), dtype=dt, device=rm.device, requires_grad=True)
        self.beta = torch.full((k, width), float(beta0), dtype=dt, device=rm.device, requires_grad=True)
        self.stack: tuple[int, int, bool] | None = None
        self.current = 0
        #: the coefficient sets a stacked pass uses, in block order (None: all K)
        self.active: Tensor | None = None

    @property
    def channels(self) -> int:
        return int(self.norm.running_mean.numel())

    def forward(self, x: Tensor) -> Tensor:
        norm = self.norm
        c = self.channels
        if x.dim() < 2 or x.shape[1] != c:
            raise _StackMismatch(f"input of shape {tuple(x.shape)} for a BN layer of {c} channels")
        if self.stack is not None:
            k, m, expand = self.stack
            n = x.shape[0]
            if n == k * m:
                blocks = k
            elif expand and n == m:
                blocks = 1
            else:
                raise _StackMismatch(f"a BN layer received {n} rows in a stacked pass of {k} x {m}")
            if self.strategy == "direct" and self.fused:
                return _StackedNormFn.apply(x, self.alpha, self.beta, self.active, k, m, norm)
        mu_i, var_i = C.example_stats_grad(x)  # analytic backward: one pass over x
        dt = mu_i.dtype
        rm, rv, eps = norm.running_mean.to(dt), norm.running_var.to(dt), float(norm.eps)
        weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
        if self.stack is None:
            a, b = self.alpha[self.current].to(dt), self.beta[self.current].to(dt)
            if self.strategy == "direct":
                s, t = C.corrected_scale_shift(mu_i, var_i, rm, rv, a, b, eps, weight, bias)
                return C.affine(x, s, t)
            mean, var = C.corrected_stats(mu_i, var_i, rm, rv, a, b)
            return self._through_forward(x, mean, var)
        mu3, var3 = mu_i.reshape(blocks, m, c), var_i.reshape(blocks, m, c)
        alpha, beta = self.alpha, self.beta
        if self.active is not None:
            alpha, beta = alpha.index_select(0, self.active), beta.index_select(0, self.active)
        a, b = alpha.to(dt)[:, None, :], beta.to(dt)[:, None, :]
        if self.strategy == "direct":
            s, t = C.corrected_scale_shift(mu3, var3, rm, rv, a, b, eps, weight, bias)  # (k, m, c)
            if blocks == 1 and k > 1:  # the fan-out: block j of the output is the base rows under set j
                x = x.expand(k, *x.shape).reshape(k * m, *x.shape[1:])
            # x * s + t per (row, channel): as one eval-mode batch norm of the (1, rows * c, L) view where
            # that is faster, whose backward gives grad_x, sum(g * x) and sum(g) in one pass
            return C.affine(x, s.expand(k, m, c).reshape(k * m, c), t.expand(k, m, c).reshape(k * m, c))
        mean, var = C.corrected_stats(mu3, var3, rm, rv, a, b)
        mean, var = mean.expand(k, m, c).reshape(k * m, c), var.expand(k, m, c).reshape(k * m, c)
        if blocks == 1:
            x = x.repeat(k, *([1] * (x.dim() - 1)))
        return self._through_forward(x, mean, var)

    def _through_forward(self, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        norm = self.norm
        k, m = C.input_map(mean, var, norm.running_mean, norm.running_var, float(norm.eps))
        return norm((x.to(k.dtype) * C.expand_to(k, x) + C.expand_to(m, x)).to(x.dtype))


def _repeat(batch: Batch, rows: int, k: int) -> Batch:
    return map_batch(
        batch, lambda t: t.repeat(k, *([1] * (t.dim() - 1))) if t.dim() and t.shape[0] == rows else t
    )


def _flatten(module: nn.Module) -> list[nn.Module]:
    """The chain of modules an ``nn.Sequential`` (nested ones flattened) applies, in order."""
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        return [leaf for child in module for leaf in _flatten(child)]
    return [module]


def _holds_norm(module: nn.Module) -> bool:
    return any(
        isinstance(m, _FitNorm | CorrectedNorm) or is_batchnorm_like(m) or uses_batch_statistics(m)
        for m in module.modules()
    )


def _split_prefix(work: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(prefix, rest)`` of a sequential model whose prefix holds no BN layer, or None."""
    if not (isinstance(work, nn.Sequential) and type(work).forward is nn.Sequential.forward):
        return None
    chain = _flatten(work)
    first = next((i for i, m in enumerate(chain) if _holds_norm(m)), None)
    if first is None or first == 0:
        return None
    return nn.Sequential(*chain[:first]), nn.Sequential(*chain[first:])


class _Runner:
    """Runs the fitting network for all K coefficient sets on one batch of m examples: logits
    (K, m, classes). ``mode``: ``shared`` (the first BN layer fans the batch out), ``repeat`` (the batch
    repeated K times) or ``single`` (one forward per set). :meth:`use` restricts it to some of the sets
    (those still being fitted): logits (len(sets), m, classes), in that order."""

    def __init__(
        self,
        net: nn.Module,
        layers: Mapping[str, _FitNorm],
        k: int,
        mode: str,
        forward_fn: ForwardFn,
        output_key: str | int | None,
    ) -> None:
        self.net, self.layers, self.k, self.mode = net, layers, k, mode
        self.forward_fn, self.output_key = forward_fn, output_key
        self.sets = list(range(k))

    def use(self, sets: Sequence[int] | None) -> None:
        """Run only the coefficient sets ``sets`` (None: all K)."""
        self.sets = list(range(self.k)) if sets is None else [int(i) for i in sets]
        every = self.sets == list(range(self.k))  # all K in order: the layers take their sets as they are
        index = None if every else torch.tensor(self.sets, dtype=torch.long)
        for layer in self.layers.values():
            layer.active = None if index is None else index.to(layer.alpha.device)

    def __call__(self, batch: Batch) -> Tensor:
        from .sweep import select_logits

        m = batch_size_of(batch)
        k = len(self.sets)
        if self.mode == "single":
            outs = []
            for i in self.sets:
                for layer in self.layers.values():
                    layer.current = i
                outs.append(select_logits(self.forward_fn(self.net, batch), self.output_key, m))
            for layer in self.layers.values():
                layer.current = 0
            return torch.stack(outs)
        shared = self.mode == "shared"
        for layer in self.layers.values():
            layer.stack = (k, m, shared)
        try:
            out = self.forward_fn(self.net, batch if shared else _repeat(batch, m, k))
        finally:
            for layer in self.layers.values():
                layer.stack = None
        logits = select_logits(out, self.output_key, k * m)
        return logits.reshape(k, m, *logits.shape[1:])


# ---------------------------------------------------------------------------------------------- the fit
@dataclass
class StrengthFit:
    """The per-layer fit at one L1 strength: its coefficients (after snapping) and how it went.

    ``monitor_nll`` is the monitor slice's NLL of the kept snapshot, ``start_monitor_nll`` that of the
    start (the best global alpha); ``epoch`` the epoch the snapshot is from (0: the start itself)."""

    strength: float
    alpha: dict[str, Tensor]
    beta: dict[str, Tensor]
    monitor_nll: float
    start_monitor_nll: float
    epoch: int
    zero_layers: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "strength": self.strength,
            "monitor_nll": _finite(self.monitor_nll),
            "start_monitor_nll": _finite(self.start_monitor_nll),
            "epoch": self.epoch,
            "n_zero_layers": len(self.zero_layers),
            "zero_layers": list(self.zero_layers),
        }


@dataclass
class FitResult:
    """What :func:`fit_per_layer` found: one :class:`StrengthFit` per strength, the chosen one (lowest
    monitor NLL; ties to the stronger pull), and how the fit ran."""

    fits: list[StrengthFit]
    chosen: int
    mode: str
    cache: str
    epochs: int
    steps: int
    examples: int
    monitor_examples: int
    notes: list[str] = field(default_factory=list)
    #: the monitor NLL of every set: at the start, then after each epoch (None once the set had stopped)
    history: list[list[float | None]] = field(default_factory=list)

    @property
    def best(self) -> StrengthFit:
        return self.fits[self.chosen]


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _batch_bytes(batch: Batch) -> int:
    total = 0

    def add(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    map_batch(batch, add)
    return total


def _labels(batch: Batch, rows: int) -> Tensor:
    from .sweep import batch_labels

    return batch_labels(batch, rows, "")


class _Source:
    """The batches of one part for the fit: held on the device (``cached``), or read from ``batches``
    every time."""

    def __init__(self, batches: Iterable[Batch], device: torch.device, budget: int) -> None:
        self.batches = batches
        self.device = device
        self.cached: list[Batch] | None = []
        used = 0
        for batch in batches:
            batch = map_batch(batch, lambda t: t.to(device))
            used += _batch_bytes(batch)
            if used > budget:
                self.cached = None
                break
            self.cached.append(batch)
        self.bytes = used

    def __iter__(self) -> Any:
        if self.cached is not None:
            return iter(self.cached)
        return (map_batch(b, lambda t: t.to(self.device)) for b in self.batches)


def _make_layers(
    work: nn.Module, k: int, per_channel: bool, alpha0: float, beta0: float
) -> dict[str, _FitNorm]:
    correct_model(work, 0.0)  # NoBatchNormError when there is nothing to correct
    layers: dict[str, _FitNorm] = {}
    for name, cn in corrected_layers(work).items():
        width = cn.num_channels if per_channel else 1
        layer = _FitNorm(cn.norm, cn.strategy, k, width, alpha0, beta0)
        parent, _, child = name.rpartition(".")
        setattr(work.get_submodule(parent) if parent else work, child, layer)
        layers[name] = layer
    return layers


def _reference_logits(
    model: nn.Module,
    coefficients: list[tuple[dict[str, Tensor], dict[str, Tensor]]],
    batch: Batch,
    forward_fn: ForwardFn,
    output_key: str | int | None,
    device: torch.device,
) -> Tensor:
    """Each coefficient set applied to a corrected copy of ``model`` (CorrectedNorm), one at a time."""
    from .sweep import select_logits

    ref = correct_model(copy.deepcopy(model), 0.0).to(device).eval()
    wrapped = corrected_layers(ref)
    rows = batch_size_of(batch)
    outs = []
    with torch.no_grad():
        for alpha, beta in coefficients:
            for name, layer in wrapped.items():
                a, b = alpha[name], beta[name]
                layer.set_coefficients(
                    a if a.numel() > 1 else a.reshape(()), b if b.numel() > 1 else b.reshape(())
                )
            outs.append(select_logits(forward_fn(ref, batch), output_key, rows))
    return torch.stack(outs)


def _set_coefficients(layers: Mapping[str, _FitNorm], values: Mapping[str, tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for name, layer in layers.items():
            a, b = values[name]
            layer.alpha.copy_(a)
            layer.beta.copy_(b)


#: The per-layer fit's loss: ``loss(logits, y)`` with the logits of j coefficient sets, (j, m, classes) or
#: (j, m, K, H, W), and the labels of the m examples, (m,) or (m, H, W); returns the summed loss per set
#: (j,) and the number of terms summed (0-d; examples or labelled pixels). The fit minimises sum / count
#: per mini-batch and scores the monitor slice by its total sum / total count. Log-softmax in the logits'
#: dtype (the fit passes float32 for its steps, float64 for the monitor).
FitLoss = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def classification_loss(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """:data:`FitLoss` of classification: cross-entropy summed over the m examples, and m."""
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, y.reshape(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(-1)
    return nll.sum(1), torch.tensor(y.shape[0], device=logits.device)


@dataclass(frozen=True)
class PixelLoss:
    """:data:`FitLoss` of segmentation: per-pixel cross-entropy summed over the labelled pixels (mask value
    not ``ignore_index``) of the m masks, and their number."""

    ignore_index: int = 255

    def __call__(self, logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        valid = y != self.ignore_index  # (m, H, W)
        target = torch.where(valid, y, torch.zeros_like(y))
        logp = torch.log_softmax(logits, dim=2)  # (j, m, K, H, W)
        j = logits.shape[0]
        picked = logp.gather(2, target[None, :, None].expand(j, -1, 1, -1, -1)).squeeze(2)  # (j, m, H, W)
        nll = -torch.where(valid[None], picked, torch.zeros_like(picked))
        return nll.flatten(1).sum(1), valid.sum()


def fit_per_layer(
    model: nn.Module,
    fit_batches: Iterable[Batch],
    monitor_batches: Iterable[Batch],
    *,
    init_alpha: float = 0.0,
    init_beta: float | None = None,
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    nll_scale: float = 1.0,
    per_channel: bool = False,
    lr: float = DEFAULT_LR,
    max_epochs: int = DEFAULT_MAX_EPOCHS,
    patience: int = DEFAULT_PATIENCE,
    seed: int = 0,
    device: str | torch.device | None = "cpu",
    forward_fn: ForwardFn | None = None,
    output_key: str | int | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    stack: bool = True,
    progress: Progress | None = None,
    loss_fn: FitLoss = classification_loss,
) -> FitResult:
    """Fit every correctable BN layer's (alpha, beta) to the cross-entropy on labelled ``fit_batches``
    (``(x, y)``, re-iterable), one coefficient set per L1 strength of ``strengths``, all started from
    ``init_alpha``/``init_beta`` (default: beta = alpha), stopped early on ``monitor_batches`` (module
    docstring). ``nll_scale`` multiplies the strengths (``tune`` passes the EMA NLL). ``stack=False``
    evaluates one strength per forward (the reference for the stacked fit). ``loss_fn`` (:data:`FitLoss`):
    the cross-entropy of class labels (default) or :class:`PixelLoss` for segmentation masks (then the
    monitor NLLs are pixel-NLLs). ``model`` is not modified.
    """
    strengths = check_strengths(strengths)
    for label, v in (("max_epochs", max_epochs), ("patience", patience)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if label == "max_epochs" else 1):
            raise UsageError(
                f"{spell(label, v)} must be a whole number >= {0 if label == 'max_epochs' else 1}"
            )
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise UsageError(f"{spell('lr', lr)}: the learning rate must be a positive number")
    beta0 = init_alpha if init_beta is None else init_beta
    for label, v in (("init_alpha", init_alpha), ("init_beta", beta0)):
        if not 0.0 <= float(v) <= 1.0:
            raise UsageError(f"{spell(label, v)} must lie in [0, 1]")
    dev = resolve_device(device)
    fwd = forward_fn or default_forward
    k = len(strengths)
    work = copy.deepcopy(model).to(dev).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    layers = _make_layers(work, k, per_channel, float(init_alpha), float(beta0))
    notes: list[str] = []

    half = max(1, cache_bytes // 2)
    fit_src = _Source(fit_batches, dev, half)
    mon_src = _Source(monitor_batches, dev, half)
    cached = fit_src.cached is not None and mon_src.cached is not None
    first = next(iter(fit_src), None)
    if first is None:
        raise DataError("the fitting part holds no examples", hint="give more labelled data")
    n_fit = sum(batch_size_of(b) for b in fit_src)
    n_mon = sum(batch_size_of(b) for b in mon_src)

    # The probe: K random coefficient sets, the fitting network against corrected copies of the model.
    gen = torch.Generator().manual_seed(int(seed) + 7)
    probe_rows = min(PROBE_EXAMPLES, batch_size_of(first))
    probe = map_batch(
        first, lambda t: t[:probe_rows] if t.dim() and t.shape[0] == batch_size_of(first) else t
    )
    trial = [
        (
            {n: 0.05 + 0.45 * torch.rand(ly.alpha.shape[1], generator=gen) for n, ly in layers.items()},
            {n: 0.05 + 0.45 * torch.rand(ly.beta.shape[1], generator=gen) for n, ly in layers.items()},
        )
        for _ in range(k)
    ]
    reference = _reference_logits(model, trial, probe, fwd, output_key, dev)
    tol = 1e-3 * max(1.0, float(reference.abs().max()))
    init = {n: (ly.alpha.detach().clone(), ly.beta.detach().clone()) for n, ly in layers.items()}
    trial_values = {
        n: (
            torch.stack([t[0][n] for t in trial]).to(ly.alpha),
            torch.stack([t[1][n] for t in trial]).to(ly.beta),
        )
        for n, ly in layers.items()
    }
    split = _split_prefix(work) if forward_fn is None and cached else None
    # (name, cut the prefix, run mode), the fastest first
    configs: list[tuple[str, bool, str]] = []
    if stack and k > 1:
        if split is not None:
            configs.append(("prefix", True, "shared"))
        configs += [("shared", False, "shared"), ("repeat", False, "repeat")]
    if split is not None:
        configs.append(("prefix-single", True, "single"))
    configs.append(("single", False, "single"))
    runner: _Runner | None = None
    chosen_mode = ""
    _set_coefficients(layers, trial_values)
    for mode, use_prefix, run_mode in configs:
        if use_prefix and split is not None:
            prefix, rest = split
            net: nn.Module = rest
            with torch.no_grad():
                probe_in: Batch = (prefix(probe[0]), *probe[1:])
        else:
            net, probe_in = work, probe
        candidate = _Runner(net, layers, k, run_mode, fwd if not use_prefix else default_forward, output_key)
        try:
            with torch.no_grad():
                got = candidate(probe_in)
        except Exception as exc:  # anything the stacked pass trips over: not this way
            notes.append(f"{mode} not used: {type(exc).__name__}: {str(exc)[:160]}")
            continue
        if got.shape == reference.shape and bool(
            torch.allclose(got.float(), reference.float(), rtol=1e-3, atol=tol, equal_nan=True)
        ):
            runner, chosen_mode = candidate, mode
            break
        notes.append(f"{mode} not used: its outputs differ from separately corrected copies of the model")
    if runner is None:
        raise UsageError(
            "the per-layer fit cannot reproduce the corrected model's outputs (the model treats the examples "
            "of a batch together, or its BN layers are called in a way the fit does not follow)",
            hint="use sweep-alpha (one global alpha) or estimate (EvalNorm per layer) for this model",
        )
    _set_coefficients(layers, init)
    cache_text = "streamed from the loader every epoch"
    if chosen_mode.startswith("prefix") and split is not None:
        prefix = split[0]
        with torch.no_grad():
            assert fit_src.cached is not None and mon_src.cached is not None
            fit_src.cached = [(prefix(b[0]), *b[1:]) for b in fit_src.cached]
            mon_src.cached = [(prefix(b[0]), *b[1:]) for b in mon_src.cached]
        size = sum(_batch_bytes(b) for b in fit_src.cached + mon_src.cached)
        cache_text = f"outputs of the network before the first BN layer in memory ({size / 2**20:.1f} MiB)"
    elif cached:
        cache_text = f"examples in memory ({(fit_src.bytes + mon_src.bytes) / 2**20:.1f} MiB)"
    describe = {
        "prefix": "stacked, prefix before the first BN layer cached",
        "shared": "stacked (the first BN layer fans the batch out)",
        "repeat": "stacked (the batch repeated per strength)",
        "prefix-single": "one strength per forward, prefix before the first BN layer cached",
        "single": "one strength per forward",
    }[chosen_mode]

    lam = torch.tensor(strengths, dtype=torch.float64, device=dev) * float(nll_scale)
    params = [t for ly in layers.values() for t in (ly.alpha, ly.beta)]
    opt = _Adam(params)
    batches_per_epoch = len(fit_src.cached) if fit_src.cached is not None else None

    def monitor(sets: Sequence[int] | None = None) -> Tensor:
        """Monitor NLL of the coefficient sets ``sets`` (default all K), in that order."""
        runner.use(sets)
        j = len(runner.sets)
        total = torch.zeros(j, dtype=torch.float64, device=dev)
        terms = 0
        with torch.inference_mode():
            for batch in mon_src:
                m = batch_size_of(batch)
                sums, count = loss_fn(runner(batch).double(), _labels(batch, m).to(dev))
                total += sums
                terms += int(count)
        return (total / max(1, terms)).cpu()

    def snapshot() -> dict[str, tuple[Tensor, Tensor]]:
        return {n: (ly.alpha.detach().clone(), ly.beta.detach().clone()) for n, ly in layers.items()}

    # every set starts from the same coefficients: one set's monitor NLL is every set's
    start = monitor([0]).expand(k).clone()
    best_nll = start.clone()
    best_epoch = [0] * k
    best = [{n: (a[i].clone(), b[i].clone()) for n, (a, b) in snapshot().items()} for i in range(k)]
    since = [0] * k
    history: list[list[float | None]] = [[float(v) for v in start]]
    steps = epochs = 0
    total_steps = max(1, max_epochs * (batches_per_epoch or 1))
    order_gen = torch.Generator().manual_seed(int(seed) + 11)
    skipped = 0
    with torch.enable_grad():
        for epoch in range(1, max_epochs + 1):
            # a set stops (its best snapshot is final) after `patience` epochs without improvement, and
            # leaves the stack: the sets still running are fitted exactly as before, on fewer rows
            active = [i for i in range(k) if since[i] < patience]
            if not active:
                break
            runner.use(active)
            index = torch.tensor(active, dtype=torch.long, device=dev)
            # the L1 term's gradient, added to autograd's of the NLL: d/d alpha_ip of lambda_i * mean_p
            # alpha_ip is lambda_i / P for the sets still running (and 0 for the others), a constant
            pull = torch.zeros(k, 1, dtype=torch.float64, device=dev)
            pull[index] = lam.index_select(0, index)[:, None]
            pulls = [(pull / t.shape[1]).to(t.dtype) for t in params]
            epochs = epoch
            if fit_src.cached is not None:
                order = torch.randperm(len(fit_src.cached), generator=order_gen).tolist()
                stream: Iterable[Batch] = (fit_src.cached[i] for i in order)
            else:
                stream = fit_src
            for batch in stream:
                m = batch_size_of(batch)
                y = _labels(batch, m).to(dev)
                sums, count = loss_fn(runner(batch).float(), y)
                nll = sums / count.clamp(min=1)
                loss = nll.sum()  # + sum_i lambda_i * s * sum_layers mean (alpha_i + beta_i): see `pulls`
                if not bool(torch.isfinite(loss)):
                    skipped += 1
                    continue
                grads = list(torch.autograd.grad(loss, params))
                torch._foreach_add_(grads, pulls)
                rate = float(lr) * 0.5 * (1.0 + math.cos(math.pi * min(steps, total_steps) / total_steps))
                opt.step(grads, rate)  # then the projection onto [0, 1]
                steps += 1
            scores = torch.full((k,), math.inf, dtype=torch.float64)
            scores[index.cpu()] = monitor(active)
            history.append([float(scores[i]) if i in active else None for i in range(k)])
            for i in active:
                if bool(scores[i] < best_nll[i] - 1e-9):
                    best_nll[i], best_epoch[i], since[i] = scores[i], epoch, 0
                    best[i] = {n: (a[i].clone(), b[i].clone()) for n, (a, b) in snapshot().items()}
                else:
                    since[i] += 1
            if progress is not None:
                progress("tune: per-layer fit", epoch * n_fit, max_epochs * n_fit)
    if progress is not None:  # stopped early: the bar ends where the fit did
        progress("tune: per-layer fit", epochs * n_fit, epochs * n_fit)
    if skipped:
        notes.append(f"{skipped} optimisation steps skipped: the loss was NaN/Inf")
    # the kept snapshots, snapped, into the layers; the monitor NLL of what is returned: the kept one
    # (measured on exactly these coefficients), measured again only for the sets the snapping changed
    snapped: set[int] = set()
    with torch.no_grad():
        for name, ly in layers.items():
            for i in range(k):
                a, b = best[i][name]
                a2 = torch.where(a < ZERO_SNAP, torch.zeros_like(a), a)
                b2 = torch.where(b < ZERO_SNAP, torch.zeros_like(b), b)
                if not (torch.equal(a2, a) and torch.equal(b2, b)):
                    snapped.add(i)
                ly.alpha[i] = a2
                ly.beta[i] = b2
    final = best_nll.clone()
    if snapped:
        again = sorted(snapped)
        final[again] = monitor(again)
    fits = []
    for i, s in enumerate(strengths):
        alpha = {n: _shape(ly.alpha[i], per_channel) for n, ly in layers.items()}
        beta = {n: _shape(ly.beta[i], per_channel) for n, ly in layers.items()}
        zero = [n for n in layers if not bool(alpha[n].any()) and not bool(beta[n].any())]
        fits.append(StrengthFit(s, alpha, beta, float(final[i]), float(start[i]), best_epoch[i], zero))
    # lowest monitor NLL; exact ties go to the stronger pull (the sparser fit)
    chosen = min(range(k), key=lambda i: (fits[i].monitor_nll, -strengths[i]))
    return FitResult(fits, chosen, describe, cache_text, epochs, steps, n_fit, n_mon, notes, history)


class _Adam:
    """Adam (Kingma & Ba) on a few leaf tensors, each step followed by the projection onto [0, 1]. Written
    out because ``torch.optim`` imports ``torch._dynamo`` on first use (5-6 s on a small host, more than a
    whole fit of a small model)."""

    def __init__(self, params: list[Tensor], b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> None:
        self.params = params
        self.b1, self.b2, self.eps = b1, b2, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads: Sequence[Tensor], lr: float) -> None:
        """One step on every tensor, as ``torch._foreach_*`` calls over the list (the same arithmetic, per
        element, as one tensor at a time; a few dispatches per step instead of nine per tensor)."""
        self.t += 1
        c1 = 1.0 - self.b1**self.t
        c2 = 1.0 - self.b2**self.t
        grads = list(grads)
        with torch.no_grad():
            torch._foreach_mul_(self.m, self.b1)
            torch._foreach_add_(self.m, grads, alpha=1.0 - self.b1)
            torch._foreach_mul_(self.v, self.b2)
            torch._foreach_addcmul_(self.v, grads, grads, value=1.0 - self.b2)
            denom = torch._foreach_div(self.v, c2)
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, self.eps)
            torch._foreach_addcdiv_(self.params, self.m, denom, value=-lr / c1)
            torch._foreach_clamp_min_(self.params, 0.0)
            torch._foreach_clamp_max_(self.params, 1.0)


def _shape(t: Tensor, per_channel: bool) -> Tensor:
    t = t.detach().cpu().clone()
    return t if per_channel else t.reshape(())


# ---------------------------------------------------------------------------------------------- result
@dataclass
class TuneRow:
    """One candidate: its metrics on the fitting part (``fit``: nll, top1, top5; segmentation: pixel-nll,
    miou, pixel-acc) and its held-out row (a :class:`~bncorrect.sweep.SweepRow`)."""

    label: str
    kind: str
    fit: dict[str, float]
    heldout: SweepRow
    candidate: Candidate = field(repr=False)

    @property
    def alpha(self) -> float | None:
        return self.candidate.alpha_value

    @property
    def beta(self) -> float | None:
        return self.candidate.beta_value

    @property
    def finite(self) -> bool:
        return bool(self.heldout.finite)

    def value(self, metric: str, part: str = "heldout") -> float:
        if part == "fit":
            return float(self.fit.get(metric, math.nan))
        return self.heldout.value(metric)

    @property
    def recalibrated(self) -> bool:
        """Whether the candidate replaces the running statistics (EvalNorm after recalibration)."""
        return self.candidate.running_stats is not None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly. Segmentation rows keep nll (= pixel-nll) and top1 (= pixel accuracy) and add
        pixel_nll, pixel_acc, miou, miou_diff_vs_ema, iou_per_class and n_pixels to ``heldout``."""
        h = self.heldout
        extra = h.segmentation_fields()
        return _jsonable(
            {
                "label": self.label,
                "kind": self.kind,
                "alpha": self.alpha,
                "beta": self.beta,
                "recalibrated": self.recalibrated,
                "fit": dict(self.fit),
                "heldout": {
                    "nll": h.nll,
                    "top1": h.top1,
                    "top5": h.top5,
                    "n": h.n,
                    "nll_se": h.nll_se,
                    "top1_ci95": list(h.top1_ci95),
                    "nll_diff_vs_ema": h.nll_diff,
                    "nll_diff_vs_ema_ci95": list(h.nll_diff_ci95),
                    "top1_diff_vs_ema": h.top1_diff,
                    "top1_diff_vs_ema_ci95": list(h.top1_diff_ci95),
                    **extra,
                },
                "finite": self.finite,
            }
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _coef(v: Any) -> float | list[float]:
    t = torch.as_tensor(v).detach().cpu()
    return float(t) if t.numel() == 1 else [float(x) for x in t.reshape(-1)]


@dataclass
class TuneResult:
    """Everything ``tune`` measured and chose. ``rows`` (EMA, rule, best global alpha, EvalNorm offline,
    EvalNorm offline after recalibration unless it was left out, tuned per layer) carry fitting-part and
    held-out numbers; ``chosen`` is the row written. ``task`` is "classification" or "segmentation" (then
    the metrics are pixel-nll, miou and pixel-acc over the pixels whose mask value is not
    ``ignore_index``)."""

    metric: str
    train_batch_size: int
    seed: int
    holdout: float
    monitor: float
    n_examples: int
    n_fit: int
    n_monitor: int
    n_heldout: int
    rows: list[TuneRow]
    chosen: TuneRow
    layers: list[str]
    fit: FitResult
    global_alpha: float
    global_beta: float
    per_channel: bool
    recalibrated: str | None
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    #: indices into the data of the fitting part (its monitor slice included) and of the held-out part
    fit_indices: list[int] = field(default_factory=list, repr=False)
    heldout_indices: list[int] = field(default_factory=list, repr=False)
    monitor_indices: list[int] = field(default_factory=list, repr=False)
    estimate: EstimateResult | None = field(default=None, repr=False)
    recalibration: RecalibrateResult | None = field(default=None, repr=False)
    fit_sweep: SweepResult | None = field(default=None, repr=False)
    heldout_sweep: SweepResult | None = field(default=None, repr=False)
    task: str = "classification"
    ignore_index: int | None = None
    #: the estimate on the recalibrated statistics (the "evalnorm-recal" candidate's), when it ran
    estimate_recalibrated: EstimateResult | None = field(default=None, repr=False)

    def row(self, kind: str) -> TuneRow:
        return next(r for r in self.rows if r.kind == kind)

    def has(self, kind: str) -> bool:
        """Whether a candidate of ``kind`` was scored (``evalnorm-recal`` is left out with
        ``recalibrate=False``)."""
        return any(r.kind == kind for r in self.rows)

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics of this task: nll, top1, top5, or pixel-nll, miou, pixel-acc."""
        from .sweep import METRICS, SEGMENTATION_METRICS

        return SEGMENTATION_METRICS if self.task == "segmentation" else METRICS

    @property
    def ema(self) -> TuneRow:
        return self.row("ema")

    @property
    def tuned(self) -> TuneRow:
        return self.row("tuned")

    @property
    def zero_layers(self) -> list[str]:
        """Layers of the tuned candidate at alpha = beta = 0 (plain, foldable BN)."""
        return list(self.fit.best.zero_layers)

    def coefficients(self, kind: str | None = None) -> dict[str, tuple[Tensor, Tensor]]:
        """Per-layer (alpha, beta) of a candidate (default: the chosen one)."""
        cand = (self.chosen if kind is None else self.row(kind)).candidate
        out = {}
        for name in self.layers:
            a = cand.alpha.get(name, 0.0) if isinstance(cand.alpha, Mapping) else cand.alpha
            b_src = cand.alpha if cand.beta is None else cand.beta
            b = b_src.get(name, a) if isinstance(b_src, Mapping) else b_src
            out[name] = (
                torch.as_tensor(a, dtype=torch.float32).clone(),
                torch.as_tensor(b, dtype=torch.float32).clone(),
            )
        return out

    def running_stats(self, kind: str | None = None) -> Mapping[str, tuple[Tensor, Tensor]] | None:
        """A candidate's replacement statistics (default: the chosen one's): the recalibrated ones of
        EvalNorm after recalibration (``evalnorm-recal``), None for every other candidate."""
        return (self.chosen if kind is None else self.row(kind)).candidate.running_stats

    def layer_rows(self) -> list[dict[str, Any]]:
        chosen = self.coefficients()
        tuned = self.coefficients("tuned")
        evalnorm = self.coefficients("evalnorm")
        recal = self.coefficients("evalnorm-recal") if self.has("evalnorm-recal") else None
        zero = set(self.zero_layers)
        return [
            {
                "name": n,
                "alpha": _coef(tuned[n][0]),
                "beta": _coef(tuned[n][1]),
                "plain": n in zero,
                "evalnorm_alpha": _coef(evalnorm[n][0]),
                "evalnorm_beta": _coef(evalnorm[n][1]),
                **(
                    {}
                    if recal is None
                    else {
                        "evalnorm_recal_alpha": _coef(recal[n][0]),
                        "evalnorm_recal_beta": _coef(recal[n][1]),
                    }
                ),
                "chosen_alpha": _coef(chosen[n][0]),
                "chosen_beta": _coef(chosen[n][1]),
            }
            for n in self.layers
        ]

    def as_report(self) -> dict[str, Any]:
        """The JSON report: metric, split sizes, rows (fit and held-out numbers), chosen, per-layer alpha/beta
        of the tuned candidate beside EvalNorm's (``layers``), the strength path, zero layers, notes;
        ``task``, and for segmentation ``ignore_index``, ``n_pixels`` (held-out) and ``miou_convention``."""
        from .sweep import MIOU_CONVENTION

        fit = self.fit
        extra: dict[str, Any] = {}
        if self.task == "segmentation":
            extra = {
                "ignore_index": self.ignore_index,
                "n_pixels": self.ema.heldout.n_pixels,
                "miou_convention": MIOU_CONVENTION,
            }
        return _jsonable(
            {
                "metric": self.metric,
                "train_batch_size": self.train_batch_size,
                "seed": self.seed,
                "holdout": self.holdout,
                "monitor": self.monitor,
                "n_examples": self.n_examples,
                "n_fit": self.n_fit,
                "n_monitor": self.n_monitor,
                "n_heldout": self.n_heldout,
                "chosen": self.chosen.as_dict(),
                "rows": [r.as_dict() for r in self.rows],
                "layers": self.layer_rows(),
                "global_alpha": self.global_alpha,
                "global_beta": self.global_beta,
                "per_channel": self.per_channel,
                "recalibrated": self.recalibrated,
                "strength": fit.best.strength,
                "strengths": [f.as_dict() for f in fit.fits],
                "n_zero_layers": len(self.zero_layers),
                "zero_layers": self.zero_layers,
                "fit": {
                    "mode": fit.mode,
                    "cache": fit.cache,
                    "epochs": fit.epochs,
                    "steps": fit.steps,
                    "examples": fit.examples,
                    "monitor_examples": fit.monitor_examples,
                    "notes": list(fit.notes),
                },
                "notes": list(self.notes),
                "timings": dict(self.timings),
                "task": self.task,
                **extra,
            }
        )

    def table(self) -> Table:
        """A ``rich`` table of the candidates: fitting-part and held-out numbers, the chosen row marked."""
        from rich.table import Table

        if self.task == "segmentation":
            return self._segmentation_table()
        k = self.heldout_sweep.top_k if self.heldout_sweep is not None else 5
        table = Table(
            title=f"tune: chosen by held-out {self.metric} ({self.n_fit} fitting, {self.n_heldout} held-out "
            f"examples, seed {self.seed})",
            caption="fit: the fitting part (the per-layer fit learned from it and its monitor slice). "
            "held-out: never seen by any fit. Δ: paired difference from EMA on the held-out part, ± its 95% "
            "interval.",
        )
        for col in ("", "candidate", "fit nll", "fit top1 %", "held-out nll", "Δnll", "held-out top1 %",
                    f"held-out top{k} %"):  # fmt: skip
            table.add_column(col, justify="left" if col in ("", "candidate") else "right")
        for row in self.rows:
            h = row.heldout
            half = (h.nll_diff_ci95[1] - h.nll_diff_ci95[0]) / 2
            table.add_row(
                "◀" if row is self.chosen else "",
                row.label,
                f"{row.fit.get('nll', math.nan):.4f}",
                f"{100 * row.fit.get('top1', math.nan):.2f}",
                f"{h.nll:.4f}",
                "" if row.kind == "ema" else f"{h.nll_diff:+.4f} ±{half:.4f}",
                f"{100 * h.top1:.2f}",
                f"{100 * h.top5:.2f}",
                style="green" if row is self.chosen else None,
            )
        return table

    def _segmentation_table(self) -> Table:
        from rich.table import Table

        table = Table(
            title=f"tune: chosen by held-out {self.metric} ({self.n_fit} fitting, {self.n_heldout} held-out "
            f"images, seed {self.seed})",
            caption="fit: the fitting part (the per-layer fit learned from it and its monitor slice). "
            f"held-out: never seen by any fit. Pixels with mask value {self.ignore_index} are ignored. Δ: "
            "difference from EMA on the held-out part (no intervals: the pixels of an image are not "
            "independent).",
        )
        for col in ("", "candidate", "fit pixel-nll", "fit mIoU %", "held-out pixel-nll", "Δpixel-nll",
                    "held-out mIoU %", "ΔmIoU %", "held-out pixel acc %"):  # fmt: skip
            table.add_column(col, justify="left" if col in ("", "candidate") else "right")
        for row in self.rows:
            h = row.heldout
            is_ema = row.kind == "ema"
            table.add_row(
                "◀" if row is self.chosen else "",
                row.label,
                f"{row.value('pixel-nll', 'fit'):.4f}",
                f"{100 * row.value('miou', 'fit'):.2f}",
                f"{h.value('pixel-nll'):.4f}",
                "" if is_ema else f"{h.nll_diff:+.4f}",
                f"{100 * h.value('miou'):.2f}",
                "" if is_ema else f"{100 * (h.miou_diff or 0.0):+.2f}",
                f"{100 * h.value('pixel-acc'):.2f}",
                style="green" if row is self.chosen else None,
            )
        return table

    def summary(self) -> str:
        """One line: the chosen candidate's held-out numbers beside EMA's."""
        c, e = self.chosen.heldout, self.ema.heldout
        if self.task == "segmentation":
            return (
                f"{self.chosen.label} (held-out pixel-nll {c.value('pixel-nll'):.4f}, mIoU "
                f"{100 * c.value('miou'):.2f}%, pixel acc {100 * c.value('pixel-acc'):.2f}%; EMA "
                f"{e.value('pixel-nll'):.4f}, {100 * e.value('miou'):.2f}%, "
                f"{100 * e.value('pixel-acc'):.2f}%)"
            )
        return (
            f"{self.chosen.label} (held-out nll {c.nll:.4f}, top-1 {100 * c.top1:.2f}%; EMA {e.nll:.4f}, "
            f"{100 * e.top1:.2f}%)"
        )

    def layer_table(self) -> Table:
        """Per-layer alpha/beta of the tuned candidate beside EvalNorm's."""
        from rich.table import Table

        table = Table(title=f"per-layer coefficients (tuned: L1 strength {self.fit.best.strength:g})")
        recal = self.has("evalnorm-recal")
        cols = ["layer", "tuned alpha", "tuned beta", "EvalNorm alpha", "EvalNorm beta"]
        if recal:
            cols += ["EvalNorm recal. alpha", "EvalNorm recal. beta"]
        for col in cols:
            table.add_column(col, justify="left" if col == "layer" else "right")

        def fmt(v: float | list[float]) -> str:
            if isinstance(v, list):
                return f"mean {sum(v) / len(v):.4f}"
            return f"{v:.4f}"

        for ly in self.layer_rows():
            table.add_row(
                ly["name"] + (" (plain)" if ly["plain"] else ""),
                fmt(ly["alpha"]),
                fmt(ly["beta"]),
                fmt(ly["evalnorm_alpha"]),
                fmt(ly["evalnorm_beta"]),
                *((fmt(ly["evalnorm_recal_alpha"]), fmt(ly["evalnorm_recal_beta"])) if recal else ()),
            )
        return table


def write_tune_report(result: TuneResult, path: str | Path) -> Path:
    """Write :meth:`TuneResult.as_report` as JSON to ``path``, atomically."""
    from .atomic import write_json

    return write_json(result.as_report(), path)


def plot_tune(
    result: TuneResult, path: str | Path, *, size: tuple[float, float] = (9.0, 6.0), dpi: int = 100
) -> Path:
    """Per-layer alpha (top) and beta (bottom) bars of the chosen candidate beside EvalNorm offline's, with
    and without recalibration (and the tuned one's when another candidate was chosen), like EvalNorm's
    Figure 3; per-channel coefficients
    as their mean with the range as an error bar. A PNG, headless (Agg), written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .atomic import atomic_path, check_output

    path = check_output(path)
    fig = Figure(figsize=size, dpi=int(dpi))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 1, sharex=True)
    series = [(f"chosen: {result.chosen.label}", result.coefficients(), "C3")]
    if result.chosen.kind != "tuned":
        series.append((result.tuned.label, result.coefficients("tuned"), "C0"))
    if result.chosen.kind != "evalnorm":
        series.append(("EvalNorm offline", result.coefficients("evalnorm"), "C2"))
    if result.chosen.kind != "evalnorm-recal" and result.has("evalnorm-recal"):
        recal = result.row("evalnorm-recal")
        series.append((recal.label, result.coefficients("evalnorm-recal"), "C1"))
    n = len(result.layers)
    width = 0.8 / len(series)
    xs = list(range(n))
    for row, (ax, which) in enumerate(zip(axes, ("alpha", "beta"), strict=True)):
        for j, (label, coeffs, color) in enumerate(series):
            vals = [coeffs[name][row].float() for name in result.layers]
            mean = [float(v.mean()) for v in vals]
            lo = [m - float(v.min()) for m, v in zip(mean, vals, strict=True)]
            hi = [float(v.max()) - m for m, v in zip(mean, vals, strict=True)]
            err = [lo, hi] if any(v.numel() > 1 for v in vals) else None
            ax.bar([x + (j - (len(series) - 1) / 2) * width for x in xs], mean, width, yerr=err, color=color,
                   label=label, capsize=2)  # fmt: skip
        ax.set_ylabel(which)
        ax.set_ylim(
            0, 1.05 * max(0.05, *(float(c[n][row].max()) for _, c, _ in series for n in result.layers))
        )
        ax.grid(True, axis="y", alpha=0.3)
    axes[-1].set_xticks(xs)
    axes[-1].set_xticklabels(result.layers, rotation=45, ha="right", fontsize=7)
    axes[0].legend(fontsize=8, frameon=False)
    h, e = result.chosen.heldout, result.ema.heldout
    numbers = (
        f"pixel-nll {h.nll:.4f}, mIoU {100 * h.value('miou'):.1f}%; EMA pixel-nll {e.nll:.4f}, mIoU "
        f"{100 * e.value('miou'):.1f}%"
        if result.task == "segmentation"
        else f"nll {h.nll:.4f}, top-1 {100 * h.top1:.1f}%; EMA nll {e.nll:.4f}"
    )
    fig.suptitle(
        f"tune (B = {result.train_batch_size}): chosen {result.chosen.label} by held-out {result.metric} "
        f"({numbers})",
        fontsize=9,
    )
    fig.subplots_adjust(left=0.09, right=0.98, top=0.92, bottom=0.22)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=int(dpi))
    return path


# ---------------------------------------------------------------------------------------------- tune
def _choice_key(row: TuneRow, metric: str) -> tuple[float, ...]:
    h = row.heldout
    if metric == "top1":
        primary: tuple[float, ...] = (-h.top1, h.nll, -h.top5)
    elif metric == "top5":
        primary = (-h.top5, h.nll, -h.top1)
    elif metric in ("pixel-nll", "miou", "pixel-acc"):
        nll, miou, acc = h.value("pixel-nll"), h.value("miou"), h.value("pixel-acc")
        primary = {
            "pixel-nll": (nll, -miou, -acc),
            "miou": (-miou, nll, -acc),
            "pixel-acc": (-acc, nll, -miou),
        }[metric]
    else:
        primary = (h.nll, -h.top1, -h.top5)
    return (*primary, KINDS.index(row.kind))


def _better(a: float, b: float, metric: str) -> bool:
    """Whether ``a`` is better than ``b`` by ``metric`` (the NLLs: lower; accuracies and mIoU: higher)."""
    return a < b if metric in ("nll", "pixel-nll") else a > b


def _evaluate_candidate(
    model: nn.Module,
    alpha: Mapping[str, Tensor],
    beta: Mapping[str, Tensor],
    batches: Iterable[Batch],
    device: torch.device,
    forward_fn: ForwardFn | None,
    output_key: str | int | None,
    top_k: int,
    dense: _Dense | None = None,
) -> dict[str, float]:
    """nll, top1, top5 of one per-layer candidate on ``batches`` (a corrected copy, one forward a batch);
    with ``dense`` (segmentation) pixel-nll, miou and pixel-acc, each batch evaluated in pieces of at most
    :data:`bncorrect.sweep.DENSE_PIECE_BYTES` of logits. Under a process group the ranks' sums are merged
    (:func:`merge_score_sums`, :func:`bncorrect.sweep.merge_segmentation_tallies`)."""
    from . import distributed
    from .sweep import select_logits

    work = correct_model(copy.deepcopy(model), alpha, beta).to(device).eval()
    fwd = forward_fn or default_forward
    if dense is not None:
        return _evaluate_dense(work, batches, device, fwd, output_key, dense)

    def score() -> Tensor:
        sums = torch.zeros(4, dtype=torch.float64)  # summed nll, top-1 hits, top-k hits, examples
        with torch.no_grad():
            for batch in batches:
                batch = map_batch(batch, lambda t: t.to(device))
                m = batch_size_of(batch)
                y = _labels(batch, m).to(device)
                logits = select_logits(fwd(work, batch), output_key, m)
                logp = torch.log_softmax(logits.double(), -1)
                k = min(top_k, logits.shape[-1])
                sums += torch.tensor([
                    -float(logp.gather(-1, y[:, None]).sum()),
                    float((logits.argmax(-1) == y).sum()),
                    float((logits.topk(k, -1).indices == y[:, None]).any(-1).sum()),
                    m,
                ], dtype=torch.float64)  # fmt: skip
        return sums

    nll, top1, topk, n = merge_score_sums(distributed.all_gather(distributed.guarded(score))).tolist()
    return {"nll": nll / max(1, n), "top1": top1 / max(1, n), "top5": topk / max(1, n)}


@dataclass(frozen=True)
class _Dense:
    """What tune knows of a segmentation task before its passes: classes, ignore index, mask size."""

    num_classes: int
    ignore_index: int
    mask_shape: tuple[int, int]

    def rows(self, candidates: int, budget: int, cap: int) -> int:
        """Examples per piece so that ``candidates`` sets of float32 per-pixel logits fit ``budget`` bytes
        (at least 1, at most ``cap``)."""
        per_example = max(1, candidates * self.num_classes * self.mask_shape[0] * self.mask_shape[1] * 4)
        return max(1, min(cap, budget // per_example))


def _evaluate_dense(
    work: nn.Module,
    batches: Iterable[Batch],
    device: torch.device,
    fwd: ForwardFn,
    output_key: str | int | None,
    dense: _Dense,
) -> dict[str, float]:
    from . import distributed
    from .sweep import (
        DENSE_PIECE_BYTES,
        Candidate,
        SegmentationTally,
        merge_segmentation_tallies,
        segmentation_rows,
        select_logits,
    )

    piece = dense.rows(1, DENSE_PIECE_BYTES, 1 << 30)

    def score() -> SegmentationTally:
        tally = SegmentationTally(1, dense.num_classes, dense.ignore_index, "", output_key)
        with torch.no_grad():
            for batch in batches:
                batch = map_batch(batch, lambda t: t.to(device))
                rows = batch_size_of(batch)
                y = _labels(batch, rows).to(device)
                for start in range(0, rows, piece):
                    stop = min(rows, start + piece)
                    part = _rows_of(batch, rows, start, stop)
                    logits = select_logits(fwd(work, part), output_key, stop - start)
                    tally.add_candidate(0, logits, y[start:stop])
                    tally.add_examples(y[start:stop])
        for name, value in vars(tally).items():
            if isinstance(value, Tensor):
                setattr(tally, name, value.cpu())
        return tally

    merged = merge_segmentation_tallies(distributed.all_gather(distributed.guarded(score)))
    if merged.pixels == 0:
        return {"pixel-nll": math.nan, "miou": math.nan, "pixel-acc": math.nan}
    row = segmentation_rows([Candidate("tuned")], merged)[0]
    return {m: row.value(m) for m in ("pixel-nll", "miou", "pixel-acc")}


def _rows_of(batch: Batch, rows: int, start: int, stop: int) -> Batch:
    return map_batch(batch, lambda t: t[start:stop] if t.dim() and t.shape[0] == rows else t)


def merge_score_sums(parts: Sequence[Tensor]) -> Tensor:
    """The score sums (summed nll, top-1 hits, top-k hits, examples: float64 (4,)) of one candidate on the
    union of disjoint parts of the data (e.g. one per rank): their sum (exact for the counts). Segmentation
    scores merge as :func:`bncorrect.sweep.merge_segmentation_tallies` (pixel cross-entropy sums and
    confusion matrices)."""
    out = torch.zeros(4, dtype=torch.float64)
    for part in parts:
        out += part.to(torch.float64).cpu()
    return out


def _fit_numbers(row: SweepRow) -> dict[str, float]:
    if row.task == "segmentation":
        return {m: row.value(m) for m in ("pixel-nll", "miou", "pixel-acc")}
    return {"nll": row.nll, "top1": row.top1, "top5": row.top5}


def _check_scores(
    model: nn.Module,
    part: _Part,
    forward_fn: ForwardFn | None,
    output_key: str | int | None,
    device: Any,
) -> tuple[str, tuple[int, ...]]:
    """Before any pass: the model's output on two examples has to hold class scores (N, classes) for class
    labels, or per-pixel logits (N, K, H, W) at the masks' size for masks; object detections, an ambiguous
    dict or a wrong ``output_key`` are refused here rather than after the passes. Returns the task and the
    output's shape."""
    from .passes import run_forward
    from .sweep import output_task, select_logits

    batch = next(iter(_part_loader(part, 2, shuffle=False, seed=0, num_workers=0, shard=False)))
    work = copy.deepcopy(model).to(resolve_device(device)).eval()
    out = run_forward(work, batch, forward_fn, resolve_device(device), data_hint=part.description)
    rows = batch_size_of(batch)
    logits = select_logits(out, output_key, rows)
    y = _labels(batch, rows)
    return output_task(tuple(logits.shape), y, part.description, output_key), tuple(logits.shape)


def _recalibrated(
    model: nn.Module,
    fit_part: _Part,
    b: int,
    upstream: str,
    *,
    seed: int,
    num_workers: int,
    forward_fn: ForwardFn | None,
    device: Any,
    progress: Progress | None,
) -> RecalibrateResult:
    """:func:`bncorrect.recalibration.recalibrate_stats` on the fitting part, as ``bncorrect recalibrate``
    runs it: ``train`` over shuffled groups of B (one pass), ``eval`` with the default choice of scheme
    (:func:`~bncorrect.recalibration.choose_exact`: layer by layer when it costs no more than the
    iterative scheme's cap, else iterative)."""
    from . import distributed
    from .recalibration import DEFAULT_MAX_PASSES, choose_exact, recalibrate_stats

    loader_b = b * max(1, 64 // b) if upstream == "train" else 128
    loader = _part_loader(fit_part, loader_b, shuffle=upstream == "train", seed=seed, num_workers=num_workers)
    exact = False
    if upstream == "eval":
        counts = distributed.all_gather(len(loader))  # type: ignore[arg-type]
        n_layers = len(corrected_layers(correct_model(copy.deepcopy(model), 0.0)))
        exact = choose_exact(n_layers, sum(counts), DEFAULT_MAX_PASSES)
    return recalibrate_stats(
        model,
        loader,
        upstream=upstream,  # type: ignore[arg-type]
        batch_size=b,
        exact=exact,
        forward_fn=forward_fn,
        device=device,
        total_examples=len(fit_part),
        progress=progress,
        data_hint=fit_part.description,
    )


def estimate_pair(
    model: nn.Module,
    stats: Mapping[str, tuple[Tensor, Tensor]],
    batches: Iterable[Batch],
    train_batch_size: int,
    *,
    seed: int = 0,
    solve_rows: int = DEFAULT_SOLVE_ROWS,
    forward_fn: ForwardFn | None = None,
    device: str | torch.device | None = "cpu",
    total_examples: int | None = None,
    progress: Progress | None = None,
    data_hint: str = "",
) -> tuple[EstimateResult, EstimateResult]:
    """EvalNorm offline twice from one data pass: against the model's running statistics and against
    ``stats`` (name -> (mean, var), e.g. recalibrated ones). The same as
    :func:`bncorrect.estimation.estimate_alpha_beta` on ``model`` and on ``model`` with ``stats`` in its
    buffers, for the same ``batches`` and ``seed`` (a test checks equality), at the cost of one pass: the
    training-mode pass normalizes every layer with its batch statistics, so its activations do not depend
    on the running statistics, and both sets of estimators (each with its own seeded sampler) observe
    them; only the solves differ."""
    from .estimation import SOLVE_LABEL, estimate_from_pass, estimation_pass

    plain, sizes, run_pass = estimation_pass(
        model,
        batches,
        train_batch_size,
        forward_fn=forward_fn,
        device=device,
        total_examples=total_examples,
        progress=progress,
        data_hint=data_hint,
    )
    other = {name: (stats[name][0], stats[name][1], eps) for name, (_, _, eps) in plain.items()}
    kept: dict[str, Any] = {}

    def outer(group_sizes: Mapping[str, int], other_observers: Mapping[str, Any]) -> tuple[int, int]:
        def inner(_: Mapping[str, int], plain_observers: Mapping[str, Any]) -> tuple[int, int]:
            def both(name: str) -> Any:
                first, second = plain_observers[name], other_observers[name]

                def observe(x: Tensor, mu_i: Tensor, var_i: Tensor, mu_b: Tensor, var_b: Tensor) -> None:
                    first(x, mu_i, var_i, mu_b, var_b)
                    second(x, mu_i, var_i, mu_b, var_b)

                return observe

            kept["counts"] = run_pass(group_sizes, {name: both(name) for name in plain_observers})
            return kept["counts"]

        kept["plain"] = estimate_from_pass(
            plain, sizes, inner, train_batch_size, seed=seed, solve_rows=solve_rows, data_hint=data_hint,
            progress=progress,
        )  # fmt: skip
        return kept["counts"]  # this rank's counts, as a pass returns them (merged across ranks later)

    second = estimate_from_pass(
        other, sizes, outer, train_batch_size, seed=seed, solve_rows=solve_rows, data_hint=data_hint,
        progress=progress, solve_label=f"{SOLVE_LABEL} (recalibrated)",
    )  # fmt: skip
    return kept["plain"], second


def tune_model(
    model: nn.Module,
    dataset: Any,
    train_batch_size: int,
    *,
    metric: str = "nll",
    holdout: float = DEFAULT_HOLDOUT,
    monitor: float = DEFAULT_MONITOR,
    seed: int = 0,
    alphas: Sequence[float] | None = None,
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    per_channel: bool = False,
    recalibrate: bool = True,
    upstream: str = DEFAULT_UPSTREAM,
    ignore_index: int = 255,
    max_examples: int | None = None,
    lr: float = DEFAULT_LR,
    max_epochs: int = DEFAULT_MAX_EPOCHS,
    patience: int = DEFAULT_PATIENCE,
    fit_batch_size: int = DEFAULT_FIT_BATCH,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    solve_rows: int = DEFAULT_SOLVE_ROWS,
    device: str | torch.device | None = "cpu",
    num_workers: int = 0,
    forward_fn: ForwardFn | None = None,
    output_key: str | int | None = None,
    progress: Progress | None = None,
    data_hint: str = "",
) -> TuneResult:
    """Choose the best safe correction for ``model`` on the labelled, indexable ``dataset`` (module
    docstring): split, fit the candidates on the fitting part, score them on the held-out part, choose by
    ``metric``, never worse than EMA there. Classification (labels (N,), logits (N, classes)): nll, top1 or
    top5. Segmentation (masks (N, H, W), per-pixel logits (N, K, H, W), e.g. ``output_key="out"``):
    pixel-nll (``"nll"`` means pixel-nll), miou or pixel-acc over the pixels whose mask value is not
    ``ignore_index``; the split is drawn per image (:func:`random_split`) and the per-layer fit minimises the
    mean pixel cross-entropy (:class:`PixelLoss`). ``recalibrate`` (default) adds the candidate EvalNorm
    offline on population statistics recalibrated on the fitting part (``upstream``: ``train``, the
    default, or ``eval``; see :func:`bncorrect.recalibration.recalibrate_stats`) beside EvalNorm offline on
    the running statistics. ``alphas``: the global sweep's grid (default
    :func:`bncorrect.sweep.default_alphas`). ``max_examples``: use the first N of a seeded permutation.
    ``solve_rows``: (example, channel) rows per layer of the EvalNorm candidates' grid search.
    ``model`` is not modified."""
    from .estimation import estimate_alpha_beta
    from .sweep import (
        DENSE_PIECE_BYTES,
        Candidate,
        check_ignore_index,
        check_masks,
        check_metric,
        sweep_alpha,
        task_metric,
    )

    check_metric(metric)
    if recalibrate and upstream not in ("eval", "train"):
        raise UsageError(
            f"{spell('upstream', upstream)}: must be 'eval' or 'train'",
            hint=f"{spell('upstream', 'train')} (training-consistent, the default) or "
            f"{spell('upstream', 'eval')} (inference-consistent); see recalibrate",
        )
    ignore_index = check_ignore_index(ignore_index)
    holdout = _check_fraction(holdout, "holdout", "the held-out fraction")
    monitor = _check_fraction(monitor, "monitor", "the monitor fraction of the fitting part")
    if isinstance(train_batch_size, bool) or not isinstance(train_batch_size, int) or train_batch_size < 1:
        raise UsageError(f"{spell('train_batch_size', train_batch_size)}: must be a whole number >= 1")
    if isinstance(fit_batch_size, bool) or not isinstance(fit_batch_size, int) or fit_batch_size < 1:
        raise UsageError(f"{spell('fit_batch_size', fit_batch_size)}: must be a whole number >= 1")
    strengths = check_strengths(strengths)
    b = int(train_batch_size)
    hint = data_hint or getattr(dataset, "description", "")
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = timings.get(stage, 0.0) + now - clock
        clock = now

    labels = dataset_labels(dataset, hint)
    masks = labels.dim() == 3
    order = torch.arange(labels.shape[0])
    if max_examples is not None:
        if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
            raise UsageError(f"{spell('max_examples', max_examples)}: must be a whole number >= 1")
        order = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(int(seed)))[
            :max_examples
        ]
        order = torch.sort(order).values

    def split(idx: Tensor, fraction: float, split_seed: int) -> tuple[Tensor, Tensor]:
        if masks:  # one draw per image: stratification by label does not apply to masks
            return random_split(len(idx), fraction, split_seed)
        return stratified_split(labels[idx], fraction, split_seed)

    rest, held = split(order, holdout, seed)
    fit_idx, held_idx = order[rest], order[held]
    inner, mon = split(fit_idx, monitor, seed + 1)
    inner_idx, mon_idx = fit_idx[inner], fit_idx[mon]
    need = max(2 * b, 4)
    what = "images" if masks else "labelled examples"
    if len(held_idx) == 0 or len(fit_idx) < need or len(inner_idx) == 0 or len(mon_idx) == 0:
        raise DataError(
            f"{len(order)} {what} split with {spell('holdout', holdout)} leave {len(fit_idx)} for "
            f"fitting and {len(held_idx)} held out; tune needs at least {need} fitting examples (2 "
            "normalization batches, and a monitor slice) and one held-out example",
            path=getattr(dataset, "path", None) or hint or None,
            hint=f"give more labelled data, or a smaller {spell('holdout', 0.2)}",
        )
    label_shape = tuple(labels.shape[1:])
    fit_part = _Part(dataset, fit_idx.tolist(), "fitting part", label_shape)
    held_part = _Part(dataset, held_idx.tolist(), "held-out part", label_shape)
    inner_part = _Part(dataset, inner_idx.tolist(), "fitting examples of the per-layer fit", label_shape)
    mon_part = _Part(dataset, mon_idx.tolist(), "monitor slice of the fitting part", label_shape)
    task, out_shape = _check_scores(model, held_part, forward_fn, output_key, device)
    metric = task_metric(metric, task)
    dense: _Dense | None = None
    eval_batch = 256
    mon_batch = 256
    step_batch = fit_batch_size
    loss_fn: FitLoss = classification_loss
    if task == "segmentation":
        dense = _Dense(int(out_shape[1]), ignore_index, (int(out_shape[2]), int(out_shape[3])))
        # every mask checked before any pass: values 0..K-1 or the ignore index
        check_masks(labels[order], dense.num_classes, ignore_index, hint, output_key)
        if not all(bool((labels[i] != ignore_index).any()) for i in (held_idx, mon_idx)):
            raise DataError(
                "the held-out part or the monitor slice holds no labelled pixel (every mask value is the "
                f"ignore index {ignore_index})",
                path=getattr(dataset, "path", None) or hint or None,
                hint="check the masks, pass the value of unlabelled pixels with --ignore-index, or give more "
                "images",
            )
        pixels = dense.mask_shape[0] * dense.mask_shape[1]
        eval_batch = max(1, min(256, (1 << 22) // pixels))  # as sweep-alpha reads masks
        mon_batch = dense.rows(len(strengths), DENSE_PIECE_BYTES, 256)
        step_batch = min(fit_batch_size, dense.rows(len(strengths), DENSE_FIT_BYTES, fit_batch_size))
        loss_fn = PixelLoss(ignore_index)
    lap("split")

    def fit_loader() -> Any:  # the fitting part in shuffled batches, for the estimation pass
        return _part_loader(fit_part, b * max(1, 64 // b), shuffle=True, seed=seed, num_workers=num_workers)

    pass_options: dict[str, Any] = {
        "forward_fn": forward_fn, "device": device, "seed": seed, "solve_rows": solve_rows,
        "total_examples": len(fit_part), "progress": progress, "data_hint": fit_part.description,
    }  # fmt: skip

    def evalnorm_candidate(est: EstimateResult, label: str, stats: Any, kind: str) -> Candidate:
        return Candidate(
            label,
            {ly.name: torch.tensor(ly.alpha) for ly in est.layers},
            {ly.name: torch.tensor(ly.beta) for ly in est.layers},
            stats,
            kind,
        )

    # EvalNorm offline on the fitting part, on the running statistics and (recalibrate) on population
    # statistics recalibrated there first: both estimates from one training-mode pass
    recal = est_recal = None
    if recalibrate:
        recal = _recalibrated(
            model, fit_part, b, upstream, seed=seed, num_workers=num_workers, forward_fn=forward_fn,
            device=device, progress=progress,
        )  # fmt: skip
        lap("recalibrate")
        est, est_recal = estimate_pair(model, recal.stats, fit_loader(), b, **pass_options)
    else:
        est = estimate_alpha_beta(model, fit_loader(), b, **pass_options)
    evalnorms = [evalnorm_candidate(est, "EvalNorm offline", None, "evalnorm")]
    if recal is not None and est_recal is not None:
        label = f"EvalNorm offline (recalibrated, {upstream})"
        evalnorms.append(evalnorm_candidate(est_recal, label, dict(recal.stats), "evalnorm-recal"))
    lap("estimate")

    # the global sweep on the fitting part (the EvalNorm candidates beside it, for their fitting-part numbers)
    fit_sweep = sweep_alpha(
        model,
        _part_loader(fit_part, eval_batch, shuffle=False, seed=seed, num_workers=num_workers),
        alphas,
        train_batch_size=b,
        extra_candidates=evalnorms,
        metric=metric,
        output_key=output_key,
        ignore_index=ignore_index,
        forward_fn=forward_fn,
        device=device,
        total_examples=len(fit_part),
        progress=progress,
        data_hint=fit_part.description,
    )
    if fit_sweep.task != task:  # the probe and the pass disagree: a model whose output changes with the batch
        raise UsageError(
            f"the model's outputs on the fitting part are of a {fit_sweep.task} model, on the probe of a "
            f"{task} one",
            hint="give a model whose output has the same form for every batch",
        )
    best_global = fit_sweep.best
    a_star = float(best_global.alpha or 0.0)
    b_star = float(best_global.beta if best_global.beta is not None else a_star)
    ema_fit = fit_sweep.ema
    rule_fit = next(r for r in fit_sweep.rows if "rule" in r.kind.split("+"))
    evalnorm_fits = [next(r for r in fit_sweep.rows if r.kind == c.kind) for c in evalnorms]
    lap("sweep")

    # the per-layer fit: gradient steps on the cached fitting examples, not data-parallel: under a process
    # group rank 0 fits on the whole fitting part and every rank gets its result
    from . import distributed

    fit = distributed.on_writer(
        lambda: fit_per_layer(
            model,
            _part_loader(
                inner_part, step_batch, shuffle=True, seed=seed, num_workers=num_workers, shard=False
            ),
            _part_loader(mon_part, mon_batch, shuffle=False, seed=seed, num_workers=num_workers, shard=False),
            init_alpha=a_star,
            init_beta=b_star,
            strengths=strengths,
            nll_scale=ema_fit.nll,
            per_channel=per_channel,
            lr=lr,
            max_epochs=max_epochs,
            patience=patience,
            seed=seed,
            device=device,
            forward_fn=forward_fn,
            output_key=output_key,
            cache_bytes=cache_bytes,
            progress=progress,
            loss_fn=loss_fn,
        )
    )
    best_fit = fit.best
    tuned = Candidate(
        f"tuned per layer (L1 {best_fit.strength:g})",
        dict(best_fit.alpha),
        dict(best_fit.beta),
        None,
        "tuned",
    )
    dev = resolve_device(device)
    tuned_fit = _evaluate_candidate(
        model,
        best_fit.alpha,
        best_fit.beta,
        _part_loader(fit_part, eval_batch, shuffle=False, seed=seed, num_workers=num_workers),
        dev,
        forward_fn,
        output_key,
        fit_sweep.top_k,
        dense,
    )
    lap("fit")

    # every candidate on the held-out part
    r = C.rule_of_thumb(b)
    candidates = [
        Candidate(f"rule 1/B^2 (B={b})", r, r, None, "rule"),
        Candidate(f"best global alpha ({a_star:g})", a_star, b_star, None, "global"),
        *evalnorms,
        tuned,
    ]
    held_sweep = sweep_alpha(
        model,
        _part_loader(held_part, eval_batch, shuffle=False, seed=seed, num_workers=num_workers),
        [],
        extra_candidates=candidates,
        metric=metric,
        output_key=output_key,
        ignore_index=ignore_index,
        forward_fn=forward_fn,
        device=device,
        total_examples=len(held_part),
        progress=progress,
        data_hint=held_part.description,
    )
    lap("held-out")
    held_rows = held_sweep.rows  # EMA, then the candidates in order
    fit_numbers = [_fit_numbers(ema_fit), _fit_numbers(rule_fit), _fit_numbers(best_global),
                   *(_fit_numbers(row) for row in evalnorm_fits), tuned_fit]  # fmt: skip
    rows = [
        TuneRow("EMA (plain BN)", "ema", fit_numbers[0], held_rows[0], held_rows[0].candidate),
        *(
            TuneRow(c.label, c.kind, fit_numbers[i + 1], held_rows[i + 1], c)
            for i, c in enumerate(candidates)
        ),
    ]
    eligible = [row for row in rows if row.finite and math.isfinite(row.value(metric))]
    chosen = min(eligible, key=lambda row: _choice_key(row, metric))
    notes = list(held_sweep.notes)
    ema_row, tuned_row = rows[0], rows[-1]
    if chosen is ema_row:
        others = [row for row in eligible if row is not ema_row]
        runner_up = min(others, key=lambda row: _choice_key(row, metric)) if others else None
        detail = (
            f"; the best other, {runner_up.label}, has {runner_up.value(metric):.4f} against EMA's "
            f"{ema_row.value(metric):.4f}"
            if runner_up is not None
            else ""
        )
        notes.append(
            f"EMA written: no correction beat plain BN (EMA) on the held-out part by {metric}{detail}"
        )
    moved = best_fit.epoch > 0  # else the tuned candidate is its start, the best global alpha
    if (
        moved
        and _better(tuned_row.value(metric, "fit"), ema_row.value(metric, "fit"), metric)
        and not _better(tuned_row.value(metric), ema_row.value(metric), metric)
    ):
        notes.append(
            f"the per-layer fit overfitted the fitting part: {metric} {tuned_row.value(metric, 'fit'):.4f} "
            f"there against EMA's {ema_row.value(metric, 'fit'):.4f}, but {tuned_row.value(metric):.4f} on "
            f"the held-out part against EMA's {ema_row.value(metric):.4f}"
        )
    if not moved:
        notes.append(
            "the per-layer fit did not improve on its start on the monitor slice: the tuned candidate is the "
            f"best global alpha ({a_star:g})"
        )
    if fit.best.zero_layers:
        notes.append(
            f"{len(fit.best.zero_layers)} of {len(fit.best.alpha)} layers of the tuned fit end at alpha = "
            "beta = 0 (plain BN, foldable into the convolution before it in ONNX)"
        )
    if chosen.recalibrated:
        notes.append(
            f"{chosen.label} written: its recalibrated statistics ({upstream}, on the fitting part) replace "
            "the running statistics"
        )
    return TuneResult(
        metric=metric,
        train_batch_size=b,
        seed=seed,
        holdout=holdout,
        monitor=monitor,
        n_examples=len(order),
        n_fit=len(fit_idx),
        n_monitor=len(mon_idx),
        n_heldout=len(held_idx),
        rows=rows,
        chosen=chosen,
        layers=list(best_fit.alpha),
        fit=fit,
        global_alpha=a_star,
        global_beta=b_star,
        per_channel=per_channel,
        recalibrated=None if recal is None else upstream,
        notes=notes,
        timings=timings,
        fit_indices=fit_idx.tolist(),
        heldout_indices=held_idx.tolist(),
        monitor_indices=mon_idx.tolist(),
        estimate=est,
        recalibration=recal,
        fit_sweep=fit_sweep,
        heldout_sweep=held_sweep,
        task=task,
        ignore_index=ignore_index if task == "segmentation" else None,
        estimate_recalibrated=est_recal,
    )
