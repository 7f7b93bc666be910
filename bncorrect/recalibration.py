"""Exact population statistics of every BN layer's input over a data pass (``recalibrate``).

Two definitions (DESIGN §3):

- ``upstream="eval"`` (inference-consistent): layer k's statistics are taken over the data with every
  earlier layer already recalibrated and in inference form, so at inference each layer normalizes exactly
  the distribution it receives. Layers are done in execution order, one (partial) pass each: pass k stops
  right after layer k has seen its input, so the cost is about L/2 full passes for L layers. Mean and
  variance are the biased population moments of all values of the channel, merged across batches with
  Chan's parallel update in float64.
- ``upstream="train"`` (training-consistent, fvcore's PreciseBN): one pass with training-mode
  normalization in groups of B examples (upstream layers normalize with batch statistics, as in training);
  each layer's input moments are merged over all groups exactly as above. With equal-size groups the mean
  is the equal-weight average of the per-group means (what the EMA approximates) and the variance is the
  population variance of everything the layer saw in training mode, as fvcore's ``update_bn_stats``
  computes it (its ``_PopulationVarianceEstimator``); on the same batches the two agree.

The model passed in is not modified; the result is a mapping of layer name to (mean, var).
:func:`train_consistent_stats` is the training-consistent computation whatever runs the model (PyTorch
here, onnxruntime in :mod:`bncorrect.onnx_passes`), given the pass to run.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .errors import DataError, NumericalError, UsageError
from .layers import CorrectedNorm, batch_statistics_layers, correct_model, corrected_layers
from .passes import (
    Batch,
    ForwardFn,
    Observer,
    Progress,
    TrainingPass,
    batch_size_of,
    first_tensor,
    nonfinite_error,
    resolve_device,
    run_forward,
    training_mode_pass,
)

Upstream = Literal["eval", "train"]


class PopulationMoments:
    """Per-channel count, mean and sum of squared deviations, merged across batches (Chan et al.).

    ``name`` (the layer) and ``data_hint`` (the data) only serve the :class:`NumericalError` that
    :meth:`add` raises for a batch with NaN/Inf values."""

    def __init__(self, channels: int, *, name: str = "", data_hint: str = "") -> None:
        self.count = 0
        self.mean = torch.zeros(channels, dtype=torch.float64)
        self.m2 = torch.zeros(channels, dtype=torch.float64)
        self.name = name
        self.data_hint = data_hint

    def add(self, x: Tensor, data: Tensor | None = None) -> None:
        """Merge the values of ``x`` (N, C, *spatial); ``data``: the batch as read, for the error message."""
        xf = x.detach().to(torch.float64)
        dims = (0, *range(2, x.dim()))
        n = x.numel() // x.shape[1]
        var, mean = torch.var_mean(xf, dim=dims, correction=0)
        # in float64 the moments of finite float32/float16 values are finite: NaN/Inf here is NaN/Inf in x
        if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(var).all())):
            raise nonfinite_error(self.name or "?", x, data_hint=self.data_hint, data=data)
        mean, m2 = mean.cpu(), var.cpu() * n
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def variance(self) -> Tensor:
        """Biased (population) variance."""
        return self.m2 / max(self.count, 1)


@dataclass
class RecalibrateResult:
    """New running statistics per layer and how they were obtained."""

    stats: dict[str, tuple[Tensor, Tensor]]
    upstream: Upstream
    examples: int
    passes: int
    batch_size: int | None = None
    skipped: list[str] | None = None


class _StopForward(Exception):
    pass


def check_finite(
    name: str,
    mean: Tensor,
    var: Tensor,
    *,
    dtypes: Iterable[torch.dtype] = (),
    data_hint: str = "",
) -> None:
    """:class:`NumericalError` naming layer ``name`` and the data unless its new statistics are finite and
    the variance non-negative, in their own dtype and once cast to float32 (the corrections file) and to
    each of ``dtypes`` (the model's statistics buffers): float64 moments of huge activations can be
    finite while float32 cannot hold them."""
    where = f" over {data_hint}" if data_hint else ""
    fix = (
        "check the data and its preprocessing (values, scale, --mean/--std; inputs are expected at about "
        f"unit scale): layer {name} sees values far larger than the model was trained on"
    )
    for label, t in (("running_mean", mean), ("running_var", var)):
        if not bool(torch.isfinite(t).all()):
            raise NumericalError(
                f"the recalibrated {label} of layer {name}{where} holds NaN/Inf values",
                path=data_hint or None,
                hint=fix,
            )
    if bool((var < 0).any()):
        raise NumericalError(
            f"the recalibrated running_var of layer {name}{where} is negative ({float(var.min()):.3g})",
            path=data_hint or None,
            hint="this is a bncorrect bug; please report it with the model and the data",
        )
    for dtype in dict.fromkeys([torch.float32, *dtypes]):
        for label, t in (("running_mean", mean), ("running_var", var)):
            if not bool(torch.isfinite(t.to(dtype)).all()):
                raise NumericalError(
                    f"the recalibrated {label} of layer {name}{where} reaches {float(t.abs().max()):.3g}, "
                    f"beyond the range of {str(dtype).removeprefix('torch.')}",
                    path=data_hint or None,
                    hint=fix,
                )


def recalibrate_stats(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    upstream: Upstream = "eval",
    batch_size: int | None = None,
    forward_fn: ForwardFn | None = None,
    device: str | torch.device | None = "cpu",
    total_examples: int | None = None,
    progress: Progress | None = None,
    data_hint: str = "",
) -> RecalibrateResult:
    """Population statistics of every correctable BN layer over ``batches`` (re-iterable for ``eval``).

    Corrections already on the model (alpha/beta) are ignored: statistics are those of plain BN inference
    (``eval``) or training (``train``; layers with ``track_running_stats=False`` normalize over groups of
    ``batch_size`` there too, as in training). Statistics the model's buffers cannot hold, and NaN/Inf
    activations, raise :class:`NumericalError` naming the layer and the data: nothing non-finite or
    negative is ever returned.
    """
    dev = resolve_device(device)
    work = copy.deepcopy(model)
    correct_model(work, 0.0)
    work.to(dev).eval()
    layers = corrected_layers(work)
    if upstream == "train":

        def run_pass(group_sizes: Mapping[str, int], observers: Mapping[str, Observer]) -> tuple[int, int]:
            assert batch_size is not None  # checked by train_consistent_stats before the pass
            return training_mode_pass(
                work,
                batches,
                group_sizes,
                observers,
                forward_fn=forward_fn,
                device=dev,
                label="recalibrate",
                total_examples=total_examples,
                progress=progress,
                data_hint=data_hint,
                batch_stat_sizes=dict.fromkeys(batch_statistics_layers(work), batch_size),
            )

        return train_consistent_stats(
            {n: m.num_channels for n, m in layers.items()},
            batch_size,
            run_pass,
            dtypes={n: m.norm.running_var.dtype for n, m in layers.items()},
            data_hint=data_hint,
        )
    check_upstream(upstream, batches)
    return _inference_consistent(work, layers, batches, forward_fn, dev, total_examples, progress, data_hint)


def check_upstream(upstream: str, batches: Iterable[Batch]) -> None:
    """:class:`UsageError` unless ``upstream`` is "eval" or "train", and for "eval" (one pass per layer)
    ``batches`` can be iterated again."""
    if upstream not in ("eval", "train"):
        raise UsageError(f"--upstream must be 'eval' or 'train', got {upstream!r}")
    if upstream == "eval" and iter(batches) is batches:
        raise UsageError(
            "inference-consistent recalibration passes over the data once per layer: pass a "
            "re-iterable (a list or a DataLoader), not an iterator"
        )


def _execution_order(
    work: nn.Module,
    layers: dict[str, CorrectedNorm],
    batch: Batch,
    forward_fn: ForwardFn | None,
    dev: torch.device,
    hint: str,
) -> list[str]:
    order: list[str] = []
    handles = [
        m.register_forward_pre_hook(lambda _m, _i, n=name: order.append(n) if n not in order else None)
        for name, m in layers.items()
    ]
    try:
        run_forward(work, _head(batch), forward_fn, dev, data_hint=hint)
    finally:
        for h in handles:
            h.remove()
    return order


def _head(batch: Batch) -> Batch:
    from .passes import map_batch

    n = batch_size_of(batch)
    return map_batch(batch, lambda t: t[:2] if t.dim() and t.shape[0] == n else t)


def _inference_consistent(
    work: nn.Module,
    layers: dict[str, CorrectedNorm],
    batches: Iterable[Batch],
    forward_fn: ForwardFn | None,
    dev: torch.device,
    total_examples: int | None,
    progress: Progress | None,
    hint: str,
) -> RecalibrateResult:
    first = next(iter(batches), None)
    if first is None:
        raise DataError(
            "the data is empty", path=hint or None, hint="pass a dataset with at least one example"
        )
    order = _execution_order(work, layers, first, forward_fn, dev, hint)
    stats: dict[str, tuple[Tensor, Tensor]] = {}
    examples = 0
    current: list[Tensor | None] = [None]
    for name in order:
        module = layers[name]
        moments = PopulationMoments(module.num_channels, name=name, data_hint=hint)

        def hook(_m: nn.Module, inputs: tuple[Tensor, ...], moments: PopulationMoments = moments) -> None:
            moments.add(inputs[0], current[0])
            raise _StopForward

        handle = module.register_forward_pre_hook(hook)
        examples = 0
        try:
            for batch in batches:
                current[0] = first_tensor(batch)
                with contextlib.suppress(_StopForward):
                    run_forward(work, batch, forward_fn, dev, data_hint=hint)
                examples += batch_size_of(batch)
                if progress is not None:
                    progress(f"recalibrate {name}", examples, total_examples)
        finally:
            handle.remove()
        mean, var = moments.mean, moments.variance()
        check_finite(name, mean, var, dtypes=(module.norm.running_var.dtype,), data_hint=hint)
        stats[name] = (mean.float(), var.float())
        with torch.no_grad():  # later layers see this layer in its final inference form
            module.norm.running_mean.copy_(mean.to(module.norm.running_mean))
            module.norm.running_var.copy_(var.to(module.norm.running_var))
    skipped = [n for n in layers if n not in stats]
    return RecalibrateResult(stats, "eval", examples, len(order), None, skipped)


def train_consistent_stats(
    channels: Mapping[str, int],
    batch_size: int | None,
    run_pass: TrainingPass,
    *,
    dtypes: Mapping[str, torch.dtype] | None = None,
    data_hint: str = "",
) -> RecalibrateResult:
    """Training-consistent statistics (``upstream="train"``, module docstring), whatever runs the model.

    ``channels``: layer name -> channel count. ``run_pass`` (:data:`bncorrect.passes.TrainingPass`) runs one
    training-mode pass with every layer normalizing groups of ``batch_size`` examples and an observer per
    layer. Layers that saw no input are listed as skipped. Statistics that are NaN/Inf, negative or beyond
    float32 (or a layer's own dtype in ``dtypes``) raise :class:`NumericalError` naming the layer and the
    data (``data_hint``).
    """
    if batch_size is None or batch_size < 1:
        raise UsageError(
            "--upstream train needs --batch-size B (the normalization batch size used in training)"
        )
    if batch_size < 2:
        raise UsageError(
            "training-consistent statistics with --batch-size 1 normalize each example by itself",
            hint="pass the normalization batch size used in training (B >= 2), or use --upstream eval",
        )
    averages = {name: PopulationMoments(c, name=name, data_hint=data_hint) for name, c in channels.items()}
    examples, _ = run_pass(
        dict.fromkeys(channels, batch_size),
        {name: (lambda x, _mi, _vi, _mb, _vb, a=avg: a.add(x)) for name, avg in averages.items()},
    )
    stats = {}
    for name, avg in averages.items():
        if avg.count:
            mean, var = avg.mean, avg.variance()
            dtype = (dtypes or {}).get(name)
            check_finite(name, mean, var, dtypes=() if dtype is None else (dtype,), data_hint=data_hint)
            stats[name] = (mean.float(), var.float())
    skipped = [n for n in channels if n not in stats]
    return RecalibrateResult(stats, "train", examples, 1, batch_size, skipped)
