"""How far eval-mode normalization is from training-mode normalization, per BN layer (``diagnose``).

One pass over the data with training-mode normalization in groups of B (as in :mod:`bncorrect.estimation`:
deep copy, ``torch.no_grad``, dropout in eval). At every BN layer, with ``x`` its input::

    train = (x - mu_B) / sqrt(var_B + eps)           what training produced (groups of B examples)
    eval  = (x - mu_E) / sqrt(var_E + eps)           what plain inference produces
    corr  = (x - mu_hat) / sqrt(var_hat + eps)       with a corrections file's alpha/beta, if given

and it reports mean |train - eval| (and |train - corr|), the ratio of the ranges (max - min) of eval and
train outputs, and how often eval outputs fall outside the training-time bound of Four Things, Appendix A:
a training-mode output lies in [-sqrt(m - 1), sqrt(m - 1)] for m values per channel and group (m = B for
(N, C) inputs, B times the spatial size for convolutional BN), so an eval output outside it is something the
network never saw in training. A second pass (only for plots) collects one channel's three distributions,
as in EvalNorm's figure 1.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import correction as C
from . import distributed
from .errors import NumericalError, UsageError
from .health import STATS_HINT, statistics_problem
from .layers import batch_statistics_layers, correct_model, corrected_layers
from .passes import (
    Batch,
    ForwardFn,
    Observer,
    Progress,
    require_examples,
    resolve_device,
    training_mode_pass,
)

HISTOGRAM_VALUES = 200_000


@dataclass
class LayerDiagnosis:
    """Discrepancy numbers for one layer over the whole pass."""

    name: str
    l1_eval: float
    l1_corrected: float | None
    range_ratio: float
    bound: float
    outside_bound: float
    per_channel_l1: list[float] = field(repr=False, default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "l1_eval": self.l1_eval,
            "l1_corrected": self.l1_corrected,
            "range_ratio": self.range_ratio,
            "bound": self.bound,
            "outside_bound": self.outside_bound,
        }


class DiscrepancyMeter:
    """Streaming accumulators for one layer (plain tensors in, numbers out)."""

    def __init__(self, channels: int) -> None:
        self.count = 0
        self.l1_eval = torch.zeros(channels, dtype=torch.float64)
        self.l1_corr = torch.zeros(channels, dtype=torch.float64)
        self.has_corr = False
        self.eval_min, self.eval_max = math.inf, -math.inf
        self.train_min, self.train_max = math.inf, -math.inf
        self.outside = 0
        self.bound = math.inf

    def add(self, train: Tensor, evaluated: Tensor, corrected: Tensor | None, values_per_group: int) -> None:
        dims = (0, *range(2, train.dim()))
        self.count += train.numel() // train.shape[1]
        self.l1_eval += (train - evaluated).abs().sum(dims).double().cpu()
        if corrected is not None:
            self.has_corr = True
            self.l1_corr += (train - corrected).abs().sum(dims).double().cpu()
        self.eval_min = min(self.eval_min, float(evaluated.min()))
        self.eval_max = max(self.eval_max, float(evaluated.max()))
        self.train_min = min(self.train_min, float(train.min()))
        self.train_max = max(self.train_max, float(train.max()))
        self.bound = math.sqrt(max(values_per_group - 1, 0))
        self.outside += int((evaluated.abs() > self.bound).sum())

    def check(self, name: str, norm: nn.Module, data_hint: str = "") -> None:
        """:class:`NumericalError` naming layer ``name`` (and the data) when a sum went NaN/Inf: plain eval
        normalization (``norm``'s running statistics) or the corrected one gave non-finite values."""
        on = f" on {data_hint}" if data_hint else ""
        if not bool(torch.isfinite(self.l1_eval).all()):
            weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
            broken = statistics_problem(norm.running_mean, norm.running_var, weight, bias)
            raise NumericalError(
                f"eval-mode normalization of layer {name} gives NaN/Inf values{on}"
                + (f": {broken}" if broken else " although its input is finite"),
                path=data_hint or None,
                hint=STATS_HINT
                if broken
                else "check the checkpoint's statistics and parameters (`bncorrect inspect MODEL`)",
            )
        if self.has_corr and not bool(torch.isfinite(self.l1_corr).all()):
            raise NumericalError(
                f"the corrected normalization of layer {name} gives NaN/Inf values{on} with the corrections' "
                "alpha/beta",
                path=data_hint or None,
                hint="check the corrections file (made for this model? `bncorrect inspect MODEL`) and the "
                "checkpoint's statistics",
            )

    def result(self, name: str) -> LayerDiagnosis:
        per_channel = self.l1_eval / max(self.count, 1)
        span_train = self.train_max - self.train_min
        total = self.count * per_channel.numel()
        return LayerDiagnosis(
            name=name,
            l1_eval=float(per_channel.mean()),
            l1_corrected=float((self.l1_corr / max(self.count, 1)).mean()) if self.has_corr else None,
            range_ratio=(self.eval_max - self.eval_min) / span_train if span_train > 0 else math.inf,
            bound=self.bound,
            outside_bound=self.outside / max(total, 1),
            per_channel_l1=per_channel.tolist(),
        )


def merge_meters(parts: Sequence[DiscrepancyMeter]) -> DiscrepancyMeter:
    """The :class:`DiscrepancyMeter` of the union of disjoint parts of the data (e.g. one per rank):
    counts and L1 sums added, ranges widened, the bound of the parts that saw data (the same B and
    spatial size everywhere). Exact to float64 rounding of the order of addition."""
    out = DiscrepancyMeter(int(parts[0].l1_eval.numel()))
    for part in parts:
        out.count += part.count
        out.l1_eval = out.l1_eval + part.l1_eval.cpu()
        out.l1_corr = out.l1_corr + part.l1_corr.cpu()
        out.has_corr = out.has_corr or part.has_corr
        out.eval_min, out.eval_max = min(out.eval_min, part.eval_min), max(out.eval_max, part.eval_max)
        out.train_min, out.train_max = min(out.train_min, part.train_min), max(out.train_max, part.train_max)
        out.outside += part.outside
        if part.count:
            out.bound = part.bound
    return out


@dataclass
class Histogram:
    """One channel's normalized values in training mode, plain eval and corrected eval."""

    layer: str
    channel: int
    train: Tensor
    evaluated: Tensor
    corrected: Tensor | None


@dataclass
class Diagnosis:
    layers: list[LayerDiagnosis]
    train_batch_size: int
    examples: int
    recommendation: str
    histogram: Histogram | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "train_batch_size": self.train_batch_size,
            "examples": self.examples,
            "recommendation": self.recommendation,
            "layers": [ly.as_dict() for ly in self.layers],
            "histogram": None
            if self.histogram is None
            else {"layer": self.histogram.layer, "channel": self.histogram.channel},
        }


def _normalized(
    x: Tensor,
    mu_i: Tensor,
    var_i: Tensor,
    mu_b: Tensor,
    var_b: Tensor,
    norm: nn.Module,
    coeffs: tuple[Tensor, Tensor] | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    eps = float(norm.eps)
    dt = mu_i.dtype
    rm, rv = norm.running_mean.to(dt), norm.running_var.to(dt)
    train = C.normalize(x, mu_b, var_b, eps).to(dt)
    evaluated = C.normalize(x, rm, rv, eps).to(dt)
    corrected = None
    if coeffs is not None:
        mu_hat, var_hat = C.corrected_stats(mu_i, var_i, rm, rv, coeffs[0].to(dt), coeffs[1].to(dt))
        corrected = C.normalize(x, mu_hat, var_hat, eps).to(dt)
    return train, evaluated, corrected


def diagnose_model(
    model: nn.Module,
    batches: Iterable[Batch],
    train_batch_size: int,
    *,
    corrections: Mapping[str, tuple[Tensor, Tensor]] | None = None,
    histogram: bool | str = False,
    forward_fn: ForwardFn | None = None,
    device: str | torch.device | None = "cpu",
    total_examples: int | None = None,
    progress: Progress | None = None,
    data_hint: str = "",
) -> Diagnosis:
    """Per-layer discrepancy between eval-mode and training-mode normalization (module docstring).

    ``corrections`` maps layer names to (alpha, beta). ``histogram``: False, True (the layer and channel
    with the largest discrepancy; needs a second pass, so ``batches`` must be re-iterable) or a layer name.
    Layers with ``track_running_stats=False`` normalize over groups of B, as in training. NaN/Inf
    activations, or sums that go NaN/Inf (broken statistics), raise :class:`NumericalError` naming the
    layer and the data.
    """
    if train_batch_size < 1:
        raise UsageError(f"--train-batch-size must be >= 1, got {train_batch_size}")
    dev = resolve_device(device)
    work = copy.deepcopy(model)
    correct_model(work, 0.0)
    work.to(dev)
    layers = corrected_layers(work)
    if corrections is not None:
        unknown = sorted(set(corrections) - set(layers))
        if unknown:
            raise UsageError(f"corrections name layers not in the model: {', '.join(unknown[:5])}")
    meters = {name: DiscrepancyMeter(m.num_channels) for name, m in layers.items()}

    def observer(name: str, m: nn.Module) -> Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], None]:
        coeffs = None if corrections is None or name not in corrections else corrections[name]

        def observe(x: Tensor, mu_i: Tensor, var_i: Tensor, mu_b: Tensor, var_b: Tensor) -> None:
            train, evaluated, corrected = _normalized(x, mu_i, var_i, mu_b, var_b, m.norm, coeffs)
            per_example = x[0, 0].numel() if x.dim() > 2 else 1
            meters[name].add(train, evaluated, corrected, train_batch_size * per_example)
            meters[name].check(name, m.norm, data_hint)

        return observe

    examples = _run(
        work,
        batches,
        train_batch_size,
        forward_fn,
        dev,
        total_examples,
        progress,
        data_hint,
        {name: observer(name, m) for name, m in layers.items()},
        "diagnose",
    )
    if distributed.active():  # every rank ends with the sums of all ranks' data
        every = distributed.all_gather(meters)
        meters = {name: merge_meters([part[name] for part in every]) for name in meters}
    results = [meters[name].result(name) for name in layers]
    hist = None
    if histogram:
        target = max(results, key=lambda r: r.l1_eval) if histogram is True else None
        if isinstance(histogram, str):
            target = next((r for r in results if r.name == histogram), None)
            if target is None:
                raise UsageError(f"--histogram-layer {histogram!r} is not a BN layer of the model")
        assert target is not None
        channel = max(range(len(target.per_channel_l1)), key=lambda c: target.per_channel_l1[c])
        hist = _histogram(
            work,
            layers,
            batches,
            train_batch_size,
            target.name,
            channel,
            corrections,
            forward_fn,
            dev,
            total_examples,
            progress,
            data_hint,
        )
    return Diagnosis(results, train_batch_size, examples, recommend(results, train_batch_size), hist)


def _run(
    work: nn.Module,
    batches: Iterable[Batch],
    b: int,
    forward_fn: ForwardFn | None,
    dev: torch.device,
    total: int | None,
    progress: Progress | None,
    hint: str,
    observers: Mapping[str, Observer],
    label: str,
) -> int:
    sizes = dict.fromkeys(corrected_layers(work), b)
    examples, dropped = distributed.guarded(
        lambda: training_mode_pass(
            work,
            batches,
            sizes,
            observers,
            forward_fn=forward_fn,
            device=dev,
            label=label,
            total_examples=total,
            progress=progress,
            data_hint=hint,
            batch_stat_sizes=dict.fromkeys(batch_statistics_layers(work), b),
        )
    )
    if distributed.active():
        examples, dropped = distributed.sum_ints(examples, dropped)
        require_examples(examples, dropped, b, hint)
    return examples


def _histogram(
    work: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Iterable[Batch],
    b: int,
    layer: str,
    channel: int,
    corrections: Mapping[str, tuple[Tensor, Tensor]] | None,
    forward_fn: ForwardFn | None,
    dev: torch.device,
    total: int | None,
    progress: Progress | None,
    hint: str,
) -> Histogram:
    parts: dict[str, list[Tensor]] = {"train": [], "eval": [], "corr": []}
    kept = [0]
    coeffs = None if corrections is None else corrections.get(layer)
    norm = layers[layer].norm  # type: ignore[union-attr]

    def observe(x: Tensor, mu_i: Tensor, var_i: Tensor, mu_b: Tensor, var_b: Tensor) -> None:
        if kept[0] >= HISTOGRAM_VALUES:
            return
        train, evaluated, corrected = _normalized(x, mu_i, var_i, mu_b, var_b, norm, coeffs)
        parts["train"].append(train[:, channel].reshape(-1).float().cpu())
        parts["eval"].append(evaluated[:, channel].reshape(-1).float().cpu())
        if corrected is not None:
            parts["corr"].append(corrected[:, channel].reshape(-1).float().cpu())
        kept[0] += parts["train"][-1].numel()

    _run(work, batches, b, forward_fn, dev, total, progress, hint, {layer: observe}, "histogram")
    if distributed.active():  # every rank's values, in rank order, up to the same budget per rank
        every = distributed.all_gather(parts)
        parts = {key: [t for part in every for t in part[key]] for key in parts}
    return Histogram(
        layer,
        channel,
        torch.cat(parts["train"]),
        torch.cat(parts["eval"]),
        torch.cat(parts["corr"]) if parts["corr"] else None,
    )


def recommend(layers: list[LayerDiagnosis], train_batch_size: int) -> str:
    """One line saying what to expect from a correction, from the measured discrepancies."""
    if not layers:
        return "No BatchNorm layer was observed."
    gap = sum(ly.l1_eval for ly in layers) / len(layers)
    corrected = [ly.l1_corrected for ly in layers if ly.l1_corrected is not None]
    if corrected:
        closed = 1.0 - (sum(corrected) / len(corrected)) / gap if gap > 0 else 0.0
        if closed > 0.2:
            return (
                f"The corrections close {100 * closed:.0f}% of the gap between eval and training "
                "normalization (mean L1 over layers): use them; confirm on labelled data with sweep-alpha."
            )
        if closed < -0.05:
            return "The corrections move eval normalization further from training: do not use them."
    if gap < 0.05:
        return (
            f"B = {train_batch_size} is large enough: eval normalization is already within {gap:.3f} "
            "(mean L1) of training normalization; expect little or no gain from a correction."
        )
    if gap < 0.15:
        return (
            f"Moderate gap (mean L1 {gap:.3f}): a correction may help a little; estimate alpha/beta with "
            "`bncorrect estimate` and check on labelled data with `sweep-alpha`."
        )
    return (
        f"Large gap (mean L1 {gap:.3f}) between eval and training normalization: run `bncorrect estimate` "
        f"(B = {train_batch_size}) and compare with `sweep-alpha` on labelled data."
    )


def plot_diagnosis(diagnosis: Diagnosis, path: str, *, dpi: int = 110) -> str:
    """PNG: per-layer mean L1 (eval and corrected) and, when collected, one channel's histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic import atomic_path

    n_panels = 2 if diagnosis.histogram is not None else 1
    fig, axes = plt.subplots(1, n_panels, figsize=(6.4 * n_panels, 4.2), squeeze=False)
    ax = axes[0][0]
    names = [ly.name for ly in diagnosis.layers]
    idx = range(len(names))
    ax.bar(
        [i - 0.2 for i in idx], [ly.l1_eval for ly in diagnosis.layers], width=0.4, label="plain eval (EMA)"
    )
    if any(ly.l1_corrected is not None for ly in diagnosis.layers):
        ax.bar(
            [i + 0.2 for i in idx],
            [ly.l1_corrected or 0.0 for ly in diagnosis.layers],
            width=0.4,
            label="corrected",
        )
    ax.set_xticks(list(idx), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("mean |train - eval| (normalized units)")
    ax.set_title(f"Eval vs training normalization, B = {diagnosis.train_batch_size}")
    ax.legend()
    if diagnosis.histogram is not None:
        h = diagnosis.histogram
        ax = axes[0][1]
        lo = float(torch.quantile(h.train, 0.001)), float(torch.quantile(h.evaluated, 0.001))
        hi = float(torch.quantile(h.train, 0.999)), float(torch.quantile(h.evaluated, 0.999))
        bins = torch.linspace(min(lo), max(hi), 80).tolist()
        ax.hist(h.train.numpy(), bins=bins, alpha=0.5, density=True, label="training (batch stats)")
        ax.hist(h.evaluated.numpy(), bins=bins, alpha=0.5, density=True, label="eval (EMA)")
        if h.corrected is not None:
            ax.hist(
                h.corrected.numpy(),
                bins=bins,
                histtype="step",
                density=True,
                lw=1.5,
                label="eval (corrected)",
            )
        ax.set_title(f"{h.layer}, channel {h.channel}")
        ax.set_xlabel("normalized activation")
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return str(path)
