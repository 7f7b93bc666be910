"""Exact population statistics of every BN layer's input over a data pass (``recalibrate``).

Two definitions (DESIGN §3):

- ``upstream="eval"`` (inference-consistent): layer k's statistics are taken over the data with every
  earlier layer recalibrated and in inference form, so at inference each layer normalizes exactly the
  distribution it receives. Mean and variance are the biased population moments of all values of the
  channel: each batch's in the activations' float32 (torch accumulates them in float64 on the CPU), merged
  across batches with Chan's parallel update in float64. Two schemes compute them:

  * *iterative* (the default): full passes over the data, every layer's input moments gathered at once in
    each pass. Pass 1 normalizes every layer with each batch's own statistics; pass 2 with the population
    statistics S of pass 1; every later pass normalizes batch b at layer k with
    ``m_b + (S - m'_b)`` (mean) and ``(v_b + eps) (S_var + eps) / (v'_b + eps) - eps`` (variance), where
    ``m_b, v_b`` are the batch's input moments now, ``m'_b, v'_b`` the same batch's in the previous pass and
    S that pass's population statistics: whatever an upstream change did to this very batch's input is
    followed at once (the per-batch offsets cancel the sampling noise), so downstream layers never meet
    inputs normalized with stale statistics. A plain fixed-point iteration (every pass normalizing with
    the previous pass's S) diverges on deep chains: an upstream change propagates un-renormalized
    through every later layer (benchmarks/README.md). Fixed points: when no batch's input changes, every
    layer is normalized with S, i.e. inference-consistent. It is *exact* after at most depth + 1 passes
    (depth: the longest chain of BN layers upstream of any layer): a layer whose upstream layers are all
    exact sees the same input twice, so its offset is zero and it normalizes with S itself; with all of
    the data in one batch pass 1 is already exact, and the iteration ends there. Otherwise the passes
    stop when ``max_change``, the largest over layers and channels of the mean over the data (each batch
    weighted by its size) of the absolute change of a batch's input mean since the previous pass,
    relative to sqrt(var + eps), or of its variance, relative to var + eps, is at most ``tolerance``, or
    after ``max_passes``. How fast it settles depends on how well one batch's statistics stand for the
    population: in few passes with batches of thousands of values per channel, slowly with a few hundred
    (tiny feature maps, small batches). It needs the same batches in the same order each pass.
  * *layer by layer* (``exact=True``, the reference): one (partial) pass per layer in execution order;
    pass k stops right after layer k has seen its input, so the cost is about L/2 full passes for L
    layers.
- ``upstream="train"`` (training-consistent, fvcore's PreciseBN): one pass with training-mode
  normalization in groups of B examples (upstream layers normalize with batch statistics, as in training);
  each layer's input moments are merged over all groups exactly as above. With equal-size groups the mean
  is the equal-weight average of the per-group means (what the EMA approximates) and the variance is the
  population variance of everything the layer saw in training mode, as fvcore's ``update_bn_stats``
  computes it (its ``_PopulationVarianceEstimator``); on the same batches the two agree.

The model passed in is not modified; the result is a mapping of layer name to (mean, var).
:func:`train_consistent_stats` is the training-consistent computation whatever runs the model (PyTorch
here, onnxruntime in :mod:`bncorrect.onnx_passes`), given the pass to run; :class:`OffsetNormalization`
the iterative scheme's per-batch normalization statistics and stopping rule, whatever runs the model.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from . import distributed
from .errors import DataError, NumericalError, UsageError, spell
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
    require_examples,
    resolve_device,
    run_forward,
    training_mode_pass,
)

Upstream = Literal["eval", "train"]
#: Default stopping rule of the iterative inference-consistent scheme: the largest relative change of any
#: layer's per-batch input moments between two passes (module docstring), and the most passes it may take.
DEFAULT_TOLERANCE = 1e-4
DEFAULT_MAX_PASSES = 10
Moments = tuple[Tensor, Tensor]


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

    def add(self, x: Tensor, data: Tensor | None = None) -> Moments:
        """Merge the values of ``x`` (N, C, *spatial); ``data``: the batch as read, for the error message.
        Returns the batch's own per-channel (mean, biased variance), float64 on ``x``'s device."""
        xf = x.detach()
        if xf.dtype not in (torch.float32, torch.float64):
            xf = xf.to(torch.float32)
        dims = (0, *range(2, x.dim()))
        n = x.numel() // x.shape[1]
        # in the input's own float32 (no float64 copy of the activations: torch accumulates float32
        # moments in float64 on the CPU and with Welford's update on CUDA, the results are rounded once)
        var, mean = (t.to(torch.float64) for t in torch.var_mean(xf, dim=dims, correction=0))
        # NaN/Inf here is NaN/Inf in x, or finite values whose variance float32 cannot hold
        if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(var).all())):
            raise nonfinite_error(self.name or "?", x, data_hint=self.data_hint, data=data)
        self.merge(mean, var, n)
        return mean, var

    def merge(self, mean: Tensor, var: Tensor, n: int) -> None:
        """Merge one batch's per-channel mean and biased variance over ``n`` values per channel."""
        batch_mean, m2 = mean.cpu().to(torch.float64), var.cpu().to(torch.float64) * n
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def variance(self) -> Tensor:
        """Biased (population) variance."""
        return self.m2 / max(self.count, 1)

    def state(self) -> MomentState:
        """(count, mean, M2): what :func:`merge_moments` merges."""
        return self.count, self.mean, self.m2

    def set_state(self, state: MomentState) -> None:
        self.count, self.mean, self.m2 = int(state[0]), state[1].to(torch.float64), state[2].to(torch.float64)


#: A moments accumulator's state: values per channel seen, per-channel mean and sum of squared deviations.
MomentState = tuple[int, Tensor, Tensor]


def merge_moments(parts: Sequence[MomentState | None]) -> MomentState | None:
    """Chan et al.'s merge of per-channel (count, mean, M2) of disjoint parts of the data, in order: the
    (count, mean, M2) of their union, as :meth:`PopulationMoments.merge` of every batch would give it (to
    float64 rounding). Parts that are None or saw nothing are skipped; None when every part is."""
    out: MomentState | None = None
    for part in parts:
        if part is None or int(part[0]) == 0:
            continue
        n, mean, m2 = int(part[0]), part[1].to(torch.float64), part[2].to(torch.float64)
        if out is None:
            out = (n, mean.clone(), m2.clone())
            continue
        count, total_mean, total_m2 = out
        total = count + n
        delta = mean - total_mean
        out = (
            total,
            total_mean + delta * (n / total),
            total_m2 + m2 + delta.square() * (count * n / total),
        )
    return out


def merge_across_ranks(moments: dict[str, PopulationMoments]) -> None:
    """Under a process group (collective): every accumulator of ``moments`` becomes the merge of all
    ranks' (:func:`merge_moments`, in rank order, so every rank holds the same numbers); a layer this rank
    never saw is added from the others. Nothing happens without a process group."""
    from . import distributed

    if not distributed.active():
        return
    mine = {name: pm.state() for name, pm in moments.items()}
    every = distributed.all_gather(mine)
    names = list(dict.fromkeys(n for part in every for n in part))
    for name in names:
        merged = merge_moments([part.get(name) for part in every])
        if merged is None:
            continue
        pm = moments.get(name)
        if pm is None:
            pm = moments[name] = PopulationMoments(int(merged[1].numel()))
        pm.set_state(merged)


@dataclass
class RecalibrateResult:
    """New running statistics per layer and how they were obtained.

    For ``upstream="eval"``: ``scheme`` is "iterative" or "layer by layer"; ``max_change`` (iterative) how
    much the layers' per-batch input moments changed in the last pass (module docstring; None after a
    single pass, 0.0 layer by layer), ``changes`` its value after each pass from pass 2 on, ``converged``
    whether it is within ``tolerance``, and ``exact`` whether the statistics are known to be the exact
    ones: always layer by layer; for the iterative scheme when all of the data was one batch, and on an
    ONNX graph when it ran depth + 1 passes (the graph's longest chain of BN nodes is known there)."""

    stats: dict[str, tuple[Tensor, Tensor]]
    upstream: Upstream
    examples: int
    passes: int
    batch_size: int | None = None
    skipped: list[str] | None = None
    scheme: str = "training-mode pass"
    max_change: float | None = None
    tolerance: float | None = None
    converged: bool = True
    exact: bool = False
    changes: list[float] | None = None  # iterative: max_change after each pass from pass 2 on


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
    exact: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    max_passes: int = DEFAULT_MAX_PASSES,
    forward_fn: ForwardFn | None = None,
    device: str | torch.device | None = "cpu",
    total_examples: int | None = None,
    progress: Progress | None = None,
    data_hint: str = "",
) -> RecalibrateResult:
    """Population statistics of every correctable BN layer over ``batches`` (re-iterable for ``eval``, in
    the same order each time).

    ``eval`` runs the iterative scheme (module docstring: full passes until the largest relative change
    is at most ``tolerance``, at most ``max_passes``; ``RecalibrateResult.converged`` says whether it got
    there), or with ``exact`` one partial pass per layer. Corrections already on the model (alpha/beta)
    are ignored: statistics are those of plain BN inference (``eval``) or training (``train``; layers with
    ``track_running_stats=False`` normalize over groups of ``batch_size`` there too, as in training).
    Statistics the model's buffers cannot hold, and NaN/Inf activations, raise :class:`NumericalError`
    naming the layer and the data: nothing non-finite or negative is ever returned.
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
    if exact:
        return _inference_consistent(
            work, layers, batches, forward_fn, dev, total_examples, progress, data_hint
        )
    check_iteration(tolerance, max_passes)
    return _iterative(
        work, layers, batches, forward_fn, dev, total_examples, progress, data_hint, tolerance, max_passes
    )


def check_upstream(upstream: str, batches: Iterable[Batch]) -> None:
    """:class:`UsageError` unless ``upstream`` is "eval" or "train", and for "eval" (several passes)
    ``batches`` can be iterated again."""
    if upstream not in ("eval", "train"):
        raise UsageError(f"--upstream must be 'eval' or 'train', got {upstream!r}")
    if upstream == "eval" and iter(batches) is batches:
        raise UsageError(
            "inference-consistent recalibration passes over the data several times: pass a re-iterable "
            "(a list or a DataLoader without shuffling), not an iterator"
        )


def choose_exact(n_layers: int, n_batches: int | None, max_passes: int) -> bool:
    """Which inference-consistent scheme ``exact=None`` (the default of the API and CLI) runs: ``True``
    for layer by layer, ``False`` for the iterative one.

    All of the data in one batch: the iterative scheme, exact after its first pass. Otherwise layer by
    layer when it costs no more than the iterative scheme may (its partial passes add up to about
    ``n_layers / 2`` full passes, which is at most ``max_passes``): exact for the same price, where the
    iterative scheme on a shallow net with small batches often needs all of its passes (docs/zoo.md).
    Deeper nets: the iterative scheme. An unknown number of batches counts as several."""
    if n_batches is not None and n_batches <= 1:
        return False
    return n_layers <= 2 * max_passes


def check_iteration(tolerance: float, max_passes: int) -> None:
    """:class:`UsageError` unless ``tolerance`` is a positive finite number and ``max_passes`` an integer
    >= 2 (the iterative scheme's pass 1 only gives its starting point)."""
    bad_tol = isinstance(tolerance, bool) or not isinstance(tolerance, int | float)
    if bad_tol or not (tolerance > 0 and math.isfinite(tolerance)):
        raise UsageError(
            f"{spell('tolerance', tolerance)}: the tolerance must be a positive number",
            hint=f"e.g. {spell('tolerance', DEFAULT_TOLERANCE)} (the default)",
        )
    if isinstance(max_passes, bool) or not isinstance(max_passes, int) or max_passes < 2:
        raise UsageError(
            f"{spell('max_passes', max_passes)}: the iterative recalibration needs at least 2 passes",
            hint=f"e.g. {spell('max_passes', DEFAULT_MAX_PASSES)} (the default), or the exact layer-by-layer "
            f"scheme ({spell('exact')})",
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
    def find_order() -> list[str]:
        first = next(iter(batches), None)
        if first is None:
            raise DataError(
                "the data is empty", path=hint or None, hint="pass a dataset with at least one example"
            )
        return _execution_order(work, layers, first, forward_fn, dev, hint)

    # under a process group rank 0 holds the first batch (an empty shard elsewhere is fine)
    order = distributed.on_writer(find_order) if distributed.active() else find_order()
    stats: dict[str, tuple[Tensor, Tensor]] = {}
    examples = done = 0
    current: list[Tensor | None] = [None]
    label = f"recalibrate layer by layer ({len(order)} layers)"
    total = None if total_examples is None else total_examples * len(order)
    for name in order:
        module = layers[name]
        moments = PopulationMoments(module.num_channels, name=name, data_hint=hint)

        def hook(_m: nn.Module, inputs: tuple[Tensor, ...], moments: PopulationMoments = moments) -> None:
            moments.add(inputs[0], current[0])
            raise _StopForward

        handle = module.register_forward_pre_hook(hook)

        def layer_pass(done: int = done) -> int:
            seen = 0
            for batch in batches:
                current[0] = first_tensor(batch)
                with contextlib.suppress(_StopForward):
                    run_forward(work, batch, forward_fn, dev, data_hint=hint)
                seen += batch_size_of(batch)
                if progress is not None:
                    progress(label, done + seen, total)
            return seen

        try:
            examples = distributed.guarded(layer_pass)
        finally:
            handle.remove()
        done += examples
        if distributed.active():
            merged = {name: moments}
            merge_across_ranks(merged)
            moments = merged[name]
            (examples,) = distributed.sum_ints(examples)
        mean, var = moments.mean, moments.variance()
        check_finite(name, mean, var, dtypes=(module.norm.running_var.dtype,), data_hint=hint)
        stats[name] = (mean.float(), var.float())
        with torch.no_grad():  # later layers see this layer in its final inference form
            module.norm.running_mean.copy_(mean.to(module.norm.running_mean))
            module.norm.running_var.copy_(var.to(module.norm.running_var))
    skipped = [n for n in layers if n not in stats]
    return RecalibrateResult(
        stats, "eval", examples, len(order), None, skipped, "layer by layer", 0.0, None, True, True
    )


Coefficients = tuple[Tensor | float, Tensor | float, Tensor | float, Tensor | float]


class OffsetNormalization:
    """The iterative inference-consistent scheme (module docstring), whatever runs the model.

    Per pass: :meth:`begin_pass`; per batch :meth:`begin_batch`, then for every call of a layer (in
    execution order) :meth:`coefficients` ``(w, shift, ratio, q)``, with which the layer normalizes its
    input of batch moments ``m, v`` with mean ``w m + shift`` and variance ``ratio (v + eps) + q - eps``,
    and :meth:`record` of its input (or :meth:`record_moments` of its batch moments); :meth:`end_pass`
    says whether to stop. ``eps``: layer name -> its eps. Every batch's moments of the last pass are kept
    (two float64 vectors per layer and batch).
    """

    def __init__(
        self,
        eps: Mapping[str, float],
        *,
        tolerance: float = DEFAULT_TOLERANCE,
        max_passes: int = DEFAULT_MAX_PASSES,
        data_hint: str = "",
    ) -> None:
        self.eps = dict(eps)
        self.tolerance = tolerance
        self.max_passes = max_passes
        self.data_hint = data_hint
        self.passes = 0
        self.examples = 0
        self.stats: dict[str, Moments] = {}  # population statistics of the last pass (float64)
        self.max_change = math.inf
        self.changes: list[float] = []  # max_change after each pass from pass 2 on
        self.exact = False  # known exact after pass 1: all of the data in one batch
        self.moments: dict[str, PopulationMoments] = {}
        self._previous: list[dict[str, list[Moments]]] = []  # per batch of the last pass: per layer call
        self._current: list[dict[str, list[Moments]]] = []
        self._keys: list[tuple[tuple[int, ...], float] | None] = []
        self._change: dict[str, Moments] = {}  # per layer: sum over batches of n_b |change of m_b, v_b|
        self._unmatched = False  # a layer call without its counterpart in the previous pass
        self._data: Tensor | None = None
        self._devices: dict[str, torch.device] = {}  # where each layer's batch moments are computed

    @property
    def mode(self) -> str:
        """How this pass normalizes: "batch" (pass 1), "uniform" (pass 2) or "offset"."""
        return "batch" if self.passes <= 1 else "uniform" if self.passes == 2 else "offset"

    def begin_pass(self) -> None:
        self.passes += 1
        self.moments = {}
        self._current = []
        self._change = {}
        self._unmatched = False
        self.examples = 0

    def begin_batch(self, data: Tensor | None, examples: int) -> None:
        """A new batch (``data``: its first tensor as read): :class:`UsageError` unless it is the batch
        that came at this place in pass 1 (the per-batch offsets need the same batches in the same order)."""
        b = len(self._current)
        key = None if data is None else (tuple(data.shape), float(data.detach().sum(dtype=torch.float64)))
        if self.passes == 1:
            self._keys.append(key)
        elif b >= len(self._keys) or self._keys[b] != key:
            raise _order_error(self.data_hint)
        self._current.append({})
        self._data = data
        self.examples += examples

    def calls(self, name: str) -> int:
        """How many calls of layer ``name`` the current batch has had so far."""
        return len(self._current[-1].get(name, ()))

    def coefficients(self, name: str, call: int = 0) -> Coefficients:
        """``(w, shift, ratio, q)`` for call ``call`` of layer ``name`` in the current batch."""
        if self.mode == "batch" or name not in self.stats:
            return 1.0, 0.0, 1.0, 0.0  # the batch's own statistics
        mean, var = self.stats[name]
        eps = self.eps[name]
        prev = self._previous_moments(name, call)
        if self.mode == "uniform" or prev is None:
            return 0.0, mean, 0.0, var + eps
        prev_mean, prev_var = prev
        return 1.0, mean - prev_mean, (var + eps) / (prev_var + eps), 0.0

    def record(self, name: str, x: Tensor) -> Moments:
        """Merge layer ``name``'s input ``x`` for the current batch; its batch (mean, var), float64 on
        ``x``'s device. :class:`NumericalError` for NaN/Inf in ``x``."""
        mean, var = self._moments(name, int(x.shape[1])).add(x, self._data)
        self._remember(name, mean, var, x.numel() // int(x.shape[1]))
        return mean, var

    def record_moments(self, name: str, mean: Tensor, var: Tensor, n: int) -> None:
        """As :meth:`record`, given the batch's per-channel moments over ``n`` values per channel (finite:
        the caller checks)."""
        mean, var = mean.to(torch.float64), var.to(torch.float64)
        self._moments(name, int(mean.numel())).merge(mean, var, n)
        self._remember(name, mean, var, n)

    def _moments(self, name: str, channels: int) -> PopulationMoments:
        pm = self.moments.get(name)
        if pm is None:
            pm = self.moments[name] = PopulationMoments(channels, name=name, data_hint=self.data_hint)
        return pm

    def _remember(self, name: str, mean: Tensor, var: Tensor, n: int) -> None:
        call = self.calls(name)
        self._devices[name] = mean.device
        self._current[-1].setdefault(name, []).append((mean, var))
        if self.mode != "batch":
            prev = self._previous_moments(name, call)
            if prev is None or name not in self.stats:
                self._unmatched = True
            else:
                dm, dv = (mean - prev[0]).abs() * n, (var - prev[1]).abs() * n
                sums = self._change.get(name)
                self._change[name] = (dm, dv) if sums is None else (sums[0] + dm, sums[1] + dv)

    def end_pass(self, dtypes: Mapping[str, torch.dtype] | None = None) -> bool:
        """Close the pass: its population statistics, checked (:func:`check_finite`, in execution order),
        become :attr:`stats`; True when the iteration is over (within tolerance after pass 2 or later,
        or at ``max_passes``, or :attr:`exact` after pass 1: the data was one batch, in which every layer
        ran once, so that each normalized with the population statistics of its input). :class:`DataError`
        for empty data."""
        reordered = int(self.passes > 1 and len(self._current) != len(self._keys))
        if reordered and not distributed.active():
            raise _order_error(self.data_hint)
        # under a process group (collective): the population moments, the change sums and the counts of
        # every rank (each rank keeps its own batches' moments for its per-batch offsets)
        batches, single_calls = (
            len(self._current),
            int(all(len(c) == 1 for b in self._current for c in b.values())),
        )
        if distributed.active():
            merge_across_ranks(self.moments)
            self._change = merge_changes(distributed.all_gather(self._change))
            unmatched, examples, batches, all_single, reordered = distributed.sum_ints(
                int(self._unmatched), self.examples, batches, single_calls, reordered
            )
            if reordered:
                raise _order_error(self.data_hint)
            self._unmatched, self.examples = bool(unmatched), examples
            single_calls = int(all_single == distributed.world_size())
        if batches == 0:
            raise DataError(
                "the data is empty",
                path=self.data_hint or None,
                hint="pass a dataset with at least one example",
            )
        stats = {}
        for name, pm in self.moments.items():
            mean, var = pm.mean, pm.variance()
            dtype = (dtypes or {}).get(name)
            check_finite(name, mean, var, dtypes=() if dtype is None else (dtype,), data_hint=self.data_hint)
            device = self._devices.get(name, mean.device)
            stats[name] = (mean.to(device), var.to(device))
        self.stats = stats
        if self.passes == 1:
            self.exact = batches == 1 and bool(single_calls)
        self._previous, self._current = self._current, []
        # per layer and channel: the mean over the data (weights n_b / n) of |change of the batch's input
        # moments| since the last pass, means relative to sqrt(var + eps), variances to var + eps
        worst = torch.zeros((), dtype=torch.float64)
        for name, (dm, dv) in self._change.items():
            scale = (self.stats[name][1] + self.eps[name]).to(dm.device)
            count = self.moments[name].count
            change = torch.maximum((dm / (count * scale.sqrt())).max(), (dv / (count * scale)).max())
            worst = torch.maximum(worst, change.cpu())
        unknown = self.passes == 1 or self._unmatched
        self.max_change = math.inf if unknown else float(worst)
        if self.passes > 1:
            self.changes.append(self.max_change)
        return self.exact or self.converged or self.passes >= self.max_passes

    @property
    def converged(self) -> bool:
        return self.passes > 1 and self.max_change <= self.tolerance

    def result(self, layers: Iterable[str], *, exact: bool = False) -> RecalibrateResult:
        """The :class:`RecalibrateResult` of the last pass (``layers``: every layer, for ``skipped``)."""
        stats = {n: (m.cpu().float(), v.cpu().float()) for n, (m, v) in self.stats.items()}
        return RecalibrateResult(
            stats,
            "eval",
            self.examples,
            self.passes,
            None,
            [n for n in layers if n not in stats],
            "iterative",
            self.max_change if math.isfinite(self.max_change) else None,  # None: one pass, nothing to compare
            self.tolerance,
            exact or self.exact or self.converged,
            exact or self.exact,
            list(self.changes),
        )

    def _previous_moments(self, name: str, call: int) -> Moments | None:
        b = len(self._current) - 1
        if b >= len(self._previous):
            return None
        calls = self._previous[b].get(name, [])
        return calls[call] if call < len(calls) else None


def merge_changes(parts: Sequence[Mapping[str, Moments]]) -> dict[str, Moments]:
    """The iterative scheme's per-layer change sums (sum over batches of n_b |change of m_b|, of v_b) of
    disjoint parts of the data: their sums, layer by layer (a layer missing from a part adds nothing)."""
    out: dict[str, Moments] = {}
    for part in parts:
        for name, (dm, dv) in part.items():
            dm, dv = dm.cpu(), dv.cpu()
            prev = out.get(name)
            out[name] = (dm, dv) if prev is None else (prev[0] + dm, prev[1] + dv)
    return out


def _order_error(data_hint: str) -> UsageError:
    return UsageError(
        f"the data{' ' + data_hint if data_hint else ''} came in other batches or another order in a later "
        "pass: the iterative inference-consistent recalibration needs the same batches in the same order "
        "each pass",
        hint="pass a list or a DataLoader without shuffling or random augmentation, or use the exact "
        "layer-by-layer scheme (exact=True, --exact), which does not depend on the order",
    )


def _iterative(
    work: nn.Module,
    layers: dict[str, CorrectedNorm],
    batches: Iterable[Batch],
    forward_fn: ForwardFn | None,
    dev: torch.device,
    total_examples: int | None,
    progress: Progress | None,
    hint: str,
    tolerance: float,
    max_passes: int,
) -> RecalibrateResult:
    state = OffsetNormalization(
        {n: float(m.norm.eps) for n, m in layers.items()},
        tolerance=tolerance,
        max_passes=max_passes,
        data_hint=hint,
    )

    def hook(module: CorrectedNorm, inputs: tuple[Tensor, ...], name: str) -> None:
        x = inputs[0]
        w, shift, ratio, q = state.coefficients(name, state.calls(name))
        mean, var = state.record(name, x)
        eps = state.eps[name]
        norm = module.norm
        norm.running_mean.copy_(mean * w + shift)
        norm.running_var.copy_((var + eps) * ratio + (q - eps))

    handles = [
        m.register_forward_pre_hook(lambda m, i, n=name: hook(m, i, n))  # type: ignore[misc]
        for name, m in layers.items()
    ]
    dtypes = {n: m.norm.running_var.dtype for n, m in layers.items()}
    try:
        done = False
        while not done:
            state.begin_pass()
            label = f"recalibrate pass {state.passes} of ≤{max_passes}"

            def one_pass(label: str = label) -> None:
                for batch in batches:
                    state.begin_batch(first_tensor(batch), batch_size_of(batch))
                    run_forward(work, batch, forward_fn, dev, data_hint=hint)
                    if progress is not None:
                        progress(label, state.examples, total_examples)

            distributed.guarded(one_pass)
            done = state.end_pass(dtypes)
    finally:
        for h in handles:
            h.remove()
    return state.result(layers)


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
    examples, dropped = distributed.guarded(
        lambda: run_pass(
            dict.fromkeys(channels, batch_size),
            {name: (lambda x, _mi, _vi, _mb, _vb, a=avg: a.add(x)) for name, avg in averages.items()},
        )
    )
    if distributed.active():  # every rank ends with the moments of all ranks' data
        merge_across_ranks(averages)
        examples, dropped = distributed.sum_ints(examples, dropped)
        require_examples(examples, dropped, batch_size, data_hint)
    stats = {}
    for name, avg in averages.items():
        if avg.count:
            mean, var = avg.mean, avg.variance()
            dtype = (dtypes or {}).get(name)
            check_finite(name, mean, var, dtypes=() if dtype is None else (dtype,), data_hint=data_hint)
            stats[name] = (mean.float(), var.float())
    skipped = [n for n in channels if n not in stats]
    return RecalibrateResult(stats, "train", examples, 1, batch_size, skipped)
