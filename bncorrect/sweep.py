"""Choosing the inference example weight on labelled validation data (``sweep-alpha``; Four Things 3.1).

One alpha for every BN layer (beta = alpha by default, see :func:`beta_for`) is evaluated over a grid, next
to plain BN (the EMA statistics, alpha = 0), EvalNorm's rule of thumb alpha = beta = 1/B^2 and any other
candidate (e.g. a corrections file from ``estimate``), and the best one is chosen per metric: mean
cross-entropy (``nll``), top-1 or top-5 accuracy, because the optimum for accuracy and for loss can differ
widely (Four Things, Fig. 4).

Segmentation (dense prediction): when the labels are masks ``y`` of shape (N, H, W) and the model's output
(or the ``output_key`` entry of its dict/tuple, e.g. torchvision's ``out``) is per-pixel logits (N, K, H, W)
of the same H, W, the metrics are ``pixel-nll`` (mean cross-entropy over the labelled pixels), ``miou``
and ``pixel-acc``; pixels whose mask value is ``ignore_index`` (default 255, as in PASCAL VOC, Cityscapes
and torchvision's references) count nowhere. mIoU: one confusion matrix per candidate over all labelled
pixels of the data (K x K counts, so stacking costs no per-example memory), IoU_c = TP_c / (TP_c + FP_c +
FN_c), averaged over the classes that occur in the targets or the predictions (a class absent from both has
no IoU and is left out of the mean; its ``iou_per_class`` entry is null). Mask values must be class indices
0..K-1 or the ignore index. No confidence intervals are given for segmentation (the pixels of an image are
not independent). Detection models (a list of per-image dicts) cannot be swept: there is no detection
metric here; :func:`select_output` says what applies instead.

How the work is shared across the K candidates (see :func:`sweep_alpha`):

- the data is read and decoded once: each batch is evaluated for every candidate while it is in memory;
- *stacking* (default): the K candidates run in one forward pass, the batch repeated K times along the
  batch axis, each BN layer normalizing row block k with candidate k's coefficients (:class:`_SweepNorm`);
  this pays the per-forward and per-op overhead once instead of K times;
- *shared prefix*: the un-repeated batch enters the model and the first BN layer it reaches fans it out
  to the K blocks, so everything before the first BN layer (the stem convolution) and the first layer's
  per-example statistics are computed once, not K times;
- *cache-sized passes* (CPU): a pass holds as many examples as keep its largest BN input near
  :data:`CPU_PASS_BYTES`, not the loader's batch size;
- ``stack="auto"`` instead times stacked and one-candidate-at-a-time passes on the first batches and
  keeps the faster (a hedge for hardware not measured here; on CPU stacking with the shared prefix was
  the fastest or within noise of it in every case of benchmarks/bench_sweep.py).

What cannot be shared is the corrected layers' own work: every candidate other than EMA needs each BN
layer's per-example statistics, which plain BN never computes, so a corrected pass costs 1.1-1.8x a plain
one on CPU (measured), and a sweep costs about K corrected passes less what the points above save
(benchmarks/README.md, "sweep-alpha").

Stacking assumes the model treats the rows of a batch independently (true of any eval-mode network without
cross-example operations). It is checked, not trusted: on the first batch a few examples are evaluated both
stacked and one candidate at a time, and on any disagreement or error the sweep falls back (shared prefix
-> plain stacking -> one candidate at a time), recording why in :attr:`SweepResult.strategy_notes`.
Results equal evaluating each candidate separately with :func:`bncorrect.layers.correct_model` up to
float rounding of the convolutions at a different batch size (about 1e-7 relative).

The library never prints: :meth:`SweepResult.table` returns a ``rich`` table, :func:`plot_sweep` writes a
PNG and :func:`write_report` a JSON file (both atomically), and progress goes to an optional callback.
"""

from __future__ import annotations

import contextlib
import copy
import math
import operator
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from . import correction as C
from .errors import DataError, NumericalError, UsageError, shorten
from .layers import CorrectedNorm, correct_model, corrected_layers
from .passes import (
    Batch,
    ForwardFn,
    Progress,
    batch_size_of,
    default_forward,
    map_batch,
    raise_first_nonfinite,
    resolve_device,
    run_forward,
)

if TYPE_CHECKING:
    from rich.table import Table

    from .corrections import Corrections

__all__ = [
    "DEFAULT_ALPHAS",
    "DEFAULT_IGNORE_INDEX",
    "METRICS",
    "SEGMENTATION_METRICS",
    "BetaMode",
    "Candidate",
    "SweepResult",
    "SweepRow",
    "alphas_from_options",
    "beta_for",
    "binomial_ci95",
    "build_candidates",
    "default_alphas",
    "parse_alpha_range",
    "parse_alphas",
    "parse_beta_mode",
    "plot_sweep",
    "select_output",
    "sweep_alpha",
    "write_report",
]

#: The default grid: dense near 0, where the papers find the optimum for moderate B, up to 0.5.
DEFAULT_ALPHAS: tuple[float, ...] = (0.0, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5)
#: Metrics a classification sweep (logits (N, classes), labels (N,)) reports and can choose by.
METRICS: tuple[str, ...] = ("nll", "top1", "top5")
#: Metrics a segmentation sweep (per-pixel logits (N, K, H, W), masks (N, H, W)) reports and can choose by.
SEGMENTATION_METRICS: tuple[str, ...] = ("pixel-nll", "miou", "pixel-acc")
#: The mask value of unlabelled pixels by default (PASCAL VOC, Cityscapes, torchvision's references).
DEFAULT_IGNORE_INDEX = 255
#: Per-pixel outputs are evaluated in pieces of at most about this many bytes of float32 logits (all K
#: candidates together), so that a loader batch of large maps never has to be held K times at once.
DENSE_PIECE_BYTES = 256 << 20
#: At most this many rows (K candidates x examples) per stacked forward pass by default. On GPUs the cap is
#: lowered further so that one pass needs at most half the free memory (estimated from the probe).
DEFAULT_STACK_ROWS_CPU = 4096
DEFAULT_STACK_ROWS_GPU = 8192
#: On CPU, rows per forward pass (stacked or one candidate at a time) are chosen so that the largest BN
#: input of a pass holds about this many bytes: beyond cache size the memory-bound layers (the corrected
#: normalization, ReLU) slow down (benchmarks/bench_sweep.py, benchmarks/README.md).
CPU_PASS_BYTES = 4 << 20
#: Examples of the first batch evaluated both stacked and one candidate at a time to check stacking.
PROBE_EXAMPLES = 8

BetaMode = Literal["equal", "zero"] | float
Coefficients = float | Tensor | Mapping[str, float | Tensor]

_Z95 = 1.959963984540054


# ---------------------------------------------------------------------------------------------- options
def _check_alpha(value: float, text: str) -> float:
    if not math.isfinite(value) or value < 0.0 or value > 1.0:
        raise UsageError(
            f"alpha {value:g} (from {text!r}) is outside [0, 1]",
            hint="inference example weights lie in [0, 1], e.g. --alphas 0,0.05,0.1 or "
            "--alpha-range 0:0.5:11",
        )
    return float(value)


def parse_alphas(text: str) -> list[float]:
    """``"0,0.01,0.1"`` -> ``[0.0, 0.01, 0.1]`` (sorted, duplicates removed); UsageError on junk or values
    outside [0, 1]."""
    parts = [p.strip() for p in str(text).split(",")]
    hint = "give comma-separated numbers in [0, 1], e.g. --alphas 0,0.01,0.05,0.1"
    if not parts or any(p == "" for p in parts):
        raise UsageError(f"--alphas: expected comma-separated numbers, got {text!r}", hint=hint)
    values = []
    for p in parts:
        try:
            v = float(p)
        except ValueError:
            raise UsageError(f"--alphas: {p!r} is not a number (in {text!r})", hint=hint) from None
        values.append(_check_alpha(v, text))
    return sorted(set(values))


def parse_alpha_range(text: str) -> list[float]:
    """``"START:STOP:N"`` -> N evenly spaced values from START to STOP inclusive (``"0:0.5:11"`` gives
    0, 0.05, ..., 0.5); UsageError on junk, N < 1, START > STOP or values outside [0, 1]."""
    hint = "use START:STOP:N with 0 <= START <= STOP <= 1 and N >= 1, e.g. --alpha-range 0:0.5:11"
    parts = [p.strip() for p in str(text).split(":")]
    if len(parts) != 3:
        raise UsageError(f"--alpha-range: expected START:STOP:N, got {text!r}", hint=hint)
    try:
        start, stop = float(parts[0]), float(parts[1])
    except ValueError:
        raise UsageError(f"--alpha-range: START and STOP must be numbers, got {text!r}", hint=hint) from None
    if not re.fullmatch(r"\+?\d+", parts[2]) or int(parts[2]) < 1:
        raise UsageError(f"--alpha-range: N must be a positive integer, got {parts[2]!r}", hint=hint)
    n = int(parts[2])
    _check_alpha(start, text)
    _check_alpha(stop, text)
    if start > stop:
        raise UsageError(f"--alpha-range: START {start:g} is greater than STOP {stop:g}", hint=hint)
    if n == 1:
        if start != stop:
            raise UsageError(f"--alpha-range: N = 1 needs START = STOP, got {text!r}", hint=hint)
        return [start]
    step = (stop - start) / (n - 1)
    # rounding to 12 digits keeps "0:0.5:11" at 0.05, 0.1, ... instead of 0.15000000000000002
    return sorted({round(start + i * step, 12) for i in range(n - 1)} | {stop})


def parse_beta_mode(text: str) -> BetaMode:
    """``"equal"`` (beta = alpha), ``"zero"`` (beta = 0: correct the mean only) or a number in [0, 1]
    (one fixed beta for every alpha)."""
    t = str(text).strip().lower()
    if t in ("equal", "zero"):
        return t  # type: ignore[return-value]
    try:
        v = float(t)
    except ValueError:
        raise UsageError(
            f"--beta-mode: expected equal, zero or a number in [0, 1], got {text!r}",
            hint="--beta-mode equal (beta = alpha, Four Things), zero (mean only) or e.g. 0.1",
        ) from None
    if not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise UsageError(f"--beta-mode: beta {v:g} is outside [0, 1]")
    return v


def beta_for(alpha: float, beta_mode: BetaMode) -> float:
    """The beta paired with a grid alpha under ``beta_mode``."""
    if beta_mode == "equal":
        return float(alpha)
    if beta_mode == "zero":
        return 0.0
    if isinstance(beta_mode, str):
        raise UsageError(f"beta_mode must be 'equal', 'zero' or a number in [0, 1], got {beta_mode!r}")
    b = float(beta_mode)
    if not math.isfinite(b) or not 0.0 <= b <= 1.0:
        raise UsageError(f"beta_mode: beta {b:g} is outside [0, 1]")
    return b


def default_alphas(train_batch_size: int | None = None) -> list[float]:
    """The default grid (:data:`DEFAULT_ALPHAS`: 0 ... 0.5, dense near 0), plus EvalNorm's 1/B^2 when the
    training normalization batch size B is known."""
    values = set(DEFAULT_ALPHAS)
    if train_batch_size is not None:
        values.add(C.rule_of_thumb(train_batch_size))
    return sorted(values)


def alphas_from_options(
    alphas: str | None = None, alpha_range: str | None = None, train_batch_size: int | None = None
) -> list[float]:
    """The grid a command line asks for: ``--alphas LIST`` or ``--alpha-range START:STOP:N`` (not both),
    else :func:`default_alphas`. (alpha = 0 and the rule 1/B^2 are added by :func:`sweep_alpha` anyway.)"""
    if alphas is not None and alpha_range is not None:
        raise UsageError(
            "--alphas and --alpha-range both given", hint="give a list (--alphas) or a range (--alpha-range)"
        )
    if alphas is not None:
        return parse_alphas(alphas)
    if alpha_range is not None:
        return parse_alpha_range(alpha_range)
    return default_alphas(train_batch_size)


def binomial_ci95(correct: int, n: int) -> tuple[float, float]:
    """Wilson score 95% interval for a proportion ``correct / n`` (sensible also near 0 and 1 and for small
    n, unlike the normal approximation). ``n = 0`` gives (0, 1)."""
    if n <= 0:
        return (0.0, 1.0)
    p = correct / n
    z2 = _Z95 * _Z95
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = _Z95 * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


# ---------------------------------------------------------------------------------------------- candidates
@dataclass(frozen=True, eq=False)
class Candidate:
    """One correction to evaluate.

    ``alpha``/``beta`` are one value for every layer or a mapping from layer name to a value (scalar or
    per-channel vector), as for :func:`~bncorrect.layers.correct_model`: layers missing from a mapping get
    0, ``beta=None`` means beta = alpha. ``running_stats`` optionally replaces layers' running statistics
    (layer -> (mean, var)), e.g. from a recalibrated corrections file. ``kind``: ``"ema"``, ``"grid"``,
    ``"rule"`` or ``"extra"`` (several joined with ``+`` when candidates coincide).
    """

    label: str
    alpha: Coefficients = 0.0
    beta: Coefficients | None = None
    running_stats: Mapping[str, tuple[Tensor, Tensor]] | None = None
    kind: str = "extra"

    @property
    def is_global(self) -> bool:
        """One scalar alpha and beta for every layer, the running statistics untouched."""
        return (
            _is_scalar(self.alpha) and (self.beta is None or _is_scalar(self.beta)) and not self.running_stats
        )

    @property
    def alpha_value(self) -> float | None:
        """The global alpha (None for per-layer candidates)."""
        return float(self.alpha) if self.is_global else None  # type: ignore[arg-type]

    @property
    def beta_value(self) -> float | None:
        """The global beta (None for per-layer candidates)."""
        if not self.is_global:
            return None
        return float(self.alpha if self.beta is None else self.beta)  # type: ignore[arg-type]

    @classmethod
    def from_corrections(cls, corrections: Corrections, label: str | None = None) -> Candidate:
        """A candidate from a corrections file's contents (per-layer alpha, beta, recalibrated statistics)."""
        alpha, beta = corrections.coefficients()
        stats = {
            n: (lc.running_mean, lc.running_var)
            for n, lc in corrections.layers.items()
            if lc.running_mean is not None and lc.running_var is not None
        }
        return cls(label or corrections.method, alpha, beta, stats or None, "extra")


def _is_scalar(v: object) -> bool:
    if isinstance(v, Tensor):
        return v.dim() == 0
    return isinstance(v, int | float) and not isinstance(v, bool)


def build_candidates(
    alphas: Sequence[float] | None = None,
    *,
    beta_mode: BetaMode = "equal",
    train_batch_size: int | None = None,
    extra: Sequence[Candidate] = (),
) -> list[Candidate]:
    """The candidates of a sweep, in table order: EMA (alpha = beta = 0) first, then the global alphas
    (the grid with beta from ``beta_mode``, and alpha = beta = 1/B^2 when ``train_batch_size`` is given)
    by increasing alpha, then ``extra``. Global candidates with the same (alpha, beta) are merged into
    one, with the labels joined (e.g. the grid's 0 is the EMA row)."""
    grid = default_alphas(train_batch_size) if alphas is None else list(alphas)
    if not grid and not extra:
        raise UsageError("no alpha to evaluate", hint="give at least one value, e.g. --alphas 0,0.05,0.1")
    merged: dict[tuple[float, float], tuple[list[str], list[str]]] = {}

    def add(a: float, b: float, label: str, kind: str) -> None:
        key = (round(a, 12), round(b, 12))
        labels, kinds = merged.setdefault(key, ([], []))
        if label not in labels:
            labels.append(label)
        if kind not in kinds:
            kinds.append(kind)

    add(0.0, 0.0, "EMA", "ema")
    for a in grid:
        a = _check_alpha(float(a), str(a))
        add(a, beta_for(a, beta_mode), f"alpha={a:g}", "grid")
    if train_batch_size is not None:
        if isinstance(train_batch_size, bool) or int(train_batch_size) < 1:
            raise UsageError(f"--train-batch-size must be >= 1, got {train_batch_size}")
        r = C.rule_of_thumb(int(train_batch_size))
        add(r, r, f"rule 1/B^2 (B={int(train_batch_size)})", "rule")
    out = []
    for (a, b), (labels, kinds) in sorted(merged.items()):
        named = [lb for lb in labels if not lb.startswith("alpha=")]
        out.append(Candidate(", ".join(named or labels), a, b, None, "+".join(kinds)))
    seen = {c.label for c in out}
    for c in extra:
        label = c.label
        i = 2
        while label in seen:
            label = f"{c.label} ({i})"
            i += 1
        seen.add(label)
        out.append(Candidate(label, c.alpha, c.beta, c.running_stats, c.kind))
    return out


@dataclass
class CandidateTables:
    """Per-layer coefficients of all K candidates: (K, C) each; running statistics only where some
    candidate replaces them."""

    alpha: Tensor
    beta: Tensor
    running_mean: Tensor | None
    running_var: Tensor | None


def _lookup(value: Coefficients | None, name: str) -> float | Tensor | None:
    if isinstance(value, Mapping):
        return value.get(name)
    return value


def resolve_tables(
    candidates: Sequence[Candidate], layers: Mapping[str, CorrectedNorm]
) -> dict[str, CandidateTables]:
    """Check every candidate against the model's layers and lay their coefficients out per layer.

    Of each layer only ``num_channels`` and ``norm.running_mean``/``norm.running_var`` are read (float64
    statistics keep the tables in float64). Defaults: alpha 0, beta = alpha, the layer's own statistics.
    """
    names = set(layers)
    for cand in candidates:
        for label, value in (("alpha", cand.alpha), ("beta", cand.beta), ("statistics", cand.running_stats)):
            if isinstance(value, Mapping):
                unknown = sorted(set(value) - names)
                if unknown:
                    shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
                    raise UsageError(
                        f"candidate {cand.label!r}: {label} given for layers the model does not have or "
                        f"cannot correct: {shown}",
                        hint="use corrections made for this model (see `bncorrect inspect MODEL`)",
                    )
    tables = {}
    for name, layer in layers.items():
        rm0, rv0 = layer.norm.running_mean, layer.norm.running_var
        dtype = torch.float64 if rm0.dtype == torch.float64 else torch.float32
        c = layer.num_channels
        alphas, betas, means, variances = [], [], [], []
        any_stats = False
        for cand in candidates:
            a = _lookup(cand.alpha, name)
            b = _lookup(cand.beta, name)
            a = 0.0 if a is None else a
            b = a if b is None else b
            for label, v in (("alpha", a), ("beta", b)):
                t = torch.as_tensor(v, dtype=dtype).detach().cpu()
                if t.dim() > 1 or (t.dim() == 1 and t.numel() != c):
                    raise UsageError(
                        f"candidate {cand.label!r}: {label} of layer {name} has shape {tuple(t.shape)}; "
                        f"it must be a scalar or a vector of length {c}"
                    )
                if not bool(torch.isfinite(t).all()) or bool((t < 0).any()) or bool((t > 1).any()):
                    raise UsageError(f"candidate {cand.label!r}: {label} of layer {name} must lie in [0, 1]")
                (alphas if label == "alpha" else betas).append(t.expand(c))
            stats = (cand.running_stats or {}).get(name)
            if stats is None:
                means.append(rm0.detach().cpu().to(dtype))
                variances.append(rv0.detach().cpu().to(dtype))
            else:
                m, v = (torch.as_tensor(s).detach().cpu().to(dtype) for s in stats)
                if m.shape != (c,) or v.shape != (c,):
                    raise UsageError(
                        f"candidate {cand.label!r}: statistics of layer {name} must have shape ({c},)"
                    )
                if not (bool(torch.isfinite(m).all()) and bool(torch.isfinite(v).all())) or bool(
                    (v < 0).any()
                ):
                    raise UsageError(
                        f"candidate {cand.label!r}: statistics of layer {name} hold NaN/Inf/negatives"
                    )
                means.append(m)
                variances.append(v)
                any_stats = True
        tables[name] = CandidateTables(
            torch.stack(alphas),
            torch.stack(betas),
            torch.stack(means) if any_stats else None,
            torch.stack(variances) if any_stats else None,
        )
    return tables


# ---------------------------------------------------------------------------------------------- the layer
class _StackMismatch(Exception):
    """A stacked forward met a tensor that is neither the base batch nor K blocks of it."""


class _SweepNorm(CorrectedNorm):
    """A :class:`CorrectedNorm` that holds the coefficients of all K candidates of a sweep.

    ``select(k)`` makes it exactly ``CorrectedNorm`` with candidate k's coefficients. With ``stack`` set to
    ``(K, m, expand)`` it normalizes a stacked batch instead: rows ``k*m .. k*m + m - 1`` with candidate k's
    coefficients; with ``expand`` an input of the base ``m`` rows is fanned out to the K blocks (the shared
    prefix), its per-example statistics computed once.
    """

    def __init__(self, norm: nn.Module, tables: CandidateTables) -> None:
        super().__init__(norm, 0.0, 0.0)
        dev = norm.running_mean.device
        self.tab_alpha: Tensor
        self.tab_beta: Tensor
        self.tab_mean: Tensor | None
        self.tab_var: Tensor | None
        self.register_buffer("tab_alpha", tables.alpha.to(dev), persistent=False)
        self.register_buffer("tab_beta", tables.beta.to(dev), persistent=False)
        for name, t in (("tab_mean", tables.running_mean), ("tab_var", tables.running_var)):
            self.register_buffer(name, None if t is None else t.to(dev), persistent=False)
        self.stack: tuple[int, int, bool] | None = None
        self.row_bytes = 0  # bytes per example of the last input (sizes the passes on CPU)
        #: (K,) bool on the layer's device, shared by the layers of a sweep (None: no bookkeeping): set for
        #: the candidates whose input statistics or normalization at this layer met NaN/Inf
        self.bad: Tensor | None = None
        self.current = 0

    def _mark(self, *stats: Tensor) -> None:
        """Flag the candidates whose ``stats`` hold NaN/Inf; each is (blocks, rows, C) with blocks = K, or 1
        for rows every candidate shares (then all are flagged). One float64 sum per block and tensor (no
        float32 value can make it overflow: it is non-finite exactly when a value is; 4-8x cheaper than
        ``isfinite(...).all()`` on CPU), kept on the device: no synchronisation."""
        if self.bad is None:
            return
        total = sum(t.flatten(1).sum(1, dtype=torch.float64) for t in stats)
        self.bad |= ~torch.isfinite(torch.as_tensor(total))

    def _mark_current(self, *stats: Tensor) -> None:
        """Flag the selected candidate (one candidate per forward) if any of ``stats`` holds NaN/Inf."""
        if self.bad is None:
            return
        total = sum(t.sum(dtype=torch.float64) for t in stats)
        self.bad[self.current] |= ~torch.isfinite(torch.as_tensor(total))

    def _one_candidate(self, x: Tensor) -> Tensor:
        """Eval forward of the selected candidate, as :class:`CorrectedNorm` computes it, flagging it when
        its statistics at this layer are NaN/Inf. Plain BN (EMA) computes no per-example statistics; here
        they are taken anyway, to check its input (NaN/Inf, or values whose variance overflows)."""
        norm = self.norm
        if self.is_identity():
            if x.dim() >= 2 and x.is_floating_point():
                self._mark_current(*C.example_stats(x))
            return norm(x)
        self._check_input(x)
        mu_i, var_i = C.example_stats(x)
        dt = mu_i.dtype
        rm, rv = norm.running_mean.to(dt), norm.running_var.to(dt)
        alpha, beta, eps = self.alpha.to(dt), self.beta.to(dt), float(norm.eps)
        if self.strategy == "direct":
            s, t = C.corrected_scale_shift(mu_i, var_i, rm, rv, alpha, beta, eps, norm.weight, norm.bias)
            self._mark_current(var_i, s, t)
            return C.affine(x, s, t)
        mean, var = C.corrected_stats(mu_i, var_i, rm, rv, alpha, beta)
        self._mark_current(var_i, mean, var)
        k, m = C.input_map(mean, var, norm.running_mean, norm.running_var, eps)
        return norm((x.to(k.dtype) * C.expand_to(k, x) + C.expand_to(m, x)).to(x.dtype))

    def select(self, k: int) -> None:
        """Become candidate k (one candidate per forward)."""
        self.current = k
        self.alpha = self.tab_alpha[k]
        self.beta = self.tab_beta[k]
        if self.tab_mean is not None and self.tab_var is not None:
            with torch.no_grad():
                self.norm.running_mean.copy_(self.tab_mean[k])
                self.norm.running_var.copy_(self.tab_var[k])

    def forward(self, x: Tensor) -> Tensor:
        if x.dim():
            self.row_bytes = x.numel() // max(1, x.shape[0]) * x.element_size()
        if self.training or (self.stack is None and self.bad is None):
            return super().forward(x)
        if self.stack is None:
            return self._one_candidate(x)
        k, m, expand = self.stack
        n = x.shape[0] if x.dim() else -1
        if n == k * m:
            shared = False
        elif expand and n == m:
            shared = True
        else:
            raise _StackMismatch(f"a BN layer received {n} rows in a stacked pass of {k} x {m}")
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise _StackMismatch(f"input of shape {tuple(x.shape)} in a stacked pass")
        mu_i, var_i = C.example_stats(x)
        dt = mu_i.dtype
        c = self.num_channels
        mu3, var3 = mu_i.reshape(-1, m, c), var_i.reshape(-1, m, c)
        norm = self.norm
        rm = (norm.running_mean[None] if self.tab_mean is None else self.tab_mean).to(dt)[:, None, :]
        rv = (norm.running_var[None] if self.tab_var is None else self.tab_var).to(dt)[:, None, :]
        alpha, beta = self.tab_alpha.to(dt)[:, None, :], self.tab_beta.to(dt)[:, None, :]
        eps = float(norm.eps)
        if self.strategy == "direct":
            s, t = C.corrected_scale_shift(mu3, var3, rm, rv, alpha, beta, eps, norm.weight, norm.bias)
            s, t = s.expand(k, m, c), t.expand(k, m, c)  # (K, m, C) also when rows are shared
            # NaN/Inf in mu_i reach t (even with alpha = 0: 0 * Inf is NaN); var_i = Inf (overflow) need
            # not reach s or t, so it is checked itself
            self._mark(var3, s, t)
            if not shared:
                return C.affine(x, s.reshape(k * m, c), t.reshape(k * m, c))
            view = (k, m, c) + (1,) * (x.dim() - 2)
            xs = x.unsqueeze(0) if x.dtype == s.dtype else x.unsqueeze(0).to(s.dtype)
            out = torch.addcmul(t.reshape(view), xs, s.reshape(view)).reshape(k * m, *x.shape[1:])
            return out if out.dtype == x.dtype else out.to(x.dtype)
        mean, var = C.corrected_stats(mu3, var3, rm, rv, alpha, beta)
        self._mark(var3, mean, var)
        mean, var = mean.reshape(k * m, c), var.reshape(k * m, c)
        if shared:
            x = x.repeat(k, *([1] * (x.dim() - 1)))
        km, mm = C.input_map(mean, var, norm.running_mean, norm.running_var, eps)
        x_mapped = (x.to(km.dtype) * C.expand_to(km, x) + C.expand_to(mm, x)).to(x.dtype)
        return norm(x_mapped)


# ---------------------------------------------------------------------------------------------- outputs
#: What a sweep can score, for messages.
_SCORABLE = (
    "logits (N, classes) against class labels y (N,), or per-pixel logits (N, K, H, W) against masks "
    "y (N, H, W)"
)
_DETECTION_HINT = (
    "for a detection model use the commands that need no labels: estimate (EvalNorm alpha/beta per layer), "
    "recalibrate (population statistics), apply (a corrections file), diagnose, rule or weight; to choose "
    "one alpha by mAP, write corrected models with `bncorrect weight MODEL --alpha A -o OUT` for a few A and "
    "score them with your own detection evaluation"
)


def _describe(value: Any) -> str:
    """One item of a model's output in words: a tensor's shape and dtype, else what it is."""
    if isinstance(value, Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, Mapping):
        return f"dict of {', '.join(map(str, list(value)[:6]))}"
    if isinstance(value, tuple | list):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def _looks_like_logits(value: Any, rows: int | None) -> bool:
    return (
        isinstance(value, Tensor)
        and value.is_floating_point()
        and value.dim() in (2, 4)
        and (rows is None or value.shape[0] == rows)
    )


def _per_image_dicts(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(v, Mapping) for v in value)


def _is_detection(output: Any) -> bool:
    """A detector's output: a list of per-image dicts (torchvision detection models in eval mode return
    ``[{"boxes", "labels", "scores"}, ...]``), a tuple or list holding one (scripted torchvision detectors
    return ``(losses, detections)``), or a dict with ``boxes``."""
    if _per_image_dicts(output):
        return True
    if isinstance(output, tuple | list):
        return any(_per_image_dicts(v) for v in output)
    return isinstance(output, Mapping) and "boxes" in output


def detection_error(output: Any) -> UsageError:
    """The error for a model whose output is object detections (:func:`_is_detection`): sweep-alpha has no
    labels or metric of that form; says what applies instead."""
    if _per_image_dicts(output):
        what = f"a list of {len(output)} dicts (keys {', '.join(map(str, output[0]))}), one per image"
    elif isinstance(output, tuple | list):
        inner = next(v for v in output if _per_image_dicts(v))
        what = (
            f"a {type(output).__name__} holding a list of {len(inner)} per-image dicts "
            f"(keys {', '.join(map(str, inner[0]))})"
        )
    else:
        what = f"a dict with keys {', '.join(map(str, output))}"
    return UsageError(
        f"the model returns {what}: object detections, not class scores or per-pixel maps. sweep-alpha "
        f"chooses alpha by scoring outputs against labels ({_SCORABLE}) and has no detection metric (no box "
        "matching, no mAP); --output-key cannot change that",
        hint=_DETECTION_HINT,
    )


def _key_hint(items: Sequence[tuple[Any, Any]], rows: int | None, what: str) -> str:
    """A true hint for choosing among a model's outputs ``items`` (key, value): an entry that has the shape
    of logits if there is one."""
    fits = [k for k, v in items if _looks_like_logits(v, rows)]
    preferred = [k for k in fits if str(k) in ("out", "logits")]
    pick = (preferred or fits or [None])[0]
    if pick is None:
        return (
            f"none of them has the shape of logits a sweep can score ({_SCORABLE}); pass --output-key {what} "
            "for the one that holds them, or a forward_fn that returns them"
        )
    shape = tuple(dict(items)[pick].shape)
    return f"pass --output-key {what}, e.g. --output-key {pick} (the {shape} tensor)"


def select_output(output: Any, output_key: str | int | None = None, *, rows: int | None = None) -> Tensor:
    """The logits tensor of a model's output: the output itself, or ``output[output_key]`` for a tuple,
    list or dict (``output_key`` an index or a key). UsageError when the choice is missing or ambiguous (its
    hint names an entry of ``rows`` examples shaped like logits, if one is), or when the output is object
    detections (:func:`detection_error`)."""
    if isinstance(output, Tensor):
        if output_key is not None:
            raise UsageError(
                f"--output-key {output_key!r} given, but the model returns a single tensor",
                hint="leave out --output-key",
            )
        return output
    detection = _is_detection(output)
    if detection and output_key is None:
        raise detection_error(output)
    if isinstance(output, Mapping) or hasattr(output, "keys"):
        keys = list(output.keys())
        if output_key is None:
            tensors = [k for k in keys if isinstance(output[k], Tensor)]
            if len(tensors) == 1:
                return output[tensors[0]]
            shown = "; ".join(f"{k}: {_describe(output[k])}" for k in keys[:8])
            raise UsageError(
                f"the model returns a dict with keys {keys} ({shown}); which one holds the logits?",
                hint=_key_hint([(k, output[k]) for k in keys], rows, "KEY"),
            )
        key = output_key
        if key not in keys and isinstance(key, int) and 0 <= key < len(keys):
            key = keys[key]
        elif key not in keys and isinstance(key, str) and key.lstrip("-").isdigit():
            idx = int(key)
            key = keys[idx] if -len(keys) <= idx < len(keys) else key
        if key not in keys:
            raise UsageError(f"--output-key {output_key!r} is not among the model's outputs {keys}")
        out = output[key]
    elif isinstance(output, tuple | list):
        if output_key is None:
            shown = "; ".join(f"{i}: {_describe(v)}" for i, v in enumerate(output[:8]))
            raise UsageError(
                f"the model returns a {type(output).__name__} of {len(output)} items ({shown}); which one "
                "holds the logits?",
                hint=_key_hint(list(enumerate(output)), rows, "INDEX"),
            )
        try:
            idx = int(output_key)
        except (TypeError, ValueError):
            raise UsageError(
                f"--output-key {output_key!r}: the model returns a {type(output).__name__}; give an index "
                f"0..{len(output) - 1}"
            ) from None
        if not -len(output) <= idx < len(output):
            raise UsageError(
                f"--output-key {idx} is out of range: the model returns {len(output)} items",
                hint=f"give an index 0..{len(output) - 1}",
            )
        out = output[idx]
    else:
        raise UsageError(f"the model returns a {type(output).__name__}, not a tensor of logits")
    if not isinstance(out, Tensor):
        if detection or _is_detection(out):
            raise detection_error(output if detection else out)
        raise UsageError(
            f"--output-key {output_key!r} selects a {type(out).__name__}, not a tensor of logits"
        )
    return out


def select_logits(output: Any, output_key: str | int | None, rows: int) -> Tensor:
    """The logits in a model's ``output`` (:func:`select_output`); :class:`UsageError` unless they are a
    floating (``rows``, classes) tensor (classification) or (``rows``, K, H, W) (per-pixel logits)."""
    out = select_output(output, output_key, rows=rows)
    if out.dim() not in (2, 4) or out.shape[0] != rows or not out.is_floating_point():
        chosen = "" if output_key is None else f" (--output-key {output_key})"
        raise UsageError(
            f"the model's output{chosen} has shape {tuple(out.shape)} ({out.dtype}); sweep-alpha needs "
            f"logits of shape (N, classes), or per-pixel logits (N, K, H, W) for segmentation, with "
            f"N = {rows} examples",
            hint="for models with several outputs pick the logits with --output-key (torchvision "
            "segmentation models: --output-key out); detection outputs cannot be scored: use estimate, "
            "recalibrate, apply or diagnose for those",
        )
    return out


def batch_labels(batch: Batch, rows: int, data_hint: str) -> Tensor:
    """The integer labels of a batch of ``rows`` examples (last element of a tuple/list, or the
    ``y``/``label``/``labels``/``target``/``targets`` entry of a dict): class indices (rows,) or masks
    (rows, H, W), as int64; :class:`DataError` when there are none or they do not fit."""
    from .data import labels_hint

    y: Any = None
    if isinstance(batch, Mapping):
        for key in ("y", "label", "labels", "target", "targets"):
            if key in batch:
                y = batch[key]
                break
    elif isinstance(batch, tuple | list) and len(batch) >= 2:
        y = batch[-1]
    if y is None:
        raise DataError(
            "the data has no labels: sweep-alpha compares alphas by accuracy and cross-entropy on labelled "
            "examples",
            path=data_hint or None,
            hint="use labelled data: an .npz/.pt/.safetensors file with arrays x and y (class labels (N,) or "
            "segmentation masks (N, H, W)), or an image folder with one sub-folder per class",
        )
    y = torch.as_tensor(y)
    if y.dim() not in (1, 3) or y.shape[0] != rows or y.is_floating_point() or y.is_complex():
        raise DataError(
            f"labels of shape {tuple(y.shape)} ({y.dtype}) do not fit a batch of {rows} examples",
            path=data_hint or None,
            hint=labels_hint(tuple(y.shape)) if y.dim() not in (1, 3) else labels_hint(()),
        )
    return y.long()


def _slice(batch: Batch, rows: int, start: int, stop: int) -> Batch:
    return map_batch(batch, lambda t: t[start:stop] if t.dim() and t.shape[0] == rows else t)


def _repeat(batch: Batch, rows: int, k: int) -> Batch:
    def rep(t: Tensor) -> Tensor:
        if t.dim() and t.shape[0] == rows:
            return t.repeat(k, *([1] * (t.dim() - 1)))
        return t

    return map_batch(batch, rep)


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


# ---------------------------------------------------------------------------------------------- evaluation
class _Evaluator:
    """Runs the working copy of the model for all K candidates on one batch: (K, m, classes) logits, or
    (K, m, classes, H, W) per-pixel logits."""

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, _SweepNorm],
        k: int,
        forward_fn: ForwardFn | None,
        device: torch.device,
        output_key: str | int | None,
        stack_rows: int | None,
        data_hint: str,
    ) -> None:
        self.model = model
        self.layers = layers
        self.k = k
        self.forward_fn = forward_fn or default_forward
        self.device = device
        self.output_key = output_key
        self.stack_rows = stack_rows or (
            DEFAULT_STACK_ROWS_CPU if device.type == "cpu" else DEFAULT_STACK_ROWS_GPU
        )
        self.seq_rows: int | None = None  # None: whole batches one candidate at a time
        self.auto_rows = stack_rows is None
        self.data_hint = data_hint
        self.mode = "sequential"  # or "stacked" or "stacked+shared-prefix"
        self.auto = False
        self.timing: dict[str, list[float]] = {}
        self.notes: list[str] = []
        #: per candidate: NaN/Inf met in a BN layer's input statistics or normalization (see
        #: :meth:`_SweepNorm._mark`), since the last :meth:`evaluate`
        self.bad = torch.zeros(k, dtype=torch.bool, device=device)
        for layer in layers.values():
            layer.bad = self.bad

    def sequential(self, batch: Batch, rows: int) -> Tensor:
        """Candidate after candidate, in pieces of at most ``seq_rows`` examples."""
        step = rows if self.seq_rows is None else max(1, self.seq_rows)
        pieces = [(a, min(rows, a + step)) for a in range(0, rows, step)]
        outs = []
        try:
            for i in range(self.k):
                for layer in self.layers.values():
                    layer.select(i)
                for a, b in pieces:
                    piece = batch if (a, b) == (0, rows) else _slice(batch, rows, a, b)
                    out = run_forward(
                        self.model, piece, self.forward_fn, self.device, data_hint=self.data_hint
                    )
                    outs.append(select_logits(out, self.output_key, b - a))
        finally:
            for layer in self.layers.values():
                layer.select(0)
        n = len(pieces)
        return torch.stack(
            [torch.cat(outs[i * n : (i + 1) * n]) if n > 1 else outs[i] for i in range(self.k)]
        )

    def stacked(self, batch: Batch, rows: int, shared: bool) -> Tensor:
        k = self.k
        for layer in self.layers.values():
            layer.stack = (k, rows, shared)
        try:
            inputs = batch if shared else _repeat(batch, rows, k)
            with torch.no_grad():
                out = self.forward_fn(self.model, inputs)
        finally:
            for layer in self.layers.values():
                layer.stack = None
        logits = select_logits(out, self.output_key, k * rows)
        return logits.reshape(k, rows, *logits.shape[1:])

    def choose_mode(self, batch: Batch, rows: int, stack: bool | str, share_prefix: bool) -> Tensor:
        """Evaluate a few examples one candidate at a time (the reference) and check which stacked mode
        reproduces them. Returns the reference logits of the probe (K, p, classes)."""
        p = min(rows, PROBE_EXAMPLES)
        probe = _slice(batch, rows, 0, p)
        reference = self.sequential(probe, p)
        if self.auto_rows and self.device.type == "cpu" and self.k > 1:
            # passes whose largest BN input stays near cache size: CPU throughput falls off beyond that
            per_row = max([ly.row_bytes for ly in self.layers.values()] + [1])
            rows_per_pass = min(DEFAULT_STACK_ROWS_CPU, max(self.k, CPU_PASS_BYTES // per_row))
            self.stack_rows = rows_per_pass
            self.seq_rows = rows_per_pass
        if stack is False or self.k == 1:
            return reference
        tol = 1e-3 * max(1.0, float(reference.abs().max())) if reference.numel() else 0.0
        modes = [("stacked+shared-prefix", True)] if share_prefix else []
        for mode, shared in [*modes, ("stacked", False)]:
            try:
                with self._measure_memory(p):
                    got = self.stacked(probe, p, shared)
            except Exception as exc:  # anything the stacked pass trips over means: do not stack this way
                self.notes.append(f"{mode} not used: {type(exc).__name__}: {shorten(str(exc), 200)}")
                continue
            if got.shape == reference.shape and bool(
                torch.allclose(got.float(), reference.float(), rtol=1e-3, atol=tol, equal_nan=True)
            ):
                self.mode = mode
                self.auto = stack == "auto"
                return reference
            self.notes.append(f"{mode} not used: stacked outputs differ from one-at-a-time outputs")
        return reference

    @contextlib.contextmanager
    def _measure_memory(self, p: int) -> Iterator[None]:
        """On CUDA with the default ``stack_rows``: cap the rows per stacked pass so that one pass needs at
        most half the free memory, from the peak memory of the probe's stacked pass (an over-estimate per
        row: it includes workspaces). Elsewhere nothing (CPU throughput, not memory, sets the default)."""
        if self.device.type != "cuda" or not self.auto_rows:
            yield
            return
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        yield
        torch.cuda.synchronize(self.device)
        per_row = max(1, torch.cuda.max_memory_allocated(self.device) - base) / (self.k * p)
        free = torch.cuda.mem_get_info(self.device)[0]
        self.stack_rows = max(self.k, min(self.stack_rows, int(0.5 * free / per_row)))

    def record(self, seconds: float, rows: int) -> None:
        """With ``stack="auto"``: alternate stacked and one-at-a-time batches until each mode has been timed
        on two batches (the first one of each is a warm-up: new shapes cost extra once), then keep the mode
        that was faster per example."""
        if not self.auto:
            return
        self.timing.setdefault(self.mode, []).append(seconds / max(1, rows))
        stacked = next(m for m in self.timing if m != "sequential")
        counts = {m: len(self.timing.get(m, [])) for m in (stacked, "sequential")}
        if min(counts.values()) < 2:
            self.mode = min(counts, key=lambda m: (counts[m], m == self.mode))
            return
        self.auto = False
        per_example = {m: min(v[1:]) for m, v in self.timing.items()}
        self.mode = min(per_example, key=per_example.__getitem__)
        self.notes.append(
            f"auto: {stacked} {1e3 * per_example[stacked]:.3g} ms/example, one candidate at a time "
            f"{1e3 * per_example['sequential']:.3g} ms/example; kept {self.mode}"
        )

    def nonfinite(self, logits: Tensor) -> Tensor:
        """(K,) bool on the CPU: the candidates whose logits of the last :meth:`evaluate` or whose BN
        statistics in it held NaN/Inf."""
        return (self.bad | (~torch.isfinite(logits)).flatten(1).any(1)).cpu()

    def explain_ema(self, batch: Batch) -> NumericalError:
        """The error for plain BN (EMA, candidate 0) meeting NaN/Inf on ``batch``: reruns it once with hooks
        and raises for the first BN layer whose input (or output) is at fault; otherwise returns the error
        for non-finite values that arise outside the BN layers."""
        for layer in self.layers.values():
            layer.select(0)
        raise_first_nonfinite(
            self.model,
            batch,
            self.layers,
            forward_fn=self.forward_fn,
            device=self.device,
            data_hint=self.data_hint,
        )
        return ema_outputs_error(self.data_hint)

    def evaluate(self, batch: Batch, rows: int) -> Tensor:
        self.bad.zero_()
        if self.mode == "sequential":
            return self.sequential(batch, rows)
        shared = self.mode == "stacked+shared-prefix"
        outs = []
        start = 0
        while start < rows:
            chunk = max(1, self.stack_rows // self.k)
            stop = min(rows, start + chunk)
            piece = batch if (start, stop) == (0, rows) else _slice(batch, rows, start, stop)
            try:
                outs.append(self.stacked(piece, stop - start, shared))
            except Exception as exc:
                if isinstance(exc, RuntimeError) and _is_oom(exc) and chunk > 1:
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    self.stack_rows = max(self.k, self.stack_rows // 2)
                    self.notes.append(f"stacking ran out of memory; {self.stack_rows} rows per pass")
                    continue
                # whatever else the stacked pass trips over, one candidate at a time gives the result (or
                # the real error, reported through run_forward)
                self.notes.append(
                    f"{self.mode} stopped ({type(exc).__name__}: {shorten(str(exc), 200)}); "
                    "one candidate at a time"
                )
                self.mode = "sequential"
                self.auto = False
                outs.append(self.sequential(piece, stop - start))
            start = stop
        return torch.cat(outs, dim=1)


class Tally:
    """Running sums per candidate (float64), and per-example differences from candidate 0 (EMA).

    :meth:`add` takes the logits of all K candidates for one batch, (K, m, classes), and its labels (m,).
    """

    def __init__(self, k: int) -> None:
        z = torch.zeros(k, dtype=torch.float64)
        self.n = 0
        self.nll, self.nll2, self.top1, self.topk = z.clone(), z.clone(), z.clone(), z.clone()
        self.diff, self.diff2, self.better, self.worse = z.clone(), z.clone(), z.clone(), z.clone()
        self.nonfinite = torch.zeros(k, dtype=torch.bool)

    def add(self, logits: Tensor, y: Tensor, top_k: int, nonfinite: Tensor | None = None) -> None:
        """``nonfinite`` (K,): candidates to mark non-finite besides those with NaN/Inf logits (e.g. NaN/Inf
        statistics inside the model)."""
        logits = logits.detach()
        y = y.to(logits.device)
        logp = torch.log_softmax(logits.to(torch.float64), dim=-1)
        yy = y.reshape(1, -1, 1).expand(logits.shape[0], -1, 1)
        nll = -logp.gather(-1, yy).squeeze(-1)  # (K, m)
        hit1 = logits.argmax(-1) == y
        hitk = (logits.topk(top_k, dim=-1).indices == y[None, :, None]).any(-1)
        d = nll - nll[:1]
        self.n += int(y.shape[0])
        self.nll += nll.sum(1).cpu()
        self.nll2 += nll.square().sum(1).cpu()
        self.top1 += hit1.sum(1).double().cpu()
        self.topk += hitk.sum(1).double().cpu()
        self.diff += d.sum(1).cpu()
        self.diff2 += d.square().sum(1).cpu()
        self.better += (hit1 & ~hit1[:1]).sum(1).double().cpu()
        self.worse += (~hit1 & hit1[:1]).sum(1).double().cpu()
        self.nonfinite |= (~torch.isfinite(logits)).flatten(1).any(1).cpu()
        if nonfinite is not None:
            self.nonfinite |= nonfinite.to(self.nonfinite.device)


#: The sums a :class:`Tally` keeps per candidate (float64, shape (K,)); ``n`` and ``nonfinite`` besides.
TALLY_SUMS = ("nll", "nll2", "top1", "topk", "diff", "diff2", "better", "worse")


def merge_tallies(parts: Sequence[Tally]) -> Tally:
    """The :class:`Tally` of the union of disjoint parts of the data (e.g. one per rank): examples and
    every per-candidate sum added, non-finite flags or-ed. Exact: each sum is a sum over examples (to
    float64 rounding of the order of addition). Parts must evaluate the same K candidates."""
    k = int(parts[0].nll.numel())
    out = Tally(k)
    for part in parts:
        if int(part.nll.numel()) != k:
            raise ValueError(f"tallies of {k} and {part.nll.numel()} candidates cannot be merged")
        out.n += part.n
        for name in TALLY_SUMS:
            setattr(out, name, getattr(out, name) + getattr(part, name).cpu())
        out.nonfinite |= part.nonfinite.cpu()
    return out


def merge_segmentation_tallies(parts: Sequence[SegmentationTally]) -> SegmentationTally:
    """The :class:`SegmentationTally` of the union of disjoint parts of the data: examples, labelled
    pixels, summed pixel cross-entropies and confusion matrices added (exact: integer counts), non-finite
    flags or-ed. Parts must share K candidates, the classes and the ignore index."""
    first = parts[0]
    k = int(first.nll.numel())
    out = SegmentationTally(k, first.num_classes, first.ignore_index, first.data_hint, first.output_key)
    for part in parts:
        if part.confusion.shape != out.confusion.shape or part.ignore_index != out.ignore_index:
            raise ValueError("segmentation tallies of other candidates, classes or ignore index")
        out.n += part.n
        out.pixels += part.pixels
        out.nll = out.nll + part.nll.cpu()
        out.confusion = out.confusion + part.confusion.cpu()
        out.nonfinite |= part.nonfinite.cpu()
    return out


def _merge_ranks(
    tally: Tally | SegmentationTally,
    metric: str,
    num_classes: int,
    top_k: int,
    strategy: str,
    notes: list[str],
) -> tuple[Tally | SegmentationTally, str, int, int, str, list[str]]:
    """Collective (under a process group): the tallies of every rank merged, with what the ranks that saw
    data learnt of the output (task, classes, top-k; a rank with an empty shard knows none of it), rank
    0's strategy (or the first rank with data) and every rank's notes."""
    from . import distributed

    if not distributed.active():
        return tally, metric, num_classes, top_k, strategy, notes
    every = distributed.all_gather((_to_cpu_tally(tally), metric, num_classes, top_k, strategy, notes))
    seen = [e for e in every if e[0].n > 0] or every[:1]
    kinds = {type(e[0]).__name__ for e in seen}
    if len(kinds) > 1:
        raise UsageError("the ranks' data gave outputs of different tasks (class labels and masks)")
    _, metric, num_classes, top_k, strategy, _ = seen[0]
    parts = [e[0] for e in seen]
    merged = (
        merge_segmentation_tallies(parts)  # type: ignore[arg-type]
        if isinstance(parts[0], SegmentationTally)
        else merge_tallies(parts)  # type: ignore[arg-type]
    )
    all_notes = list(dict.fromkeys(n for e in every for n in e[5]))
    return merged, metric, num_classes, top_k, strategy, all_notes


def _to_cpu_tally(tally: Tally | SegmentationTally) -> Tally | SegmentationTally:
    for name, value in vars(tally).items():
        if isinstance(value, Tensor):
            setattr(tally, name, value.cpu())
    return tally


class SegmentationTally:
    """Running sums per candidate for per-pixel logits, over the labelled pixels (mask value not
    ``ignore_index``): the summed pixel cross-entropy (log-softmax in float64) and a confusion matrix
    (rows: target class, columns: predicted class, int64; K x K per candidate whatever the data's size).

    :meth:`add` takes the logits of all K candidates for one piece, (K, m, classes, H, W), and its masks
    (m, H, W); alternatively :meth:`add_candidate` for each candidate's (m, classes, H, W), then
    :meth:`add_examples` once. Mask values must already be checked (:func:`check_masks`).
    """

    def __init__(
        self,
        k: int,
        num_classes: int,
        ignore_index: int,
        data_hint: str = "",
        output_key: str | int | None = None,
    ) -> None:
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.data_hint = data_hint
        self.output_key = output_key
        self.n = 0
        self.pixels = 0
        self.nll = torch.zeros(k, dtype=torch.float64)
        self.confusion = torch.zeros(k, self.num_classes, self.num_classes, dtype=torch.int64)
        self.nonfinite = torch.zeros(k, dtype=torch.bool)

    def add_candidate(self, i: int, logits: Tensor, y: Tensor) -> None:
        """Candidate ``i``'s per-pixel ``logits`` (m, classes, H, W) against masks ``y`` (m, H, W)."""
        logits = logits.detach()
        check_mask_size(tuple(logits.shape), tuple(y.shape), self.data_hint, self.output_key)
        y = y.to(logits.device)
        valid = y != self.ignore_index
        target = y[valid]  # (P,)
        flat = logits.movedim(1, -1)[valid]  # (P, classes)
        logp = torch.log_softmax(flat.to(torch.float64), dim=-1)
        self.nll[i] -= logp.gather(-1, target[:, None]).sum().cpu()
        c = self.num_classes
        pairs = target * c + flat.argmax(-1)
        self.confusion[i] += torch.bincount(pairs, minlength=c * c).reshape(c, c).cpu()
        self.nonfinite[i] |= not bool(torch.isfinite(logits).all())

    def add_examples(self, y: Tensor) -> None:
        """Count the examples and labelled pixels of masks ``y`` (once per piece, not per candidate)."""
        self.n += int(y.shape[0])
        self.pixels += int((y != self.ignore_index).sum())

    def add(self, logits: Tensor, y: Tensor, nonfinite: Tensor | None = None) -> None:
        """All K candidates' ``logits`` (K, m, classes, H, W) for masks ``y`` (m, H, W); ``nonfinite`` (K,)
        as for :meth:`Tally.add`."""
        for i in range(logits.shape[0]):
            self.add_candidate(i, logits[i], y)
        self.add_examples(y)
        if nonfinite is not None:
            self.nonfinite |= nonfinite.to(self.nonfinite.device)


@dataclass
class SweepRow:
    """The metrics of one candidate over the validation data.

    ``top1_ci95``/``top5_ci95`` are Wilson intervals; ``nll_se`` the standard error of the mean loss.
    ``nll_diff``/``top1_diff`` are paired differences from the EMA row over the same examples (the
    meaningful comparison: rows share their examples, so their own intervals overlap much more than the
    differences are uncertain), with normal-approximation 95% intervals.
    """

    label: str
    kind: str
    alpha: float | None
    beta: float | None
    nll: float
    top1: float
    top5: float
    n: int
    nll_se: float
    top1_ci95: tuple[float, float]
    top5_ci95: tuple[float, float]
    nll_diff: float
    nll_diff_ci95: tuple[float, float]
    top1_diff: float
    top1_diff_ci95: tuple[float, float]
    finite: bool = True
    candidate: Candidate = field(default_factory=lambda: Candidate("EMA"), repr=False, compare=False)
    #: "classification" or "segmentation". Segmentation rows have nll = pixel_nll, top1 = pixel_acc, top5
    #: NaN, and no intervals (NaN): the pixels of an image are not independent examples.
    task: str = "classification"
    pixel_nll: float | None = None
    pixel_acc: float | None = None
    miou: float | None = None
    #: IoU per class; None for a class absent from both the targets and the predictions
    iou: tuple[float | None, ...] | None = None
    n_pixels: int | None = None
    miou_diff: float | None = None

    def value(self, metric: str) -> float:
        """The row's value of ``metric`` (nll, top1, top5, pixel-nll, miou or pixel-acc; NaN when the row
        has none)."""
        v = getattr(self, _METRIC_FIELDS[check_metric(metric)])
        return math.nan if v is None else float(v)

    def segmentation_fields(self) -> dict[str, Any]:
        """The JSON fields only segmentation rows have (empty for classification rows)."""
        if self.task != "segmentation":
            return {}
        return {
            "pixel_nll": self.pixel_nll,
            "pixel_acc": self.pixel_acc,
            "miou": self.miou,
            "miou_diff_vs_ema": self.miou_diff,
            "iou_per_class": list(self.iou or ()),
            "n_pixels": self.n_pixels,
        }

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly (NaN becomes None). Segmentation rows add pixel_nll, pixel_acc, miou,
        miou_diff_vs_ema, iou_per_class and n_pixels."""
        extra = self.segmentation_fields()
        return _jsonable(
            {
                "label": self.label,
                "kind": self.kind,
                "alpha": self.alpha,
                "beta": self.beta,
                "nll": self.nll,
                "top1": self.top1,
                "top5": self.top5,
                "n": self.n,
                "nll_se": self.nll_se,
                "top1_ci95": list(self.top1_ci95),
                "top5_ci95": list(self.top5_ci95),
                "nll_diff_vs_ema": self.nll_diff,
                "nll_diff_vs_ema_ci95": list(self.nll_diff_ci95),
                "top1_diff_vs_ema": self.top1_diff,
                "top1_diff_vs_ema_ci95": list(self.top1_diff_ci95),
                "finite": self.finite,
                **extra,
            }
        )


_METRIC_FIELDS = {
    "nll": "nll",
    "top1": "top1",
    "top5": "top5",
    "pixel-nll": "pixel_nll",
    "miou": "miou",
    "pixel-acc": "pixel_acc",
}


def check_metric(metric: str) -> str:
    """``metric`` if it is one of :data:`METRICS` or :data:`SEGMENTATION_METRICS`, else
    :class:`UsageError`."""
    if metric not in METRICS + SEGMENTATION_METRICS:
        raise UsageError(
            f"--metric must be one of {', '.join(METRICS)} (classification) or "
            f"{', '.join(SEGMENTATION_METRICS)} (segmentation), got {metric!r}"
        )
    return metric


def task_metric(metric: str, task: str) -> str:
    """The metric a sweep of ``task`` chooses by when asked for ``metric``: for segmentation ``nll`` is
    ``pixel-nll`` (the same cross-entropy, per pixel; so the default works for both); :class:`UsageError`
    for a metric of the other task."""
    metric = check_metric(metric)
    if task == "segmentation":
        if metric == "nll":
            return "pixel-nll"
        if metric in METRICS:
            raise UsageError(
                f"--metric {metric} is a classification metric, but this is a segmentation sweep (masks y "
                "(N, H, W) against per-pixel logits (N, K, H, W))",
                hint=f"choose by {', '.join(SEGMENTATION_METRICS)}",
            )
    elif metric in SEGMENTATION_METRICS:
        raise UsageError(
            f"--metric {metric} is a segmentation metric, but this is a classification sweep (labels y (N,) "
            "against logits (N, classes))",
            hint=f"choose by {', '.join(METRICS)}; a segmentation sweep needs masks y of shape (N, H, W) and "
            "a model whose output (or its --output-key entry) is per-pixel logits (N, K, H, W)",
        )
    return metric


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _rank_key(row: SweepRow, metric: str) -> tuple[float, ...]:
    """Best first: the metric, then the other metrics as tie-breaks, then the smaller alpha (closer to BN)."""
    a = row.alpha if row.alpha is not None else math.inf
    b = row.beta if row.beta is not None else math.inf
    if metric == "nll":
        return (row.nll, -row.top1, -row.top5, a, b)
    if metric == "top1":
        return (-row.top1, row.nll, -row.top5, a, b)
    if metric == "top5":
        return (-row.top5, row.nll, -row.top1, a, b)
    nll, miou, acc = row.value("pixel-nll"), row.value("miou"), row.value("pixel-acc")
    if metric == "pixel-nll":
        return (nll, -miou, -acc, a, b)
    if metric == "miou":
        return (-miou, nll, -acc, a, b)
    return (-acc, nll, -miou, a, b)


@dataclass
class SweepResult:
    """All rows of a sweep, and the best global alpha per metric.

    The choice is made among the global candidates (one alpha and beta for every layer: EMA, the grid, the
    rule of thumb); per-layer candidates (e.g. a corrections file) are rows for comparison. ``notes`` are
    warnings for the user (the optimum at the edge of the grid, NaN outputs); ``strategy`` and
    ``strategy_notes`` say how the candidates were evaluated (stacked or not, and why).
    """

    metric: str
    rows: list[SweepRow]
    n_examples: int
    num_classes: int
    top_k: int
    strategy: str
    train_batch_size: int | None = None
    notes: list[str] = field(default_factory=list)
    strategy_notes: list[str] = field(default_factory=list)
    #: "classification" or "segmentation" (then also the ignore index and the number of labelled pixels)
    task: str = "classification"
    ignore_index: int | None = None
    n_pixels: int | None = None

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics of this sweep's task (:data:`METRICS` or :data:`SEGMENTATION_METRICS`)."""
        return SEGMENTATION_METRICS if self.task == "segmentation" else METRICS

    def best_row(self, metric: str | None = None) -> SweepRow:
        """The best global row for ``metric`` (default: the sweep's metric; :func:`task_metric`)."""
        metric = task_metric(metric or self.metric, self.task)
        rows = [r for r in self.rows if r.alpha is not None and r.finite and math.isfinite(r.value(metric))]
        if not rows:
            raise DataError("every candidate produced NaN/Inf outputs; nothing to choose")
        return min(rows, key=lambda r: _rank_key(r, metric))

    @property
    def best(self) -> SweepRow:
        """The chosen row: the best global row for :attr:`metric`."""
        return self.best_row()

    @property
    def ema(self) -> SweepRow:
        """The plain-BN row (alpha = beta = 0)."""
        return self.rows[0]

    def best_by_metric(self) -> dict[str, SweepRow]:
        """The best global row for each metric."""
        return {m: self.best_row(m) for m in self.metrics}

    def best_candidate(self, metric: str | None = None) -> Candidate:
        """The chosen candidate, to apply with ``correct_model(model, c.alpha, c.beta)``."""
        return self.best_row(metric).candidate

    def as_report(self) -> dict[str, Any]:
        """The JSON report (DESIGN §4 keys: metric, n_examples, best {alpha, nll, top1, top5}, rows), and
        ``task``; a segmentation report's rows and best add the segmentation values (:meth:`SweepRow.as_dict`)
        and the report ``ignore_index``, ``n_pixels`` and ``miou_convention``."""
        extra: dict[str, Any] = {}
        if self.task == "segmentation":
            extra = {
                "ignore_index": self.ignore_index,
                "n_pixels": self.n_pixels,
                "miou_convention": MIOU_CONVENTION,
            }
        return _jsonable(
            {
                "metric": self.metric,
                "n_examples": self.n_examples,
                "best": self.best.as_dict(),
                "best_by_metric": {m: r.as_dict() for m, r in self.best_by_metric().items()},
                "rows": [r.as_dict() for r in self.rows],
                "task": self.task,
                "num_classes": self.num_classes,
                "top_k": self.top_k,
                "train_batch_size": self.train_batch_size,
                "strategy": self.strategy,
                "notes": list(self.notes),
                "strategy_notes": list(self.strategy_notes),
                **extra,
            }
        )

    def table(self) -> Table:
        """A ``rich`` table of every row: the chosen one marked (◀, green), each metric's best in bold."""
        from rich.table import Table

        if self.task == "segmentation":
            return self._segmentation_table()
        best = self.best
        by_metric = self.best_by_metric()
        k = self.top_k
        show_beta = any(r.beta != r.alpha for r in self.rows if r.alpha is not None)
        n = self.n_examples
        table = Table(
            title=f"sweep-alpha: {n} labelled examples, chosen by {self.metric}",
            caption=(
                "top1: 95% Wilson interval. Δ: paired difference from EMA over the same examples, ± its 95% "
                f"interval. One example is {100.0 / max(1, n):.2g}% of top1."
                + ("" if k == 5 else f" top5 is top-{k}: the model has {self.num_classes} classes.")
            ),
        )
        table.add_column("")
        table.add_column("candidate")
        table.add_column("alpha", justify="right")
        if show_beta:
            table.add_column("beta", justify="right")
        table.add_column("nll", justify="right")
        table.add_column("Δnll", justify="right")
        table.add_column("top1 %", justify="right")
        table.add_column("Δtop1 %", justify="right")
        table.add_column(f"top{k} %", justify="right")

        def num(v: float | None, fmt: str) -> str:
            return "-" if v is None else ("nan" if not math.isfinite(v) else format(v, fmt))

        for row in self.rows:
            marks = {m for m, r in by_metric.items() if r is row}

            def bold(text: str, metric: str, marks: set[str] = marks) -> str:
                return f"[bold]{text}[/bold]" if metric in marks else text

            is_ema = row is self.ema
            d_half = (row.nll_diff_ci95[1] - row.nll_diff_ci95[0]) / 2
            t_half = (row.top1_diff_ci95[1] - row.top1_diff_ci95[0]) / 2
            lo, hi = row.top1_ci95
            cells = [
                "◀" if row is best else "",
                "" if row.label.startswith("alpha=") else row.label,
                num(row.alpha, ".4g"),
                *([num(row.beta, ".4g")] if show_beta else []),
                bold(num(row.nll, ".4f"), "nll"),
                "" if is_ema else f"{row.nll_diff:+.4f} ±{d_half:.4f}",
                bold(f"{100 * row.top1:.2f} [{100 * lo:.1f}, {100 * hi:.1f}]", "top1"),
                "" if is_ema else f"{100 * row.top1_diff:+.2f} ±{100 * t_half:.2f}",
                bold(f"{100 * row.top5:.2f}", "top5"),
            ]
            table.add_row(*cells, style="green" if row is best else None)
        return table

    def _segmentation_table(self) -> Table:
        from rich.table import Table

        best = self.best
        by_metric = self.best_by_metric()
        show_beta = any(r.beta != r.alpha for r in self.rows if r.alpha is not None)
        table = Table(
            title=f"sweep-alpha: {self.n_examples} labelled images ({self.n_pixels} pixels), chosen by "
            f"{self.metric}",
            caption=(
                f"Pixels with mask value {self.ignore_index} are ignored. mIoU: mean over the classes "
                "present in the targets or the predictions of TP / (TP + FP + FN) over all pixels. Δ: "
                "difference from EMA. No intervals: the pixels of an image are not independent."
            ),
        )
        table.add_column("")
        table.add_column("candidate")
        table.add_column("alpha", justify="right")
        if show_beta:
            table.add_column("beta", justify="right")
        for col in ("pixel-nll", "Δpixel-nll", "mIoU %", "ΔmIoU %", "pixel acc %"):
            table.add_column(col, justify="right")

        def num(v: float | None, fmt: str, scale: float = 1.0) -> str:
            return "-" if v is None else ("nan" if not math.isfinite(v) else format(scale * v, fmt))

        for row in self.rows:
            marks = {m for m, r in by_metric.items() if r is row}

            def bold(text: str, metric: str, marks: set[str] = marks) -> str:
                return f"[bold]{text}[/bold]" if metric in marks else text

            is_ema = row is self.ema
            cells = [
                "◀" if row is best else "",
                "" if row.label.startswith("alpha=") else row.label,
                num(row.alpha, ".4g"),
                *([num(row.beta, ".4g")] if show_beta else []),
                bold(num(row.pixel_nll, ".4f"), "pixel-nll"),
                "" if is_ema else num(row.nll_diff, "+.4f"),
                bold(num(row.miou, ".2f", 100.0), "miou"),
                "" if is_ema else num(row.miou_diff, "+.2f", 100.0),
                bold(num(row.pixel_acc, ".2f", 100.0), "pixel-acc"),
            ]
            table.add_row(*cells, style="green" if row is best else None)
        return table


#: How mIoU is computed, for reports.
MIOU_CONVENTION = (
    "one confusion matrix per candidate over all pixels whose mask value is not the ignore index; IoU_c = "
    "TP_c / (TP_c + FP_c + FN_c); miou is the mean over the classes present in the targets or the "
    "predictions (a class absent from both has iou_per_class null and is left out)"
)


def segmentation_rows(candidates: Sequence[Candidate], tally: SegmentationTally) -> list[SweepRow]:
    """One segmentation :class:`SweepRow` per candidate of a finished (already merged) ``tally``: pixel-nll,
    pixel accuracy, mIoU (:data:`MIOU_CONVENTION`) and IoU per class, differences from the first row."""
    n, pixels = tally.n, tally.pixels
    cm = tally.confusion.to(torch.float64)
    tp = cm.diagonal(dim1=1, dim2=2)  # (K, classes)
    union = cm.sum(2) + cm.sum(1) - tp  # targets + predictions - both: TP + FN + FP
    nan2 = (math.nan, math.nan)
    rows: list[SweepRow] = []
    for i, cand in enumerate(candidates):
        pixel_nll = float(tally.nll[i]) / pixels
        acc = float(tp[i].sum()) / pixels
        present = union[i] > 0
        iou = tuple(float(tp[i, c] / union[i, c]) if bool(present[c]) else None for c in range(len(present)))
        miou = float((tp[i][present] / union[i][present]).mean())
        ema = rows[0] if rows else None
        rows.append(
            SweepRow(
                label=cand.label,
                kind=cand.kind,
                alpha=cand.alpha_value,
                beta=cand.beta_value,
                nll=pixel_nll,
                top1=acc,
                top5=math.nan,
                n=n,
                nll_se=math.nan,
                top1_ci95=nan2,
                top5_ci95=nan2,
                nll_diff=pixel_nll - (ema.nll if ema else pixel_nll),
                nll_diff_ci95=nan2,
                top1_diff=acc - (ema.top1 if ema else acc),
                top1_diff_ci95=nan2,
                finite=not bool(tally.nonfinite[i]) and math.isfinite(pixel_nll),
                candidate=cand,
                task="segmentation",
                pixel_nll=pixel_nll,
                pixel_acc=acc,
                miou=miou,
                iou=iou,
                n_pixels=pixels,
                miou_diff=miou - (ema.value("miou") if ema else miou),
            )
        )
    return rows


def _rows(candidates: Sequence[Candidate], tally: Tally, top_k: int) -> list[SweepRow]:
    n = tally.n
    rows = []
    for i, cand in enumerate(candidates):
        mean = float(tally.nll[i]) / n
        var = max(0.0, float(tally.nll2[i]) / n - mean * mean) * n / max(1, n - 1)
        dmean = float(tally.diff[i]) / n
        dvar = max(0.0, float(tally.diff2[i]) / n - dmean * dmean) * n / max(1, n - 1)
        dhalf = _Z95 * math.sqrt(dvar / n)
        b, w = float(tally.better[i]), float(tally.worse[i])
        t_diff = (b - w) / n
        t_half = _Z95 * math.sqrt(max(0.0, (b + w) - (b - w) ** 2 / n)) / n
        top1, topk = int(tally.top1[i]), int(tally.topk[i])
        rows.append(
            SweepRow(
                label=cand.label,
                kind=cand.kind,
                alpha=cand.alpha_value,
                beta=cand.beta_value,
                nll=mean,
                top1=top1 / n,
                top5=topk / n,
                n=n,
                nll_se=math.sqrt(var / n),
                top1_ci95=binomial_ci95(top1, n),
                top5_ci95=binomial_ci95(topk, n),
                nll_diff=dmean,
                nll_diff_ci95=(dmean - dhalf, dmean + dhalf),
                top1_diff=t_diff,
                top1_diff_ci95=(t_diff - t_half, t_diff + t_half),
                finite=not bool(tally.nonfinite[i]) and math.isfinite(mean),
                candidate=cand,
            )
        )
    return rows


def sweep_alpha(
    model: nn.Module,
    batches: Iterable[Batch],
    alphas: Sequence[float] | None = None,
    *,
    beta_mode: BetaMode = "equal",
    train_batch_size: int | None = None,
    extra_candidates: Sequence[Candidate] = (),
    metric: str = "nll",
    output_key: str | int | None = None,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    forward_fn: ForwardFn | None = None,
    device: str | torch.device | None = "cpu",
    stack: bool | Literal["auto"] = True,
    share_prefix: bool = True,
    stack_rows: int | None = None,
    total_examples: int | None = None,
    progress: Progress | None = None,
    data_hint: str = "",
) -> SweepResult:
    """Evaluate every candidate correction on labelled ``batches`` and choose the best alpha for ``metric``.

    ``batches``: an iterable of ``(x, y)`` (or ``(x1, ..., y)`` with a ``forward_fn``; or dicts with a
    ``y``/``label``/``labels``/``target`` entry), ``y`` integer class labels; it is iterated once. The model
    returns logits (N, classes), or a tuple/dict from which ``output_key`` picks them. The candidates are
    :func:`build_candidates` of ``alphas`` (default :func:`default_alphas`), ``beta_mode``,
    ``train_batch_size`` (adds alpha = beta = 1/B^2) and ``extra_candidates``; alpha = 0 (EMA) is always
    evaluated. nll is the mean cross-entropy (log-softmax in float64), top1/top5 accuracies (top-k with k
    capped at the number of classes).

    Segmentation: with masks ``y`` (N, H, W) and per-pixel logits (N, K, H, W) of the same size (e.g.
    ``output_key="out"`` for torchvision segmentation models) the metrics are pixel-nll, miou and pixel-acc
    (:data:`SEGMENTATION_METRICS`; ``metric="nll"`` means pixel-nll), over the pixels whose mask value is
    not ``ignore_index`` (module docstring: the mIoU convention); mask values must be 0..K-1 or
    ``ignore_index``. Each batch is evaluated in pieces of at most about :data:`DENSE_PIECE_BYTES` of
    logits. A model returning object detections (a list of per-image dicts) is a :class:`UsageError`: there
    is no detection metric.

    Evaluation strategy (results agree to float rounding; see the module docstring): ``stack=True``
    evaluates the K candidates in one stacked forward per piece of at most ``stack_rows`` rows (K x
    examples), after checking on the first batch that this reproduces one candidate at a time (falling back
    otherwise); ``share_prefix`` first tries letting the first BN layer fan the batch out. This is the
    default, the fastest measured. ``stack=False`` runs one candidate at a time; ``stack="auto"`` times
    both on the first batches and keeps the faster. With ``stack_rows=None`` the size of a pass is chosen
    for the device: on CPU so that the largest BN input of a pass is about :data:`CPU_PASS_BYTES` (also for
    one candidate at a time; a single candidate always runs on the batches as given), on GPUs up to 8192
    rows within half the free memory.
    ``model`` itself is not modified (the sweep runs on a deep copy).

    Raises DataError for unlabelled data, labels outside the model's classes (masks: neither a class nor
    ``ignore_index``), labels that do not go with the output (masks for (N, classes) logits, class labels
    for per-pixel logits, masks of another spatial size) or an empty iterable, UsageError for bad options,
    outputs or a metric of the other task, NoBatchNormError for a model without correctable BN layer.
    NaN/Inf with plain BN (the EMA row: NaN/Inf logits, or NaN/Inf at a BN layer's input or in its
    per-example statistics, e.g. values whose variance overflows float32) mean the model or the data is
    broken: :class:`NumericalError` naming the first BN layer at fault and the data. A corrected row that
    alone meets NaN/Inf (in its logits or its BN statistics) stays in the result marked ``finite=False``,
    is never chosen, and is named in :attr:`SweepResult.notes`.
    """
    metric = check_metric(metric)
    if stack_rows is not None and (isinstance(stack_rows, bool) or int(stack_rows) < 1):
        raise UsageError(f"stack_rows must be a positive integer, got {stack_rows!r}")
    candidates = build_candidates(
        alphas, beta_mode=beta_mode, train_batch_size=train_batch_size, extra=extra_candidates
    )
    dev = resolve_device(device)
    if stack not in (True, False, "auto"):
        raise UsageError(f"stack must be True, False or 'auto', got {stack!r}")
    work = copy.deepcopy(model)
    correct_model(work, 0.0)  # NoBatchNormError when there is nothing to correct
    wrapped = corrected_layers(work)
    tables = resolve_tables(candidates, wrapped)
    layers: dict[str, _SweepNorm] = {}
    for name, cn in wrapped.items():
        layer = _SweepNorm(cn.norm, tables[name])
        parent_name, _, child = name.rpartition(".")
        setattr(work.get_submodule(parent_name) if parent_name else work, child, layer)
        layers[name] = layer
    work.to(dev).eval()
    rows_per_pass = None if stack_rows is None else int(stack_rows)
    evaluator = _Evaluator(
        work, layers, len(candidates), forward_fn, dev, output_key, rows_per_pass, data_hint
    )
    ignore_index = check_ignore_index(ignore_index)
    tally: Tally | SegmentationTally = Tally(len(candidates))
    num_classes = top_k = 0
    task = "classification"
    piece_rows = 0  # per-pixel outputs: examples per evaluated piece
    first = True
    out_shape: tuple[int, ...] = ()

    def run(piece: Batch, m: int) -> tuple[Tensor, Tensor]:
        """Every candidate's logits for ``piece`` of ``m`` examples, and which of them met NaN/Inf."""
        timed = evaluator.auto
        if timed:
            _synchronize(dev)
        started = time.perf_counter()
        logits = evaluator.evaluate(piece, m)
        if timed:
            _synchronize(dev)
            evaluator.record(time.perf_counter() - started, m)
        bad = evaluator.nonfinite(logits)
        if bool(bad[0]):  # plain BN itself meets NaN/Inf: the model or the data is broken
            raise evaluator.explain_ema(piece)
        return logits, bad

    failure: Exception | None = None  # under a process group: raised on every rank after the loop
    try:
        for batch in batches:
            rows = batch_size_of(batch)
            if rows == 0:
                continue
            y = batch_labels(batch, rows, data_hint)
            batch = map_batch(batch, lambda t: t.to(dev, non_blocking=True))
            if first:
                reference = evaluator.choose_mode(batch, rows, stack, share_prefix)
                out_shape = tuple(reference.shape[1:])
                task = output_task(out_shape, y, data_hint, output_key)
                metric = task_metric(metric, task)
                if task == "segmentation":
                    num_classes = int(reference.shape[2])
                    top_k = 1
                    per_example = len(candidates) * reference[0, 0].numel() * reference.element_size()
                    piece_rows = max(1, DENSE_PIECE_BYTES // per_example)
                    tally = SegmentationTally(
                        len(candidates), num_classes, ignore_index, data_hint, output_key
                    )
                else:
                    num_classes = int(reference.shape[-1])
                    top_k = min(5, num_classes)
                first = False
            if isinstance(tally, SegmentationTally):
                if y.dim() != 3:
                    output_task((rows, *out_shape[1:]), y, data_hint, output_key)  # raises: not masks
                check_masks(y, num_classes, ignore_index, data_hint, output_key)
                masks = y.to(dev, non_blocking=True)
                for start in range(0, rows, piece_rows):
                    stop = min(rows, start + piece_rows)
                    whole = (start, stop) == (0, rows)
                    logits, bad = run(batch if whole else _slice(batch, rows, start, stop), stop - start)
                    tally.add(logits, masks[start:stop], bad)
            else:
                if y.dim() != 1:
                    output_task((rows, *out_shape[1:]), y, data_hint, output_key)  # raises: masks
                check_labels(y, num_classes, data_hint, output_key)
                logits, bad = run(batch, rows)
                tally.add(logits, y, top_k, bad)
            if progress is not None:
                progress("sweep-alpha", tally.n, total_examples)
    except Exception as e:  # re-raised below (on every rank under a process group)
        failure = e
    from .distributed import raise_if_failed

    raise_if_failed(failure)
    strategy = evaluator.mode
    if evaluator.auto:  # too few batches to finish timing both modes: both were used
        strategy = " / ".join(evaluator.timing)
        evaluator.notes.append(f"auto: {strategy} alternated (too few batches to time both)")
    return sweep_result(
        candidates,
        tally,
        metric=metric,
        num_classes=num_classes,
        top_k=top_k,
        strategy=strategy,
        train_batch_size=train_batch_size,
        notes=evaluator.notes,
        data_hint=data_hint,
    )


def check_ignore_index(value: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        return int(operator.index(value))
    except TypeError:
        raise UsageError(
            f"--ignore-index must be an integer, got {value!r}",
            hint="the mask value of unlabelled pixels, e.g. --ignore-index 255 (VOC, Cityscapes)",
        ) from None


def sweep_result(
    candidates: Sequence[Candidate],
    tally: Tally | SegmentationTally,
    *,
    metric: str,
    num_classes: int,
    top_k: int,
    strategy: str,
    train_batch_size: int | None,
    notes: list[str],
    data_hint: str = "",
) -> SweepResult:
    """The :class:`SweepResult` of a finished sweep, whatever ran the candidates (PyTorch here, onnxruntime
    in :func:`bncorrect.onnx_passes.sweep_onnx`): one row per candidate from ``tally`` (a
    :class:`SegmentationTally` makes a segmentation result), ``notes`` plus notes on non-finite outputs and
    on a best alpha at the grid's upper edge. :class:`DataError` when the data held no examples (or, for
    segmentation, no labelled pixel)."""
    tally, metric, num_classes, top_k, strategy, notes = _merge_ranks(
        tally, metric, num_classes, top_k, strategy, notes
    )
    if tally.n == 0:
        raise DataError("the data holds no examples", path=data_hint or None, hint="give labelled examples")
    if isinstance(tally, SegmentationTally):
        if tally.pixels == 0:
            raise DataError(
                f"every mask pixel is the ignore index {tally.ignore_index}: there is nothing to score",
                path=data_hint or None,
                hint="check the masks, or pass the value that marks unlabelled pixels with --ignore-index",
            )
        result = SweepResult(
            task_metric(metric, "segmentation"),
            segmentation_rows(candidates, tally),
            tally.n,
            num_classes,
            top_k,
            strategy,
            train_batch_size,
            [],
            notes,
            task="segmentation",
            ignore_index=tally.ignore_index,
            n_pixels=tally.pixels,
        )
    else:
        result = SweepResult(
            metric,
            _rows(candidates, tally, top_k),
            tally.n,
            num_classes,
            top_k,
            strategy,
            train_batch_size,
            [],
            notes,
        )
    _add_notes(result)
    return result


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_labels(y: Tensor, num_classes: int, data_hint: str, output_key: str | int | None) -> None:
    """:class:`DataError` when a label lies outside the model's ``num_classes`` class scores."""
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise DataError(
            f"label {bad} is outside the model's output range: the model gives {num_classes} class scores "
            f"(labels 0..{num_classes - 1})",
            path=data_hint or None,
            hint="check that the data's classes match the model's (e.g. the number of class sub-folders"
            + (")" if output_key is not None else "), or pick the classification output with --output-key"),
        )


def output_task(
    shape: Sequence[int], y: Tensor, data_hint: str = "", output_key: str | int | None = None
) -> str:
    """``"classification"`` (logits (N, classes), labels (N,)) or ``"segmentation"`` (per-pixel logits
    (N, K, H, W), masks (N, H, W) of the same H, W) for a model output of ``shape`` and labels ``y``;
    :class:`DataError` when they do not go together."""
    chosen = "" if output_key is None else f" (--output-key {output_key})"
    dense, masks = len(shape) == 4, y.dim() == 3
    if dense and masks:
        check_mask_size(shape, tuple(y.shape), data_hint, output_key)
        return "segmentation"
    if not dense and not masks:
        return "classification"
    if masks:
        raise DataError(
            f"the labels are masks (y of shape {tuple(y.shape)}), but the model's output{chosen} has shape "
            f"{tuple(shape)}: one row of class scores per example; a segmentation sweep needs per-pixel "
            "logits (N, K, H, W)",
            path=data_hint or None,
            hint="for a model with several outputs pick its per-pixel logits with --output-key (torchvision "
            "segmentation models: --output-key out); for a classifier store one class index per example, y "
            "of shape (N,)",
        )
    raise DataError(
        f"the model's output{chosen} is per-pixel maps of shape {tuple(shape)}, but y holds one class label "
        f"per example (shape {tuple(y.shape)}); a segmentation sweep needs masks y of shape (N, "
        f"{shape[2]}, {shape[3]})",
        path=data_hint or None,
        hint="store masks of class indices (the ignore index, default 255, for unlabelled pixels), shape "
        "(N, H, W), as y; or pick the model's classification output with --output-key"
        + (
            "; a classifier whose logits come as (N, classes, 1, 1) needs them flattened, e.g. "
            "forward_fn=lambda m, b: m(b[0]).flatten(1) in the Python API"
            if tuple(shape[2:]) == (1, 1)
            else ""
        ),
    )


def check_mask_size(
    shape: Sequence[int], mask_shape: Sequence[int], data_hint: str = "", output_key: str | int | None = None
) -> None:
    """:class:`DataError` unless per-pixel logits of ``shape`` (m, K, H, W) and masks of ``mask_shape``
    (m, H, W) have the same spatial size."""
    if tuple(shape[2:]) == tuple(mask_shape[1:]):
        return
    chosen = "" if output_key is None else f" (--output-key {output_key})"
    h, w = shape[2], shape[3]
    raise DataError(
        f"the model's per-pixel logits{chosen} are {h}x{w} (output {tuple(shape)}) but the masks y are "
        f"{mask_shape[1]}x{mask_shape[2]}: sweep-alpha scores every pixel and needs both at the same size",
        path=data_hint or None,
        hint="store the masks at the output's resolution (resize them with nearest-neighbour "
        "interpolation, never bilinear), or let the model upsample its logits to the input size (as "
        "torchvision segmentation models do: F.interpolate(logits, size=x.shape[-2:], mode='bilinear'))",
    )


def check_masks(
    y: Tensor, num_classes: int, ignore_index: int, data_hint: str, output_key: str | int | None
) -> None:
    """:class:`DataError` when a mask value is neither a class index 0..num_classes-1 nor ``ignore_index``."""
    bad = (y != ignore_index) & ((y < 0) | (y >= num_classes))
    if not bool(bad.any()):
        return
    values = torch.unique(y[bad]).tolist()
    shown = ", ".join(map(str, values[:6])) + (" ..." if len(values) > 6 else "")
    fix = "check that the masks' classes match the model's"
    if len(values) == 1:
        fix += f"; if {values[0]} marks unlabelled pixels, pass --ignore-index {values[0]}"
    if output_key is None:
        fix += "; for a model with several outputs pick the segmentation logits with --output-key"
    what = f"mask values {shown} are" if len(values) > 1 else f"mask value {shown} is"
    raise DataError(
        f"{what} outside the model's classes and not the ignore index {ignore_index}: the model gives"
        f" {num_classes} class scores per pixel (classes 0..{num_classes - 1})",
        path=data_hint or None,
        hint=fix,
    )


def ema_outputs_error(data_hint: str) -> NumericalError:
    """The error for plain BN (EMA) logits that are NaN/Inf while every BN layer is fine."""
    on = f" on {data_hint}" if data_hint else ""
    return NumericalError(
        f"the model's outputs are NaN/Inf with plain BN (EMA statistics, alpha = 0){on}, although the inputs "
        "and outputs of its BN layers are finite",
        path=data_hint or None,
        hint="the non-finite values arise in other operations of the model (e.g. a log, a division or an "
        "exp): check the data's range and preprocessing (values, --mean/--std) and the model",
    )


def _add_notes(result: SweepResult) -> None:
    bad = [r.label for r in result.rows if not r.finite]
    if bad:
        result.notes.append(
            f"NaN/Inf in the outputs or BN statistics of {', '.join(bad)}: "
            f"{'this row is' if len(bad) == 1 else 'these rows are'} shown but never chosen"
        )
    grid = [r.alpha for r in result.rows if r.alpha is not None and "grid" in r.kind.split("+")]
    if len(grid) >= 2:
        top = max(a for a in grid if a is not None)
        at_edge = [m for m, row in result.best_by_metric().items() if row.alpha == top]
        if at_edge and top < 1.0:
            result.notes.append(
                f"the best alpha for {', '.join(at_edge)} is the largest one tried ({top:g}); the optimum "
                f"may lie beyond it: extend the grid, e.g. --alpha-range {top:g}:1:11"
            )


# ---------------------------------------------------------------------------------------------- files
def write_report(result: SweepResult, path: str | Path) -> Path:
    """Write :meth:`SweepResult.as_report` as JSON to ``path``, atomically (nothing half-written)."""
    from .atomic import write_json

    return write_json(result.as_report(), path)


def plot_sweep(
    result: SweepResult, path: str | Path, *, size: tuple[float, float] = (8.0, 8.0), dpi: int = 100
) -> Path:
    """Plot nll, top1 and top5 (segmentation: pixel-nll, miou, pixel-acc) against alpha (one panel each) to a
    PNG of ``size`` inches at ``dpi`` (800 x 800 pixels by default), with the EMA baseline, the rule of
    thumb, the chosen point and any per-layer candidates marked; top1 with its 95% band. Headless (Agg),
    written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    from .atomic import atomic_path, check_output

    w, h = (float(v) for v in size)
    if not (w > 0 and h > 0 and int(dpi) > 0):
        raise UsageError(f"plot size {size} at {dpi} dpi must be positive")
    path = check_output(path)
    fig = Figure(figsize=(w, h), dpi=int(dpi))
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, sharex=True)
    curve = sorted(
        (r for r in result.rows if r.alpha is not None and "grid" in r.kind.split("+")),
        key=lambda r: r.alpha or 0.0,
    )
    ema, best = result.ema, result.best
    rule = [r for r in result.rows if "rule" in r.kind.split("+")]
    extras = [r for r in result.rows if r.alpha is None]
    names = {
        "nll": "nll (mean cross-entropy)",
        "top1": "top1 accuracy",
        "top5": f"top{result.top_k} accuracy",
        "pixel-nll": "pixel-nll (per-pixel cross-entropy)",
        "miou": "mIoU",
        "pixel-acc": "pixel accuracy",
    }
    for ax, metric in zip(axes, result.metrics, strict=True):
        xs = [r.alpha for r in curve]
        if curve:
            ax.plot(xs, [r.value(metric) for r in curve], "o-", color="C0", ms=4, label="global alpha")
        if metric == "top1" and curve:
            ax.fill_between(
                xs,
                [r.top1_ci95[0] for r in curve],
                [r.top1_ci95[1] for r in curve],
                color="C0",
                alpha=0.15,
                label="top1 95% interval",
            )
        ax.axhline(ema.value(metric), color="0.4", ls="--", lw=1, label="EMA (alpha = 0)")
        for r in rule:
            ax.plot([r.alpha], [r.value(metric)], "^", color="C2", ms=8, label=r.label)
        for i, r in enumerate(extras):
            ax.axhline(r.value(metric), color=f"C{3 + i % 6}", ls=":", lw=1.5, label=r.label)
        opt = result.best_row(metric)
        ax.plot(
            [opt.alpha], [opt.value(metric)], "s", mfc="none", mec="C1", ms=10, label="best for the panel"
        )
        if metric == result.metric:
            ax.plot([best.alpha], [best.value(metric)], "*", color="C3", ms=14, label="chosen")
        ax.set_ylabel(names[metric])
        ax.grid(True, alpha=0.3)
    xs_all = [r.alpha for r in result.rows if r.alpha is not None and r.alpha > 0]
    if xs_all and max(xs_all) / min(xs_all) >= 20:  # dense near 0: linear up to the smallest alpha, then log
        axes[-1].set_xscale("symlog", linthresh=min(xs_all), linscale=0.5)
        axes[-1].xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axes[-1].set_xlabel("alpha (inference example weight, all BN layers)")
    handles, labels = [], []
    for ax in axes:
        for hd, lb in zip(*ax.get_legend_handles_labels(), strict=True):
            if lb not in labels:
                handles.append(hd)
                labels.append(lb)
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=4, frameon=False)
    fig.subplots_adjust(left=0.11, right=0.97, top=0.93, bottom=0.11 + 0.025 * math.ceil(len(labels) / 4))
    name = "" if best.label.startswith("alpha=") else f"{best.label}, "
    fig.suptitle(
        f"sweep-alpha on {result.n_examples} examples; chosen by {result.metric}: "
        f"{name}alpha = {best.alpha:g}, beta = {best.beta:g}",
        fontsize=10,
    )
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=int(dpi))
    return path
