"""Offline EvalNorm estimation of per-layer alpha and beta (EvalNorm eqs. 7-9, DESIGN §3).

The model runs once over the data with training-mode normalization in groups of B examples (dropout and
everything else in eval behaviour; no running-stat, parameter or gradient update: the pass runs on a deep
copy under ``torch.no_grad``). At every BN layer the input ``x`` and its statistics are observed:

- :class:`SampleReservoir` keeps a bounded uniform sample of (example, channel) rows (S positions of each)
  with their per-example and per-group statistics, so memory does not grow with the data;
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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import correction as C
from .errors import DataError, NumericalError, UsageError
from .health import STATS_HINT, statistics_problem
from .layers import batch_statistics_layers, correct_model, corrected_layers, layer_batch_sizes
from .passes import (
    Batch,
    ForwardFn,
    Observer,
    Progress,
    TrainingPass,
    check_observed,
    resolve_device,
    training_mode_pass,
)

#: Default number of sampled activation values kept per layer (float32): 2^19 values = 2 MiB.
DEFAULT_SAMPLE_BUDGET = 1 << 19
#: Default number of spatial positions sampled per (example, channel).
DEFAULT_POSITIONS = 64
#: Default number of (example, channel) rows the grid search evaluates L_aux on.
DEFAULT_SOLVE_ROWS = 4096


class SampleReservoir:
    """A bounded uniform sample of rows (one example's C channels, S positions each) and their statistics.

    Reservoir sampling over examples (Algorithm R, vectorised per batch): after any number of examples, each
    one seen is kept with equal probability, and memory stays ``capacity * C * (S + 4)`` numbers.
    """

    def __init__(self, channels: int, capacity: int, positions: int, generator: torch.Generator) -> None:
        self.channels = channels
        self.capacity = capacity
        self.positions = positions
        self.generator = generator
        self.seen = 0
        self.filled = 0
        self.values: Tensor | None = None
        self.stats = torch.zeros(4, capacity, channels, dtype=torch.float64)

    def add(self, x: Tensor, mu_i: Tensor, var_i: Tensor, mu_b: Tensor, var_b: Tensor) -> None:
        n = x.shape[0]
        idx = torch.arange(self.seen, self.seen + n)
        draw = (torch.rand(n, generator=self.generator, dtype=torch.float64) * (idx + 1)).long()
        slots = torch.where(idx < self.capacity, idx, draw)
        keep = {}
        for row, slot in enumerate(slots.tolist()):  # later rows win a shared slot, as in sequential order
            if slot < self.capacity:
                keep[slot] = row
        self.seen += n
        self.filled = min(self.capacity, self.seen)
        if not keep:
            return
        rows = torch.tensor(list(keep.values()), device=x.device)
        dest = torch.tensor(list(keep.keys()))
        # only the kept rows are gathered: once the reservoir is full most batches cost almost nothing
        flat = x.detach().index_select(0, rows).reshape(len(keep), self.channels, -1)
        size = flat.shape[2]
        s = min(size, self.positions)
        if self.values is None:
            self.values = torch.zeros(self.capacity, self.channels, s, dtype=torch.float32)
        if s < size:
            pos = torch.randperm(size, generator=self.generator)[:s].to(flat.device)
            flat = flat.index_select(2, pos)
        self.values[dest] = flat.float().cpu()
        for k, t in enumerate((mu_i, var_i, mu_b, var_b)):
            self.stats[k, dest] = t.detach().index_select(0, rows).double().cpu()

    def arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(values, mu_b, var_b, mu_i, var_i) of the kept rows; values unsorted, float32."""
        if self.values is None or self.filled == 0:
            raise DataError("no activations were observed")
        mu_i, var_i, mu_b, var_b = (t[: self.filled] for t in self.stats)
        return self.values[: self.filled], mu_b, var_b, mu_i, var_i


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
    """Result for one layer. L_aux values are on the layer's sample of activations."""

    name: str
    alpha: float
    beta: float
    l_aux_ema: float
    l_aux: float
    train_batch_size: int
    examples: int
    sampled_rows: int
    positions: int

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "name": self.name,
            "alpha": self.alpha,
            "beta": self.beta,
            "l_aux_ema": self.l_aux_ema,
            "l_aux": self.l_aux,
            "train_batch_size": self.train_batch_size,
            "sampled_rows": self.sampled_rows,
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
        if x.dim() == 2 and self.train_batch_size < 2:
            raise UsageError(
                f"layer {self.name} normalizes (N, C) inputs without spatial axes: with B = "
                f"{self.train_batch_size} its training-mode variance is the variance of one example, "
                "which is undefined",
                hint="pass the batch size the model was trained with (B >= 2), or --layer-batch-size "
                f"'{self.name}=B' for this layer",
            )
        check_observed(self.name, x, (mu_i, var_i, mu_b, var_b), data_hint=self.data_hint)
        if self.reservoir is None:
            c = x.shape[1]
            size = 1 if x.dim() == 2 else int(x[0, 0].numel())
            s = min(size, self.positions)
            capacity = max(1, self.sample_budget // (c * s))
            self.reservoir = SampleReservoir(c, capacity, s, self.generator)
        self.reservoir.add(x, mu_i, var_i, mu_b, var_b)

    def objective(self, dtype: torch.dtype = torch.float64) -> Callable[[Tensor, Tensor], Tensor]:
        """L_aux on the sample as a function of candidate (alpha, beta) vectors.

        At most ``solve_rows`` (example, channel) rows of the sample are used, drawn at random (the mean
        over rows is unbiased); every evaluation reads only those rows' sorted values.
        """
        if self.reservoir is None:
            raise DataError(f"layer {self.name} saw no data (is it used in the forward pass?)")
        values, mu_b, var_b, mu_i, var_i = self.reservoir.arrays()
        r, c, _ = values.shape
        channel = torch.arange(c).repeat(r)
        flat = [values.reshape(r * c, -1)] + [t.reshape(r * c) for t in (mu_b, var_b, mu_i, var_i)]
        if r * c > self.solve_rows:
            pick = self._pick if self._pick is not None else torch.randperm(r * c, generator=self.generator)
            self._pick = pick
            flat = [t[pick[: self.solve_rows]] for t in flat]
            channel = channel[pick[: self.solve_rows]]
        values, mu_b, var_b, mu_i, var_i = (t.unsqueeze(0).to(dtype) for t in flat)
        values = values.sort(dim=-1).values
        prefix = torch.cat([torch.zeros(*values.shape[:2], 1, dtype=dtype), values.cumsum(-1)], dim=-1)
        rm = self.running_mean[channel].to(dtype)
        rv = self.running_var[channel].to(dtype)
        rows = values.shape[1]
        chunk = max(1, (1 << 21) // max(1, rows))

        def f(alpha: Tensor, beta: Tensor) -> Tensor:
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

        return f

    def solve(self) -> LayerEstimate:
        """Grid-search (alpha, beta) in float32, then report L_aux at the result and at EMA in float64."""
        fast = self.objective(torch.float32)
        alpha, beta, _ = minimise_on_grid(fast)
        exact = self.objective(torch.float64)
        values = exact(
            torch.tensor([alpha, 0.0], dtype=torch.float64), torch.tensor([beta, 0.0], dtype=torch.float64)
        )
        res = self.reservoir
        assert res is not None
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
            sampled_rows=res.filled,
            positions=res.positions,
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

    return estimate_from_pass(
        {name: (m.norm.running_mean, m.norm.running_var, float(m.norm.eps)) for name, m in layers.items()},
        sizes,
        run_pass,
        train_batch_size,
        seed=seed,
        sample_budget=sample_budget,
        positions=positions,
        solve_rows=solve_rows,
        data_hint=data_hint,
    )


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
) -> EstimateResult:
    """EvalNorm offline over one training-mode pass, whatever runs the model (PyTorch or onnxruntime).

    ``layers``: name -> (running mean, running var, eps), in the order the estimators are made (they share
    one generator seeded with ``seed``, so the order fixes the samples); ``sizes``: each layer's
    normalization batch size B. ``run_pass`` (:data:`bncorrect.passes.TrainingPass`) runs the training-mode
    pass with these group sizes and an observer per layer; then every layer's (alpha, beta) is solved.
    Running statistics with NaN/Inf/negative variances, and NaN/Inf activations, raise
    :class:`NumericalError` naming the layer (and ``data_hint``, the data).
    """
    gen = torch.Generator().manual_seed(seed)
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
    examples, dropped = run_pass(sizes, {name: est.observe for name, est in estimators.items()})
    results = [est.solve() for est in estimators.values()]
    return EstimateResult(results, train_batch_size, examples, dropped, seed, sizes)
