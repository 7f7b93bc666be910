"""``--latency-budget R`` (issue #15, part 3): correct only the layers worth their measured latency.

Given the correction a command chose (per-layer alpha/beta, keyed by BN node names of a plain ONNX graph
whose BatchNormalization nodes are kept), :func:`plan_budget` measures:

* each layer's **gain**: the held-out metric of the full correction minus that of the full correction with
  this one layer reset to plain BN (leave-one-out; one held-out pass in onnxruntime per layer, plus one);
* each layer's **cost**: the onnxruntime latency of the graph with only this layer corrected over the plain
  graph's, minus 1 (:func:`measure_ratios`: one session per graph, runs interleaved round by round, median);

then orders the layers greedily by gain per unit cost (:func:`bncorrect.budget.budget_curve`), *measures*
each prefix of that order (held-out metric and latency ratio of the graph correcting exactly that prefix),
and picks the longest prefix whose measured ratio stays <= R (:func:`bncorrect.budget.select_within_budget`).
A graph that corrects any layer runs strictly more ops than the plain one, so its ratio is taken as at
least 1 + 1e-6 (a measured ratio below that is timer noise): R = 1 keeps every BN plain.

The latency measurement is a parameter (``latency``): tests inject a deterministic cost model; the library
never asserts on times.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor

from .budget import BudgetPoint, LayerOption, budget_curve, select_within_budget
from .errors import UsageError, spell

__all__ = [
    "BUDGET_METRICS",
    "BudgetReport",
    "LatencyFn",
    "check_budget",
    "measure_ratios",
    "plan_budget",
    "plot_budget",
    "score_graph",
]

#: ``latency(plain, graphs, x)``: latency of each graph divided by the plain graph's, on input ``x``
LatencyFn = Callable[[onnx.ModelProto, Sequence[onnx.ModelProto], np.ndarray], list[float]]
BUDGET_METRICS = ("nll", "top1", "top5")
_MIN_EXTRA = 1e-6


def check_budget(budget: float | None, out: str | Path | None, metric: str) -> float | None:
    """Validate ``--latency-budget`` against OUT and the metric before any pass over data."""
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
    if metric not in BUDGET_METRICS:
        raise UsageError(
            f"{spell('latency_budget', 'R')} measures held-out gains in nll, top1 or top5, not {metric!r}",
            hint="choose --metric nll, top1 or top5 (classification logits as the graph's first output)",
        )
    return float(budget)


def _session(proto: onnx.ModelProto) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
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
    """Latency of each graph over ``plain``'s in onnxruntime (CPU, default threads) on input ``x``: every
    round runs each session once (plain first, then the others, the order rotated each round), and a
    graph's ratio is the median of its per-round ratios to plain."""
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


def score_graph(
    proto: onnx.ModelProto, inputs: Sequence[Tensor], labels: Sequence[Tensor], metric: str
) -> float:
    """``metric`` (nll: mean cross-entropy; top1/top5: accuracy) of the graph's first output on the
    batches."""
    sess = _session(proto)
    total = 0.0
    n = 0
    for x, y in zip(inputs, labels, strict=True):
        out = sess.run(None, _feed(sess, x.detach().cpu().numpy()))[0]
        logits = torch.from_numpy(np.asarray(out, dtype=np.float32))
        if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            raise UsageError(
                f"--latency-budget scores classification logits (N, K), and the graph's first output has "
                f"shape {tuple(logits.shape)}",
                hint="use --latency-budget with classification models whose first output is the logits",
            )
        y = y.long()
        if metric == "nll":
            total += float(torch.nn.functional.cross_entropy(logits.double(), y, reduction="sum"))
        else:
            k = min(1 if metric == "top1" else 5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            total += float((top == y[:, None]).any(dim=1).sum())
        n += int(x.shape[0])
    return total / max(n, 1)


def _better(metric: str, value: float, base: float) -> float:
    """How much ``value`` improves on ``base`` (positive: better)."""
    return base - value if metric == "nll" else value - base


@dataclass
class BudgetReport:
    """What ``--latency-budget`` measured and chose. ``curve`` points carry the measured gain over the
    plain graph (in the metric's improvement units) and the measured latency ratio; ``metrics[i]`` is the
    held-out metric of ``curve[i]``; ``chosen`` is the point written."""

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
    labels: dict[str, str] = field(default_factory=dict)
    #: what the metric was measured on: "held-out" (tune) or "data" (sweep-alpha: the data it chose on)
    scored_on: str = "held-out"

    def renamed(self, names: Mapping[str, str]) -> BudgetReport:
        """The same report with layers renamed by ``names`` (BN node name -> the command's layer name)."""

        def r(n: str) -> str:
            return names.get(n, n)

        def point(p: BudgetPoint) -> BudgetPoint:
            return BudgetPoint(tuple(r(n) for n in p.layers), p.gain, p.ratio)

        return dataclasses.replace(
            self,
            layers=[r(n) for n in self.layers],
            gains={r(n): v for n, v in self.gains.items()},
            costs={r(n): v for n, v in self.costs.items()},
            curve=[point(p) for p in self.curve],
            chosen=point(self.chosen),
            labels={r(n): v for n, v in self.labels.items()},
        )

    @property
    def selected(self) -> list[str]:
        return list(self.chosen.layers)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly report."""
        name = self.labels.get
        return {
            "budget": self.budget,
            "metric": self.metric,
            "scored_on": self.scored_on,
            "gain_definition": "held-out metric of the full correction minus that with the layer plain",
            "layers": [
                {"name": name(n, n), "gain": self.gains[n], "cost": self.costs[n]} for n in self.layers
            ],
            "curve": [
                {
                    "layers": [name(n, n) for n in p.layers],
                    "gain": p.gain,
                    "metric": m,
                    "latency_ratio": p.ratio,
                }
                for p, m in zip(self.curve, self.metrics, strict=True)
            ],
            "selected": [name(n, n) for n in self.selected],
            "full_correction": {"metric": self.full_metric, "latency_ratio": self.full_ratio},
        }

    def table(self) -> Any:
        """A rich table of the curve: layers added in greedy order, held-out metric, latency ratio."""
        from rich.table import Table

        title = f"latency budget {self.budget:g}: {self.metric} ({self.scored_on}) vs latency ratio"
        table = Table(title=title)
        table.add_column("#", justify="right")
        table.add_column("layer added")
        table.add_column(self.metric, justify="right")
        table.add_column("latency ratio", justify="right")
        table.add_column("", justify="left")
        for i, (p, m) in enumerate(zip(self.curve, self.metrics, strict=True)):
            added = "(plain)" if not p.layers else self.labels.get(p.layers[-1], p.layers[-1])
            mark = "chosen" if p == self.chosen else ("over budget" if p.ratio > self.budget else "")
            table.add_row(str(i), added, f"{m:.4f}", f"{p.ratio:.3f}", mark)
        return table


def _graph(
    plain: onnx.ModelProto,
    alpha: Mapping[str, Any],
    beta: Mapping[str, Any],
    stats: Mapping[str, tuple[Any, Any]],
    layers: Sequence[str],
) -> onnx.ModelProto:
    from .onnx_rewrite import rewrite

    keep = set(layers)
    a = {n: v for n, v in alpha.items() if n in keep}
    b = {n: v for n, v in beta.items() if n in keep}
    return rewrite(plain, a, b, running_stats=dict(stats) or None)[0]


def plan_budget(
    plain: onnx.ModelProto,
    alpha: Mapping[str, Any],
    beta: Mapping[str, Any],
    inputs: Sequence[Tensor],
    labels: Sequence[Tensor],
    metric: str,
    budget: float,
    *,
    running_stats: Mapping[str, tuple[Any, Any]] | None = None,
    latency: LatencyFn | None = None,
    example: Tensor | None = None,
    labels_of: Mapping[str, str] | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> BudgetReport:
    """Measure gains and costs, build the measured curve and choose the layers (see the module docstring).
    ``alpha``/``beta``/``running_stats`` are keyed by BN node names of ``plain``; ``inputs``/``labels`` are
    the held-out batches; ``example`` (default: the first batch) is the latency input."""
    step = progress or (lambda *_: None)
    stats = dict(running_stats or {})
    names = [n for n in alpha if _nonzero(alpha[n]) or _nonzero(beta.get(n, alpha[n]))]
    measure = latency or measure_ratios
    x = (example if example is not None else inputs[0]).detach().cpu().numpy()
    total = 2 * len(names) + 3
    step("latency budget", 0, total)
    full = _graph(plain, alpha, beta, stats, names)
    base_graph = _graph(plain, alpha, beta, stats, [])
    base_metric = score_graph(base_graph, inputs, labels, metric)
    full_metric = score_graph(full, inputs, labels, metric)
    done = 2
    step("latency budget", done, total)
    gains: dict[str, float] = {}
    for n in names:
        rest = [m for m in names if m != n]
        without = score_graph(_graph(plain, alpha, beta, stats, rest), inputs, labels, metric)
        gains[n] = _better(metric, full_metric, without)
        done += 1
        step("latency budget", done, total)
    singles = [_graph(plain, alpha, beta, stats, [n]) for n in names]
    single_ratios = measure(base_graph, [*singles, full], x) if names else []
    costs = {n: max(float(r) - 1.0, _MIN_EXTRA) for n, r in zip(names, single_ratios, strict=False)}
    full_ratio = max(float(single_ratios[-1]), 1.0 + _MIN_EXTRA) if names else 1.0
    options = [LayerOption(n, gains[n], costs[n]) for n in names]
    order = budget_curve(options)  # additive estimate: only its order is used
    prefixes = [p.layers for p in order[1:]]
    graphs = {p: _graph(plain, alpha, beta, stats, p) for p in prefixes}
    measured = measure(base_graph, [graphs[p] for p in prefixes], x) if prefixes else []
    ratio_of: dict[tuple[str, ...], float] = {(): 1.0}
    ratio_of.update({p: max(float(r), 1.0 + _MIN_EXTRA) for p, r in zip(prefixes, measured, strict=True)})
    metric_of: dict[tuple[str, ...], float] = {(): base_metric}
    for p in prefixes:
        metric_of[p] = full_metric if len(p) == len(names) else score_graph(graphs[p], inputs, labels, metric)
        done += 1
        step("latency budget", done, total)
    curve = budget_curve(
        options,
        measure_ratio=lambda p: ratio_of[p],
        measure_gain=lambda p: _better(metric, metric_of[p], base_metric),
    )
    chosen = select_within_budget(curve, budget)
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
        labels=dict(labels_of or {}),
    )


def _nonzero(v: Any) -> bool:
    if isinstance(v, Tensor):
        return bool((v != 0).any())
    return bool(np.any(np.asarray(v) != 0))


def plot_budget(report: BudgetReport, path: str | Path, *, dpi: int = 100) -> Path:
    """PNG of the measured curve: held-out metric against latency ratio, one point per prefix, the budget
    as a vertical line and the chosen point marked. Headless (Agg), written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .atomic import atomic_path, check_output

    path = check_output(path)
    fig = Figure(figsize=(7.0, 4.5), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    xs = [p.ratio for p in report.curve]
    ax.plot(xs, report.metrics, "o-", color="C0", ms=4, label="layers added by gain per cost")
    for i, (p, m) in enumerate(zip(report.curve, report.metrics, strict=True)):
        ax.annotate(str(i), (p.ratio, m), textcoords="offset points", xytext=(3, 3), fontsize=7)
    c = report.curve.index(report.chosen)
    ax.plot([report.chosen.ratio], [report.metrics[c]], "*", color="C3", ms=14, label="chosen")
    ax.axvline(report.budget, color="C3", ls="--", lw=1, label=f"budget {report.budget:g}")
    ax.set_xlabel("latency ratio (onnxruntime, measured)")
    ax.set_ylabel(f"{report.metric} ({report.scored_on})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
