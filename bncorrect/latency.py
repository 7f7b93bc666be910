"""``--latency-budget R`` (issue #15, part 3): correct only the layers worth their measured latency.

Given the correction a command chose (per-layer alpha/beta and optionally new running statistics) and a
way to score any part of it on the command's data (a :data:`Scorer`: the metric of the correction
restricted to each of several subsets of layers, in one pass over the data), :func:`plan_budget`

1. scores, in **one pass**, the plain graph, the full correction and the full correction with each layer
   reset to plain BN in turn: a layer's **gain** is the full correction's metric minus that with this one
   layer plain (leave-one-out), in the metric's improvement units;
2. measures each layer's **cost**: the onnxruntime latency of the graph correcting only this layer over
   the plain graph's, minus 1 (:func:`measure_ratios`: one session per graph, runs interleaved round by
   round, median), with the full correction's ratio alongside;
3. finds the subsets worth measuring: with ``selection="exact"`` (the default) the exact additive Pareto
   frontier of (cost, gain) (:func:`bncorrect.budget.pareto_front`, the 0-1 knapsack for every budget at
   once), thinned to at most ``max_points`` points around the optimum within R
   (:func:`bncorrect.budget.points_to_measure`); with ``"greedy"`` the prefixes of the order by gain per
   cost (the selection before; kept for comparison);
4. **measures every one of those subsets as a real graph**: its latency ratio in onnxruntime (one
   interleaved timing run for all of them) and its metric (one more scoring pass for all of them), and
   writes the best measured point whose measured ratio is <= R (when the additive optimum measures over R
   the choice falls back along the curve). The curve shown is the Pareto frontier of the measured points.

Scorers run a sweep engine on the data, all subsets of a pass as sweep candidates (:func:`sweep_scorer`).
The commands use the onnxruntime sweep graph of :func:`bncorrect.onnx_passes.sweep_onnx` on the plain
graph (MODEL itself, or a PyTorch model's export with BN kept, which the timing needs anyway): one session
for every subset, so the metric is computed in the runtime the graph is written for (the sweep graph's
corrected layer equals the written one to float rounding; the tests check the written graph's metric
against its point), and classification (nll, top1,
top5) and segmentation (pixel-nll, miou, pixel-acc, with the sweep's
:class:`~bncorrect.sweep.SegmentationTally`) are scored by the code that scores them in ``sweep-alpha``.
Measured against one session per subset and against the stacked PyTorch sweep (benchmarks/README.md,
"Latency budget"): 0.44-0.97x the time of one session per subset on the samples and two synthetic nets,
quiet host or loaded; the stacked PyTorch sweep 0.26-1.02x quiet, 2-3.4x loaded. Segmentation is accepted only
from callers that say so (``segmentation=True``); others get the clear refusal.

A graph that corrects any layer runs strictly more ops than the plain one, so its ratio is taken as at
least 1 + 1e-6 (a measured ratio below that is timer noise): R = 1 keeps every BN plain. Under a process
group the scoring passes are data-parallel (every rank scores its shard, the sweep merges the tallies) and
the timing runs on rank 0 only (its ratios are broadcast), so every rank makes the same choice.

The latency measurement is a parameter (``latency``): tests inject a deterministic cost model; the library
never asserts on times.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from torch import Tensor

from .budget import (
    DEFAULT_MAX_POINTS,
    BudgetPoint,
    LayerOption,
    budget_curve,
    measured_front,
    pareto_front,
    points_to_measure,
    select_within_budget,
)
from .errors import NumericalError, UsageError, spell

if TYPE_CHECKING:
    from .sweep import Candidate, SweepResult

__all__ = [
    "BUDGET_METRICS",
    "SELECTIONS",
    "BudgetReport",
    "LatencyFn",
    "Scorer",
    "Subset",
    "check_budget",
    "measure_ratios",
    "plan_budget",
    "plot_budget",
    "subset_candidates",
    "subset_graph",
    "sweep_scorer",
]

#: A set of corrected layers, in the command's layer names.
Subset = tuple[str, ...]
#: ``latency(plain, graphs, x)``: latency of each graph divided by the plain graph's, on input ``x``
LatencyFn = Callable[[onnx.ModelProto, Sequence[onnx.ModelProto], np.ndarray], list[float]]
#: ``score(subsets)``: the metric of the correction restricted to each subset (the other layers plain BN,
#: new statistics kept), one value per subset (NaN where the outputs were not finite), in one data pass
Scorer = Callable[[Sequence[Subset]], list[float]]
#: Metrics of classification scorers; segmentation adds bncorrect.sweep.SEGMENTATION_METRICS.
BUDGET_METRICS = ("nll", "top1", "top5")
#: Metrics where lower is better.
_LOWER_IS_BETTER = ("nll", "pixel-nll")
#: How the subsets to measure are found (module docstring, step 3).
SELECTIONS = ("exact", "greedy")
_MIN_EXTRA = 1e-6


def check_budget(
    budget: float | None, out: str | Path | None, metric: str, metrics: Sequence[str] = BUDGET_METRICS
) -> float | None:
    """Validate ``--latency-budget`` against OUT and the metric (one of ``metrics``, those the command's
    scorer supports) before any pass over data."""
    if budget is None:
        return None
    if not (budget == budget and budget >= 1.0 and budget != float("inf")):
        raise UsageError(
            f"{spell('latency_budget', f'{budget:g}')} is not a latency ratio >= 1",
            hint="give the largest acceptable latency of the written graph over the uncorrected one, e.g. "
            "--latency-budget 1.2 (1: keep every BN plain)",
        )
    if out is None or Path(out).suffix.lower() != ".onnx":
        raise UsageError(
            f"{spell('latency_budget', 'R')} is about the written ONNX graph's latency in onnxruntime, and "
            + ("OUT is not given" if out is None else f"OUT is {Path(out).name}"),
            path=None if out is None else Path(out),
            hint="write a graph: -o corrected.onnx",
        )
    if metric not in metrics:
        if set(metrics) == set(BUDGET_METRICS):
            hint = "choose --metric nll, top1 or top5 (classification logits as the graph's first output)"
        else:
            hint = f"choose --metric {', '.join(metrics)}"
        raise UsageError(
            f"{spell('latency_budget', 'R')} measures gains in {', '.join(metrics)}, not {metric!r}",
            hint=hint,
        )
    return float(budget)


def _session(proto: onnx.ModelProto) -> Any:
    """A CPU session for timing, default threads, whose threads do not spin-wait after a run: the
    sessions are run in turn, and with spinning (onnxruntime's default) the idle threads of the one just
    run compete with the next one (single ratios of 12-23x instead of about 2 on a 2-core host,
    benchmarks/README.md, "Latency budget")."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _feed(sess: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    inp = sess.get_inputs()[0]
    want = {"tensor(float16)": np.float16, "tensor(double)": np.float64}.get(inp.type, np.float32)
    return {inp.name: np.ascontiguousarray(x, dtype=want)}


def measure_ratios(
    plain: onnx.ModelProto,
    graphs: Sequence[onnx.ModelProto],
    x: np.ndarray,
    *,
    repeats: int = 15,
    warmup: int = 2,
) -> list[float]:
    """Latency of each graph over ``plain``'s in onnxruntime (CPU, default threads, no spinning,
    :func:`_session`) on input ``x``: every round runs each session once (plain first, then the others,
    the order rotated each round), and a graph's ratio is the median of its per-round ratios to plain."""
    sessions = [_session(g) for g in (plain, *graphs)]
    feeds = [_feed(s, x) for s in sessions]
    for s, f in zip(sessions, feeds, strict=True):
        for _ in range(warmup):
            s.run(None, f)
    per_round: list[list[float]] = [[] for _ in graphs]
    for r in range(max(1, repeats)):
        times = [0.0] * len(sessions)
        order = list(range(len(sessions)))
        k = r % len(order)
        for i in order[k:] + order[:k]:
            t0 = time.perf_counter()
            sessions[i].run(None, feeds[i])
            times[i] = time.perf_counter() - t0
        for j in range(len(graphs)):
            per_round[j].append(times[j + 1] / max(times[0], 1e-12))
    return [float(statistics.median(v)) for v in per_round]


def _better(metric: str, value: float, base: float) -> float:
    """How much ``value`` improves on ``base`` (positive: better)."""
    return base - value if metric in _LOWER_IS_BETTER else value - base


# ------------------------------------------------------------------------------------------------ scoring
def subset_candidates(
    subsets: Sequence[Subset],
    alpha: Mapping[str, Any],
    beta: Mapping[str, Any],
    running_stats: Mapping[str, tuple[Any, Any]] | None = None,
) -> list[Candidate]:
    """One sweep candidate per subset: ``alpha``/``beta`` on its layers, every other layer plain BN, and
    ``running_stats`` (new statistics) on every layer that has them, as the written graph would have."""
    from .sweep import Candidate

    stats = dict(running_stats or {})
    out = []
    for k, subset in enumerate(subsets):
        keep = set(subset)
        a = {n: v for n, v in alpha.items() if n in keep}
        b = {n: beta.get(n, alpha[n]) for n in a}
        out.append(Candidate(f"budget subset {k}", a, b, stats or None, "extra"))
    return out


def sweep_scorer(
    sweep: Callable[[Sequence[Candidate]], SweepResult],
    alpha: Mapping[str, Any],
    beta: Mapping[str, Any],
    running_stats: Mapping[str, tuple[Any, Any]] | None,
    metric: str,
    *,
    segmentation: bool = False,
) -> Scorer:
    """A :data:`Scorer` over a sweep engine: ``sweep(candidates)`` evaluates the candidates on the
    command's data in one pass (e.g. :func:`bncorrect.sweep.sweep_alpha` or
    :func:`bncorrect.onnx_passes.sweep_onnx` with no grid and ``extra_candidates=candidates``) and returns
    its :class:`~bncorrect.sweep.SweepResult`, whose tallies give ``metric`` of every subset. A per-pixel
    output is refused unless ``segmentation`` (the caller scores segmentation: pixel-nll, miou,
    pixel-acc)."""
    from .sweep import task_metric

    def score(subsets: Sequence[Subset]) -> list[float]:
        result = sweep(subset_candidates(subsets, alpha, beta, running_stats))
        if result.task == "segmentation" and not segmentation:
            raise UsageError(
                "--latency-budget here scores classification logits (N, K), and the model's output is "
                "per-pixel (segmentation masks as labels)",
                hint="use --latency-budget with classification models here, or with sweep-alpha for "
                "segmentation models",
            )
        name = task_metric(metric, result.task)
        rows = result.rows[1:]  # rows[0] is the sweep's own EMA row; the subsets follow in order
        return [row.value(name) if row.finite else math.nan for row in rows]

    return score


def subset_graph(
    plain: onnx.ModelProto,
    alpha: Mapping[str, Any],
    beta: Mapping[str, Any],
    stats: Mapping[str, tuple[Any, Any]],
    layers: Sequence[str],
) -> onnx.ModelProto:
    """``plain`` with ``layers`` (BN node names) corrected and every node in ``stats`` fed its new
    statistics: the graph ``--latency-budget`` writes for that subset."""
    from .onnx_rewrite import rewrite

    keep = set(layers)
    a = {n: v for n, v in alpha.items() if n in keep}
    b = {n: v for n, v in beta.items() if n in keep}
    return rewrite(plain, a, b, running_stats=dict(stats) or None)[0]


# ------------------------------------------------------------------------------------------------- report
@dataclass
class BudgetReport:
    """What ``--latency-budget`` measured and chose.

    ``measured`` are all subsets measured as real graphs (the plain graph first): each point carries the
    measured gain over the plain graph (in the metric's improvement units) and the measured latency ratio;
    ``curve`` is their Pareto frontier (by increasing ratio, each point better than every cheaper one),
    ``metrics[i]`` the metric of ``curve[i]``, ``metric_of`` the metric of every measured subset;
    ``chosen`` the point written (on the curve). ``selection``: how the measured subsets were found
    ("exact": the additive Pareto frontier, ``frontier_exact`` False when cost buckets were used;
    "greedy": prefixes by gain per cost)."""

    budget: float
    metric: str
    layers: list[str]
    gains: dict[str, float]
    costs: dict[str, float]
    curve: list[BudgetPoint]
    metrics: list[float]
    chosen: BudgetPoint
    full_metric: float
    full_ratio: float
    measured: list[BudgetPoint] = field(default_factory=list)
    metric_of: dict[Subset, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    #: what the metric was measured on: "held-out" (tune) or "data" (sweep-alpha: the data it chose on)
    scored_on: str = "held-out"
    selection: str = "exact"
    frontier_exact: bool = True
    #: scoring passes over the data and timing runs (each: one session per graph, interleaved rounds)
    passes: int = 0
    timing_runs: int = 0

    @property
    def selected(self) -> list[str]:
        return list(self.chosen.layers)

    def renamed(self, names: Mapping[str, str]) -> BudgetReport:
        """The same report with layers renamed by ``names`` (e.g. BN node name -> the command's layer
        name)."""

        def r(layers: Sequence[str]) -> Subset:
            return tuple(names.get(n, n) for n in layers)

        def point(p: BudgetPoint) -> BudgetPoint:
            return BudgetPoint(r(p.layers), p.gain, p.ratio)

        return dataclasses.replace(
            self,
            layers=list(r(self.layers)),
            gains={names.get(n, n): v for n, v in self.gains.items()},
            costs={names.get(n, n): v for n, v in self.costs.items()},
            curve=[point(p) for p in self.curve],
            measured=[point(p) for p in self.measured],
            metric_of={r(s): v for s, v in self.metric_of.items()},
            chosen=point(self.chosen),
            labels={names.get(n, n): v for n, v in self.labels.items()},
        )

    def _names(self, layers: Sequence[str]) -> list[str]:
        return [self.labels.get(n, n) for n in layers]

    def summary(self) -> dict[str, Any]:
        """JSON-friendly report."""

        def point(p: BudgetPoint) -> dict[str, Any]:
            m = self.metric_of.get(p.layers, math.nan)
            return {
                "layers": self._names(p.layers),
                "gain": p.gain,
                "metric": m if math.isfinite(m) else None,
                "latency_ratio": p.ratio,
            }

        return {
            "budget": self.budget,
            "metric": self.metric,
            "scored_on": self.scored_on,
            "gain_definition": "metric of the full correction minus that with the layer plain",
            "selection": self.selection,
            "frontier_exact": self.frontier_exact,
            "layers": [
                {"name": self.labels.get(n, n), "gain": self.gains[n], "cost": self.costs[n]}
                for n in self.layers
            ],
            "curve": [point(p) for p in self.curve],
            "measured": [point(p) for p in self.measured],
            "selected": self._names(self.selected),
            "full_correction": {"metric": self.full_metric, "latency_ratio": self.full_ratio},
            "passes": self.passes,
            "timing_runs": self.timing_runs,
        }

    def table(self) -> Any:
        """A rich table of the curve (the measured Pareto frontier): layers corrected, metric, latency
        ratio, the chosen point and the points over budget marked."""
        from rich.table import Table

        title = f"latency budget {self.budget:g}: {self.metric} ({self.scored_on}) vs latency ratio"
        table = Table(title=title)
        table.add_column("#", justify="right")
        table.add_column("layers corrected")
        table.add_column(self.metric, justify="right")
        table.add_column("latency ratio", justify="right")
        table.add_column("", justify="left")
        for i, (p, m) in enumerate(zip(self.curve, self.metrics, strict=True)):
            names = self._names(p.layers)
            shown = "(plain)" if not names else f"{len(names)}: " + ", ".join(names)
            if len(shown) > 60:
                shown = shown[:57] + "..."
            mark = "chosen" if p == self.chosen else ("over budget" if p.ratio > self.budget else "")
            table.add_row(str(i), shown, f"{m:.4f}", f"{p.ratio:.3f}", mark)
        return table


# --------------------------------------------------------------------------------------------- the plan
def _nonzero(v: Any) -> bool:
    if isinstance(v, Tensor):
        return bool((v != 0).any())
    return bool(np.any(np.asarray(v) != 0))


def _timed(
    measure: LatencyFn, plain: onnx.ModelProto, graphs: list[onnx.ModelProto], x: np.ndarray
) -> list[float]:
    """``measure`` on rank 0 only, its ratios on every rank (the same choice everywhere)."""
    from . import distributed

    if not graphs:
        return []
    return [float(r) for r in distributed.on_writer(lambda: list(measure(plain, graphs, x)))]


def plan_budget(
    layers: Sequence[str],
    score: Scorer,
    graph: Callable[[Subset], onnx.ModelProto],
    example: np.ndarray,
    metric: str,
    budget: float,
    *,
    latency: LatencyFn | None = None,
    selection: str = "exact",
    max_points: int = DEFAULT_MAX_POINTS,
    labels_of: Mapping[str, str] | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> BudgetReport:
    """Gains, costs, the subsets to measure, their measured curve and the choice (module docstring).

    ``layers``: the corrected layers (names as ``score`` and ``graph`` take them; layers the correction
    leaves plain are not passed); ``score``: a :data:`Scorer` on the command's data; ``graph(subset)``:
    the ONNX graph correcting exactly ``subset`` (``graph(())`` is the plain graph timings are relative
    to); ``example``: the latency input (the data's shapes); ``metric``: what ``score`` returns (nll and
    pixel-nll: lower is better). Two scoring passes and two timing runs in all."""
    if selection not in SELECTIONS:
        raise UsageError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    step = progress or (lambda *_: None)
    names = list(dict.fromkeys(layers))
    measure = latency or measure_ratios
    full_set: Subset = tuple(names)
    total = 4
    step("latency budget", 0, total)
    # 1. gains: plain, full and leave-one-out in one pass
    loo = [tuple(m for m in names if m != n) for n in names]
    first = [(), full_set, *loo] if names else [()]
    values = score(first)
    metric_of: dict[Subset, float] = dict(zip(first, values, strict=True))
    base_metric, full_metric = metric_of[()], metric_of[full_set]
    broken = [n for n, s in zip(names, loo, strict=True) if not math.isfinite(metric_of[s])]
    if not (math.isfinite(base_metric) and math.isfinite(full_metric)) or broken:
        raise NumericalError(
            "--latency-budget: correcting only part of the layers gives NaN/Inf outputs on the data"
            + (f" (without {', '.join(broken[:3])})" if broken else ""),
            hint="write the full correction (drop --latency-budget), or check the model's statistics with "
            "`bncorrect inspect`",
        )
    gains = {n: _better(metric, full_metric, metric_of[s]) for n, s in zip(names, loo, strict=True)}
    step("latency budget", 1, total)
    # 2. costs: every layer alone, and the full correction, in one interleaved timing run
    base_graph = graph(())
    ratios = _timed(
        measure, base_graph, [graph((n,)) for n in names] + ([graph(full_set)] if names else []), example
    )
    costs = {n: max(r - 1.0, _MIN_EXTRA) for n, r in zip(names, ratios, strict=False)}
    full_ratio = max(ratios[-1], 1.0 + _MIN_EXTRA) if names else 1.0
    step("latency budget", 2, total)
    # 3. the subsets worth measuring
    options = [LayerOption(n, gains[n], costs[n]) for n in names]
    if selection == "exact":
        front = pareto_front(options)
        todo = [p.layers for p in points_to_measure(front.points, budget, max_points=max_points)]
        exact = front.exact
    else:
        todo = [p.layers for p in budget_curve(options)]
        exact = True
    todo = list(dict.fromkeys(todo))
    # 4. measure them as real graphs: latency (one timing run), metric (one pass, for the ones not scored)
    corrected = [s for s in todo if s]
    measured_ratio = _timed(measure, base_graph, [graph(s) for s in corrected], example)
    ratio_of: dict[Subset, float] = {(): 1.0}
    ratio_of.update({s: max(r, 1.0 + _MIN_EXTRA) for s, r in zip(corrected, measured_ratio, strict=True)})
    step("latency budget", 3, total)
    unscored = [s for s in todo if s not in metric_of]
    passes = 1
    if unscored:
        metric_of.update(zip(unscored, score(unscored), strict=True))
        passes += 1
    points = [BudgetPoint(s, _better(metric, metric_of[s], base_metric), ratio_of[s]) for s in todo]
    curve = measured_front([p for p in points if math.isfinite(p.gain)])
    chosen = select_within_budget(curve, budget)  # the best measured point within R is on the frontier
    step("latency budget", total, total)
    return BudgetReport(
        budget=budget,
        metric=metric,
        layers=names,
        gains=gains,
        costs=costs,
        curve=curve,
        metrics=[metric_of[p.layers] for p in curve],
        chosen=chosen,
        full_metric=full_metric,
        full_ratio=full_ratio,
        measured=points,
        metric_of=metric_of,
        labels=dict(labels_of or {}),
        selection=selection,
        frontier_exact=exact,
        passes=passes,
        timing_runs=2 if names else 0,
    )


def corrected_names(alpha: Mapping[str, Any], beta: Mapping[str, Any]) -> list[str]:
    """The layers a correction changes (alpha or beta nonzero somewhere), in ``alpha``'s order."""
    return [n for n in alpha if _nonzero(alpha[n]) or _nonzero(beta.get(n, alpha[n]))]


def plot_budget(report: BudgetReport, path: str | Path, *, dpi: int = 100) -> Path:
    """PNG of the measured curve: metric against latency ratio, the Pareto frontier of the measured
    points as a line (numbered as in the table), the other measured points faint, the budget as a
    vertical line and the chosen point marked. Headless (Agg), written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .atomic import atomic_path, check_output

    path = check_output(path)
    fig = Figure(figsize=(7.0, 4.5), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    others = [p for p in report.measured if p not in report.curve and p.layers in report.metric_of]
    if others:
        ax.plot(
            [p.ratio for p in others],
            [report.metric_of[p.layers] for p in others],
            "o",
            color="0.6",
            ms=3,
            label="other measured subsets",
        )
    xs = [p.ratio for p in report.curve]
    ax.plot(xs, report.metrics, "o-", color="C0", ms=4, label="best measured (Pareto frontier)")
    for i, (p, m) in enumerate(zip(report.curve, report.metrics, strict=True)):
        ax.annotate(str(i), (p.ratio, m), textcoords="offset points", xytext=(3, 3), fontsize=7)
    m = report.metric_of.get(report.chosen.layers, math.nan)
    ax.plot([report.chosen.ratio], [m], "*", color="C3", ms=14, label="chosen")
    ax.axvline(report.budget, color="C3", ls="--", lw=1, label=f"budget {report.budget:g}")
    ax.set_xlabel("latency ratio (onnxruntime, measured)")
    ax.set_ylabel(f"{report.metric} ({report.scored_on})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
