"""Offline EvalNorm estimation of per-layer alpha and beta (EvalNorm eqs. 7-9, DESIGN §3).

The model runs once over the data with training-mode normalization in groups of B examples (dropout and
everything else in eval behaviour; no running-stat, parameter or gradient update: the pass runs on a deep
copy under ``torch.no_grad``). At every BN layer the input ``x`` and its statistics are observed:

- :class:`SampleReservoir` keeps a bounded uniform sample of (example, channel) rows (S positions of each)
  with their per-example and per-group statistics, the same number of rows of every channel, each channel
  sampling its examples independently (so a wide layer keeps rows of thousands of examples, not a handful
  of whole ones); memory does not grow with the data;
- :class:`EvalNormEstimator` minimises L_aux over (alpha, beta) in [0, 1]^2 on (a random subset of at
  most ``solve_rows`` rows of) that sample with a coarse-to-fine grid (11 x 11, then five 7 x 7
  refinements), each candidate evaluated from the sorted samples in O(log S) per row
  (:func:`bncorrect.correction.l_aux_sorted`): the minimiser over the whole square, not a local one, and
  no second pass over the data.

The estimators only see plain tensors: :func:`estimate_from_pass` makes one per layer, feeds them from a
training-mode pass it is given and solves them, so the PyTorch path (:func:`estimate_alpha_beta`) and the
onnxruntime path (:func:`bncorrect.onnx_passes.estimate_onnx`) differ only in what runs the model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from . import correction as C
from . import distributed
from .errors import DataError, NumericalError, UsageError
from .health import STATS_HINT, statistics_problem
from .layers import batch_statistics_layers, correct_model, corrected_layers, layer_batch_sizes
from .passes import (
    Batch,
    ForwardFn,
    Observer,
    Progress,
    TrainingPass,
    lcm,
    require_examples,
    resolve_device,
    training_mode_pass,
)

#: Default number of sampled activation values kept per layer (float32): 2^19 values = 2 MiB, i.e.
#: 2^19 / S (example, channel) rows of S positions (8192 rows at S = 64) shared equally by the channels.
DEFAULT_SAMPLE_BUDGET = 1 << 19
#: Default number of spatial positions sampled per (example, channel).
DEFAULT_POSITIONS = 64
#: Default number of (example, channel) rows the grid search evaluates L_aux on.
DEFAULT_SOLVE_ROWS = 4096
#: What the per-layer grid solves after the pass report to a progress callback (counting layers).
SOLVE_LABEL = "solve alpha/beta"


class SampleReservoir:
    """A bounded uniform sample of (example, channel) rows, S positions each, with each row's statistics.

    One reservoir of ``capacity`` rows per channel (Algorithm R over the examples, vectorised per batch,
    each channel drawing its own slots): after any number of examples every (example, channel) row seen is
    kept with the same probability ``capacity / seen``, each channel keeps the same number of rows (a
    stratified sample: the channels weigh equally in the mean over all rows, as in L_aux), and the channels
    keep rows of independently drawn examples, so a layer keeps up to ``channels * capacity`` distinct
    examples, not ``capacity`` whole ones. A row carries what L_aux needs of it: S of its positions (a
    uniform random choice, the same for the rows kept from one batch), its example's mean and variance,
    its normalization group's mean and variance, and the example's index in the pass. Memory:
    ``channels * capacity`` rows of S float32 values, four float64 statistics and one int64 index, fixed
    once the first batch is seen, whatever the amount of data.
    """

    def __init__(self, channels: int, capacity: int, positions: int, generator: torch.Generator) -> None:
        if channels < 1 or capacity < 1 or positions < 1:
            raise ValueError("channels, capacity and positions must be >= 1")
        self.channels = channels
        self.capacity = capacity  # rows kept per channel
        self.positions = positions  # at most this many positions per row (S; fixed by the first batch)
        self.generator = generator
        self.seen = 0  # examples observed
        self.filled = 0  # rows kept per channel: min(capacity, seen)
        self.values: Tensor | None = None  # (channels, capacity, S) float32
        self.stats = torch.zeros(4, channels, capacity, dtype=torch.float64)  # mu_i, var_i, mu_b, var_b
        self.example = torch.full((channels, capacity), -1, dtype=torch.long)  # index of each row's example

    def add(self, x: Tensor, mu_i: Tensor, var_i: Tensor, mu_b: Tensor, var_b: Tensor) -> None:
        """Offer the rows of a batch ``x`` (N, C, *spatial) with their statistics (N, C each)."""
        n, c, k = x.shape[0], self.channels, self.capacity
        if n == 0:
            return
        if x.shape[1] != c:
            raise DataError(f"expected {c} channels, got input of shape {tuple(x.shape)}")
        flat = x.detach().reshape(n, c, -1)
        size = flat.shape[2]
        if self.values is None:
            self.values = torch.zeros(c, k, min(size, self.positions), dtype=torch.float32)
        s = self.values.shape[2]
        if size < s:
            raise DataError(
                f"an input with {size} positions per (example, channel) after inputs with {s} or more: "
                "the estimator needs the same spatial size in every batch"
            )
        # Algorithm R per channel: example t (0-based, in pass order) takes slot t while t < k, else a slot
        # drawn uniformly from [0, t], kept if it is < k. The draws do not depend on the reservoir's
        # contents, so one batch's draws are made at once; rows of one batch drawing the same slot are
        # resolved as sequential order would: the later example wins.
        base = self.seen
        self.seen += n
        self.filled = min(k, self.seen)
        late = max(0, min(n, base + n - k))  # examples past the filling point
        if late == 0:  # still filling: example t takes slot t of every channel, no two rows collide
            lin = torch.arange(n * c)
            key = (lin % c) * k + (lin // c + base)
        else:
            # example t draws floor(u * (t + 1)) per channel: (late, C) slots of the examples past filling
            upper = torch.arange(base + n - late + 1, base + n + 1, dtype=torch.float64).unsqueeze(1)
            draw = torch.rand(late, c, generator=self.generator, dtype=torch.float64).mul_(upper).long()
            if late < n:  # the batch crosses the filling point: its first examples take their own slots
                first = torch.arange(base, base + n - late).unsqueeze(1).expand(-1, c)
                draw = torch.cat([first, draw])
            lin = (draw < k).view(-1).nonzero().squeeze(1)  # (example, channel) rows taking a slot, in order
            if lin.numel() == 0:
                return
            # their slots in the flattened (C * k) reservoir
            key = draw.add_(torch.arange(0, c * k, k)).view(-1).index_select(0, lin)
            winner = torch.full((c * k,), -1, dtype=torch.long).scatter_reduce_(0, key, lin, reduce="amax")
            won = winner.index_select(0, key).eq_(lin).nonzero().squeeze(1)
            if won.numel() < lin.numel():  # two rows of one batch drew the same slot: the later one stays
                lin, key = lin.index_select(0, won), key.index_select(0, won)
        lin_dev = lin.to(flat.device)
        # only the kept rows (and S of their positions) are gathered: once the reservoir is full most
        # batches cost almost nothing. The positions are read in increasing order (the values of a row are
        # a set: the solve sorts them), which is kinder to the cache than a random order.
        pos = None
        if s < size:
            pos = torch.randperm(size, generator=self.generator)[:s].sort().values.to(flat.device)
        picked = _gather_rows(flat, lin_dev, pos)
        self.values.view(c * k, s).index_copy_(0, key, picked.float().cpu())
        stats = torch.stack([v.detach().reshape(n * c) for v in (mu_i, var_i, mu_b, var_b)])
        self.stats.view(4, c * k).index_copy_(1, key, stats.index_select(1, lin_dev).double().cpu())
        self.example.view(-1).index_copy_(0, key, lin // c + base)

    def arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(values (C, R, S) float32 unsorted, mu_b, var_b, mu_i, var_i (C, R)) of the R rows kept per
        channel; row ``[c, r]`` is channel ``c`` of example ``example[c, r]``."""
        if self.values is None or self.filled == 0:
            raise DataError("no activations were observed")
        f = self.filled
        mu_i, var_i, mu_b, var_b = (t[:, :f] for t in self.stats)
        return self.values[:, :f], mu_b, var_b, mu_i, var_i

    def state(self) -> ReservoirState:
        """What :func:`merge_reservoirs` merges: examples seen and the kept rows (values, statistics,
        example indices) of every channel."""
        values = None if self.values is None else self.values[:, : self.filled].clone()
        return ReservoirState(
            self.seen, values, self.stats[:, :, : self.filled].clone(), self.example[:, : self.filled].clone()
        )

    def set_state(self, state: ReservoirState) -> None:
        """Hold ``state`` (e.g. a merge of several reservoirs), at most ``capacity`` rows per channel."""
        f = 0 if state.values is None else int(state.values.shape[1])
        if f > self.capacity:
            raise ValueError(f"{f} rows per channel do not fit a reservoir of {self.capacity}")
        self.seen, self.filled = int(state.seen), f
        if state.values is not None:
            s = int(state.values.shape[2])
            self.values = torch.zeros(self.channels, self.capacity, s, dtype=torch.float32)
            self.values[:, :f] = state.values
            self.stats[:, :, :f] = state.stats
            self.example[:, :f] = state.example

    def distinct_examples(self) -> int:
        """How many different examples the kept rows come from."""
        return int(torch.unique(self.example[:, : self.filled]).numel())

    def stored_elements(self) -> int:
        """Numbers held (values, statistics, example indices): fixed by the first batch."""
        values = 0 if self.values is None else self.values.numel()
        return values + self.stats.numel() + self.example.numel()


class ReservoirState(NamedTuple):
    """A :class:`SampleReservoir`'s contents as plain tensors: ``seen`` examples observed, and the R rows
    kept of each of the C channels: ``values`` (C, R, S) float32 (None before any data), ``stats``
    (4, C, R) float64 (mu_i, var_i, mu_b, var_b) and ``example`` (C, R) int64, each row's example."""

    seen: int
    values: Tensor | None
    stats: Tensor
    example: Tensor


def merge_reservoirs(
    parts: Sequence[ReservoirState | None], capacity: int, generator: torch.Generator
) -> ReservoirState | None:
    """A uniform sample of ``min(capacity, sum of seen)`` rows per channel of the union of the data the
    ``parts`` saw (disjoint parts, e.g. one per rank), from their reservoirs; None when no part saw data.

    Part k saw n_k examples and keeps f_k = min(capacity, n_k) of each channel's rows, a uniform sample of
    its n_k. Per channel, how many rows come from each part is drawn from the multivariate hypergeometric
    law (the counts a uniform draw of f rows from all N = sum n_k would take from each part), then that
    many of the part's kept rows uniformly: a uniform sample of a uniform sample is one of the part's
    rows, so the result is exactly distributed as a uniform sample without replacement of the union, as
    one reservoir over all the data would hold (not the same rows: another draw). Each channel draws
    independently. Example indices keep their parts' numbering (make them distinct across parts before).
    Parts with ``seen == 0`` or None are skipped."""
    full = [p for p in parts if p is not None and p.seen > 0 and p.values is not None]
    if not full:
        return None
    if len(full) == 1 and full[0].values is not None and full[0].values.shape[1] <= capacity:
        return full[0]
    c = int(full[0].values.shape[0])  # type: ignore[union-attr]
    s = min(int(p.values.shape[2]) for p in full)  # type: ignore[union-attr]
    seen = [int(p.seen) for p in full]
    total = sum(seen)
    f = min(capacity, total)
    rng = np.random.Generator(np.random.PCG64(int(torch.randint(0, 2**62, (1,), generator=generator))))
    # counts[k, ch]: rows channel ch takes from part k (sequential conditional hypergeometric draws)
    counts = np.zeros((len(full), c), dtype=np.int64)
    left = np.full(c, f, dtype=np.int64)
    rest = total
    for k, n_k in enumerate(seen):
        rest -= n_k
        if k == len(full) - 1:
            counts[k] = left
        elif n_k > 0:
            counts[k] = rng.hypergeometric(n_k, rest, left) if rest > 0 else left
        left = left - counts[k]
    values, stats, example = [], [], []
    for k, part in enumerate(full):
        assert part.values is not None
        fk = int(part.values.shape[1])
        take = torch.from_numpy(counts[k]).unsqueeze(1)  # (C, 1)
        order = torch.rand(c, fk, generator=generator).argsort(dim=1)  # a random order of each channel's rows
        chosen = torch.zeros(c, fk, dtype=torch.bool).scatter_(
            1, order, torch.arange(fk).expand(c, fk) < take
        )
        values.append((part.values[:, :, :s], chosen))
        stats.append(part.stats)
        example.append(part.example)
    mask = torch.cat([m for _, m in values], dim=1)  # (C, sum f_k): exactly f True per channel
    out_values = torch.cat([v for v, _ in values], dim=1)[mask].view(c, f, s)
    out_stats = torch.cat(stats, dim=2)[:, mask].view(4, c, f)
    out_example = torch.cat(example, dim=1)[mask].view(c, f)
    return ReservoirState(total, out_values, out_stats, out_example)


def _gather_rows(flat: Tensor, lin: Tensor, pos: Tensor | None) -> Tensor:
    """Rows ``lin`` (indices into the N * C rows) of ``flat`` (N, C, L) at positions ``pos`` (None: all):
    (len(lin), S), moving as few values as the layout allows."""
    n, c, size = flat.shape
    try:
        rows = flat.view(n * c, size)
    except RuntimeError:  # no (N * C, L) view (e.g. channels_last): index each value where it is
        r, ch = lin // c, lin % c
        if pos is None:
            return flat[r, ch]
        return flat[r.unsqueeze(1), ch.unsqueeze(1), pos.unsqueeze(0)]
    if pos is None:
        return rows.index_select(0, lin)
    if lin.numel() * size <= n * c * pos.numel():  # few rows: the rows, then their positions
        return rows.index_select(0, lin).index_select(1, pos)
    return rows.index_select(1, pos).index_select(0, lin)  # most rows (while filling): positions first


def minimise_on_grid(
    objective: Callable[[Tensor, Tensor], Tensor], *, coarse: int = 11, levels: int = 5, fine: int = 7
) -> tuple[float, float, float]:
    """Minimise ``objective(alpha (K,), beta (K,)) -> (K,)`` over [0, 1]^2, coarse-to-fine.

    Returns (alpha, beta, value). The first grid covers the square (step 0.1 by default); each refinement
    covers +/- one step of the previous grid around its best point with ``fine`` points per axis, so the
    final resolution is 0.1 / 3^5 ~ 4e-4 after 121 + 5 * 49 evaluations.
    """
    lo_a, hi_a, lo_b, hi_b, n = 0.0, 1.0, 0.0, 1.0, coarse
    best = (0.0, 0.0, float("inf"))
    for _ in range(levels + 1):
        ga = torch.linspace(lo_a, hi_a, n, dtype=torch.float64)
        gb = torch.linspace(lo_b, hi_b, n, dtype=torch.float64)
        aa, bb = torch.meshgrid(ga, gb, indexing="ij")
        values = objective(aa.reshape(-1), bb.reshape(-1))
        i = int(torch.argmin(values))
        if float(values[i]) < best[2]:
            best = (float(aa.reshape(-1)[i]), float(bb.reshape(-1)[i]), float(values[i]))
        step_a = (hi_a - lo_a) / (n - 1)
        step_b = (hi_b - lo_b) / (n - 1)
        a, b = best[0], best[1]
        lo_a, hi_a = max(0.0, a - step_a), min(1.0, a + step_a)
        lo_b, hi_b = max(0.0, b - step_b), min(1.0, b + step_b)
        n = fine
    return best


@dataclass
class LayerEstimate:
    """Result for one layer. L_aux values are on the rows of the layer's sample the solve used."""

    name: str
    alpha: float
    beta: float
    l_aux_ema: float
    l_aux: float
    train_batch_size: int
    examples: int
    sampled_rows: int  # (example, channel) rows in the sample
    sampled_examples: int  # distinct examples those rows come from
    positions: int  # positions kept per row (S)

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "name": self.name,
            "alpha": self.alpha,
            "beta": self.beta,
            "l_aux_ema": self.l_aux_ema,
            "l_aux": self.l_aux,
            "train_batch_size": self.train_batch_size,
            "sampled_rows": self.sampled_rows,
            "sampled_examples": self.sampled_examples,
            "positions": self.positions,
        }


class EvalNormEstimator:
    """Estimates one layer's (alpha, beta) from observed inputs: feed :meth:`observe`, then :meth:`solve`."""

    def __init__(
        self,
        name: str,
        running_mean: Tensor,
        running_var: Tensor,
        eps: float,
        train_batch_size: int,
        *,
        sample_budget: int = DEFAULT_SAMPLE_BUDGET,
        positions: int = DEFAULT_POSITIONS,
        solve_rows: int = DEFAULT_SOLVE_ROWS,
        generator: torch.Generator,
        data_hint: str = "",
    ) -> None:
        problem = statistics_problem(running_mean, running_var)
        if problem is not None:
            raise NumericalError(
                f"layer {name} cannot be estimated against its running statistics: {problem}",
                hint=STATS_HINT,
            )
        self.name = name
        self.data_hint = data_hint
        self.running_mean = running_mean.detach().double().cpu()
        self.running_var = running_var.detach().double().cpu()
        self.eps = float(eps)
        self.train_batch_size = train_batch_size
        self.sample_budget = sample_budget
        self.positions = positions
        self.solve_rows = solve_rows
        self.generator = generator
        self._pick: Tensor | None = None  # the rows the solve uses, fixed once drawn
        self.reservoir: SampleReservoir | None = None

    def observe(self, x: Tensor, mu_i: Tensor, var_i: Tensor, mu_b: Tensor, var_b: Tensor) -> None:
        """Offer one batch of the layer's input ``x`` with its statistics to the sample. The inputs are
        those of a training-mode pass, which checks them for NaN/Inf before any observer sees them
        (:func:`bncorrect.passes.check_observed`); fed here directly, NaN/Inf among the rows the solve
        uses make :meth:`solve` raise :class:`NumericalError`."""
        if x.dim() == 2 and self.train_batch_size < 2:
            raise UsageError(
                f"layer {self.name} normalizes (N, C) inputs without spatial axes: with B = "
                f"{self.train_batch_size} its training-mode variance is the variance of one example, "
                "which is undefined",
                hint="pass the batch size the model was trained with (B >= 2), or --layer-batch-size "
                f"'{self.name}=B' for this layer",
            )
        if self.reservoir is None:
            c = x.shape[1]
            s = min(math.prod(x.shape[2:]), self.positions)
            # the budget counts values: rows of S positions, shared equally by the channels
            capacity = max(1, self.sample_budget // (c * s))
            self.reservoir = SampleReservoir(c, capacity, s, self.generator)
        self.reservoir.add(x, mu_i, var_i, mu_b, var_b)

    def merge_ranks(self, rank: int, world: int) -> None:
        """Collective (under a process group): rank 0's reservoir becomes :func:`merge_reservoirs` of every
        rank's (example indices made distinct: index * world + rank); the others keep theirs."""
        state = None if self.reservoir is None else self.reservoir.state()
        if state is not None:
            state = state._replace(example=state.example * world + rank)
        parts = distributed.gather_to_writer(state)
        if parts is None:
            return
        first = next((p for p in parts if p is not None and p.values is not None), None)
        if first is None or first.values is None:
            return
        c, s = int(first.values.shape[0]), int(first.values.shape[2])
        capacity = (
            self.reservoir.capacity if self.reservoir is not None else max(1, self.sample_budget // (c * s))
        )
        merged = merge_reservoirs(parts, capacity, self.generator)
        assert merged is not None
        if self.reservoir is None:
            self.reservoir = SampleReservoir(c, capacity, s, self.generator)
        self.reservoir.set_state(merged)
        self._pick = None

    def objective(
        self, dtype: torch.dtype = torch.float64, *, rows: int | None = None
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """L_aux on the sample as a function of candidate (alpha, beta) vectors.

        At most ``rows`` (default ``solve_rows``; 0: all) (example, channel) rows of the sample are used:
        each channel's rows in a random order, taken one per channel in turn (channels in a random order),
        so the channels stay represented equally (within one row) and the mean over the rows taken stays an
        unbiased estimate of L_aux. The same rows are used on every call. Every evaluation reads only those
        rows' sorted values.
        """
        return self._objective(self._sorted_sample(rows), dtype)

    def _sorted_sample(self, rows: int | None) -> tuple[Tensor, ...]:
        """The rows :meth:`objective` uses: (values (n, S) float32 sorted ascending within each row; mu_b,
        var_b, mu_i, var_i (n,) float64; channel (n,) int64). Sorted once in float32: the conversion to
        float64 is exact and order-preserving, so the float64 objective reads the same sorted values."""
        if self.reservoir is None:
            raise DataError(f"layer {self.name} saw no data (is it used in the forward pass?)")
        values, mu_b, var_b, mu_i, var_i = self.reservoir.arrays()
        c, f, _ = values.shape
        limit = self.solve_rows if rows is None else rows
        flat = [values.reshape(c * f, -1)] + [t.reshape(c * f) for t in (mu_b, var_b, mu_i, var_i)]
        channel = torch.arange(c).repeat_interleave(f)
        if 0 < limit < c * f:
            if self._pick is None:
                within = torch.rand(c, f, generator=self.generator).argsort(dim=1)  # each channel's rows
                order = torch.randperm(c, generator=self.generator)  # which channels come first
                self._pick = (order.unsqueeze(0) * f + within[order].T).reshape(-1)  # round by round
            pick = self._pick[:limit]
            flat = [t[pick] for t in flat]
            channel = channel[pick]
        return (flat[0].sort(dim=-1).values, *flat[1:], channel)

    def _objective(
        self, sample: tuple[Tensor, ...], dtype: torch.dtype
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """:meth:`objective` on a :meth:`_sorted_sample`, evaluated in ``dtype``."""
        sorted32, *stats, channel = sample
        values, mu_b, var_b, mu_i, var_i = (t.unsqueeze(0).to(dtype) for t in (sorted32, *stats))
        prefix = torch.cat([torch.zeros(*values.shape[:2], 1, dtype=dtype), values.cumsum(-1)], dim=-1)
        rm = self.running_mean[channel].to(dtype)
        rv = self.running_var[channel].to(dtype)
        n_rows = values.shape[1]
        chunk = max(1, (1 << 21) // max(1, n_rows))

        def f_(alpha: Tensor, beta: Tensor) -> Tensor:
            out = [
                C.l_aux_sorted(
                    values,
                    prefix,
                    mu_b,
                    var_b,
                    mu_i,
                    var_i,
                    rm,
                    rv,
                    self.eps,
                    alpha[i : i + chunk],
                    beta[i : i + chunk],
                )
                for i in range(0, alpha.numel(), chunk)
            ]
            return torch.cat(out).double()

        return f_

    def solve(self) -> LayerEstimate:
        """Grid-search (alpha, beta) in float32 on at most ``solve_rows`` rows of the sample, then report
        L_aux at the result and at EMA in float64 on the same rows."""
        sample = self._sorted_sample(None)
        alpha, beta, _ = minimise_on_grid(self._objective(sample, torch.float32))
        exact = self._objective(sample, torch.float64)
        values = exact(
            torch.tensor([alpha, 0.0], dtype=torch.float64), torch.tensor([beta, 0.0], dtype=torch.float64)
        )
        res = self.reservoir
        assert res is not None and res.values is not None
        if not bool(torch.isfinite(values).all()):
            raise NumericalError(
                f"L_aux of layer {self.name} is NaN/Inf at alpha = {alpha:g}, beta = {beta:g} "
                f"(EMA: {float(values[1])}) on the sample of {self.data_hint or 'the data'}",
                path=self.data_hint or None,
                hint="check the data and its preprocessing (values, --mean/--std) and the checkpoint's "
                "statistics (`bncorrect inspect MODEL`)",
            )
        return LayerEstimate(
            name=self.name,
            alpha=alpha,
            beta=beta,
            l_aux_ema=float(values[1]),
            l_aux=float(values[0]),
            train_batch_size=self.train_batch_size,
            examples=res.seen,
            sampled_rows=res.channels * res.filled,
            sampled_examples=res.distinct_examples(),
            positions=int(res.values.shape[2]),
        )


@dataclass
class EstimateResult:
    """Per-layer estimates plus what the pass saw."""

    layers: list[LayerEstimate]
    train_batch_size: int
    examples: int
    dropped: int
    seed: int
    layer_batch_sizes: dict[str, int] = field(default_factory=dict)

    def alpha(self) -> dict[str, float]:
        return {ly.name: ly.alpha for ly in self.layers}

    def beta(self) -> dict[str, float]:
        return {ly.name: ly.beta for ly in self.layers}

    def as_dict(self) -> dict[str, object]:
        return {
            "train_batch_size": self.train_batch_size,
            "examples": self.examples,
            "dropped": self.dropped,
            "seed": self.seed,
            "layers": [ly.as_dict() for ly in self.layers],
        }


def estimate_alpha_beta(
    model: nn.Module,
    batches: Iterable[Batch],
    train_batch_size: int,
    *,
    layer_batch_size: Mapping[str, int] | None = None,
    forward_fn: ForwardFn | None = None,
    device: str | torch.device | None = "cpu",
    seed: int = 0,
    sample_budget: int = DEFAULT_SAMPLE_BUDGET,
    positions: int = DEFAULT_POSITIONS,
    solve_rows: int = DEFAULT_SOLVE_ROWS,
    total_examples: int | None = None,
    progress: Progress | None = None,
    data_hint: str = "",
) -> EstimateResult:
    """Estimate every correctable BN layer's (alpha, beta) over ``batches`` (EvalNorm offline).

    ``batches`` should be shuffled and hold a multiple of the normalization batch size B examples (each
    batch is cut to a multiple of the least common multiple of all layers' B; the rest is counted in
    ``dropped``). ``layer_batch_size`` maps glob patterns of layer names to their own B (e.g. heads that
    normalize over more examples). Layers with ``track_running_stats=False`` (left uncorrected) normalize
    over groups of their B too, as in training. ``model`` itself is not modified. NaN/Inf activations
    raise :class:`NumericalError` naming the first layer that meets them and the data.
    """
    layers, sizes, run_pass = estimation_pass(
        model,
        batches,
        train_batch_size,
        layer_batch_size=layer_batch_size,
        forward_fn=forward_fn,
        device=device,
        total_examples=total_examples,
        progress=progress,
        data_hint=data_hint,
    )
    return estimate_from_pass(
        layers,
        sizes,
        run_pass,
        train_batch_size,
        seed=seed,
        sample_budget=sample_budget,
        positions=positions,
        solve_rows=solve_rows,
        data_hint=data_hint,
        progress=progress,
    )


def estimation_pass(
    model: nn.Module,
    batches: Iterable[Batch],
    train_batch_size: int,
    *,
    layer_batch_size: Mapping[str, int] | None = None,
    forward_fn: ForwardFn | None = None,
    device: str | torch.device | None = "cpu",
    total_examples: int | None = None,
    progress: Progress | None = None,
    data_hint: str = "",
) -> tuple[dict[str, tuple[Tensor, Tensor, float]], dict[str, int], TrainingPass]:
    """What :func:`estimate_from_pass` needs for a PyTorch ``model`` (not modified): every correctable
    layer's (running mean, running var, eps) and B, and the training-mode pass over ``batches`` on a copy
    of the model (layers with ``track_running_stats=False`` normalizing over groups of their B too)."""
    check_batch_sizes(train_batch_size, layer_batch_size)
    dev = resolve_device(device)
    work = copy.deepcopy(model)
    correct_model(work, 0.0)
    work.to(dev)
    layers = corrected_layers(work)
    sizes = layer_batch_sizes(list(layers), train_batch_size, layer_batch_size)
    untracked = layer_batch_sizes(list(batch_statistics_layers(work)), train_batch_size, layer_batch_size)

    def run_pass(group_sizes: Mapping[str, int], observers: Mapping[str, Observer]) -> tuple[int, int]:
        return training_mode_pass(
            work,
            batches,
            group_sizes,
            observers,
            forward_fn=forward_fn,
            device=dev,
            label="estimate",
            total_examples=total_examples,
            progress=progress,
            data_hint=data_hint,
            batch_stat_sizes=untracked,
        )

    stats = {name: (m.norm.running_mean, m.norm.running_var, float(m.norm.eps)) for name, m in layers.items()}
    return stats, sizes, run_pass


def check_batch_sizes(train_batch_size: int, layer_batch_size: Mapping[str, int] | None) -> None:
    """:class:`UsageError` unless the normalization batch size B and every per-layer B is >= 1."""
    if train_batch_size < 1:
        raise UsageError(f"--train-batch-size must be >= 1, got {train_batch_size}")
    for pattern, b in (layer_batch_size or {}).items():
        if b < 1:
            raise UsageError(f"--layer-batch-size {pattern}={b}: B must be >= 1")


def estimate_from_pass(
    layers: Mapping[str, tuple[Tensor, Tensor, float]],
    sizes: dict[str, int],
    run_pass: TrainingPass,
    train_batch_size: int,
    *,
    seed: int = 0,
    sample_budget: int = DEFAULT_SAMPLE_BUDGET,
    positions: int = DEFAULT_POSITIONS,
    solve_rows: int = DEFAULT_SOLVE_ROWS,
    data_hint: str = "",
    progress: Progress | None = None,
    solve_label: str = SOLVE_LABEL,
) -> EstimateResult:
    """EvalNorm offline over one training-mode pass, whatever runs the model (PyTorch or onnxruntime).

    ``layers``: name -> (running mean, running var, eps), in the order the estimators are made (they share
    one generator seeded with ``seed``, so the order fixes the samples); ``sizes``: each layer's
    normalization batch size B. ``run_pass`` (:data:`bncorrect.passes.TrainingPass`) runs the training-mode
    pass with these group sizes and an observer per layer; then every layer's (alpha, beta) is solved.
    Running statistics with NaN/Inf/negative variances, and NaN/Inf activations, raise
    :class:`NumericalError` naming the layer (and ``data_hint``, the data). ``progress`` hears
    ``(solve_label, layers solved, layers)`` during the solves (after the pass, which reports its own).
    """
    # under a process group each rank samples with its own stream (rank 0 with the seed itself)
    rank, world = distributed.rank(), distributed.world_size()
    gen = torch.Generator().manual_seed(seed + 1_000_003 * rank)
    estimators = {
        name: EvalNormEstimator(
            name,
            mean,
            var,
            eps,
            sizes[name],
            sample_budget=sample_budget,
            positions=positions,
            solve_rows=solve_rows,
            generator=gen,
            data_hint=data_hint,
        )
        for name, (mean, var, eps) in layers.items()
    }
    observers = {name: est.observe for name, est in estimators.items()}
    examples, dropped = distributed.guarded(lambda: run_pass(sizes, observers))
    def solve_all() -> list[LayerEstimate]:
        out = []
        if progress is not None:
            progress(solve_label, 0, len(estimators))
        for est in estimators.values():
            out.append(est.solve())
            if progress is not None:
                progress(solve_label, len(out), len(estimators))
        return out

    if world > 1:
        examples, dropped = distributed.sum_ints(examples, dropped)
        require_examples(examples, dropped, lcm(sizes.values()), data_hint)
        for est in estimators.values():
            est.merge_ranks(rank, world)
        # rank 0 solves on the merged samples; every rank gets its results (or its error)
        results = distributed.on_writer(solve_all)
    else:
        results = solve_all()
    return EstimateResult(results, train_batch_size, examples, dropped, seed, sizes)
