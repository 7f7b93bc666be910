"""Pay only for the layers that matter (issue #15, part 3): the selection logic behind a latency budget.

Given, per correctable layer, its gain (how much correcting that layer improves the metric) and its cost
(how much it raises the graph's latency ratio), both measured by the caller, which layers to correct so
that the latency ratio stays <= R and the gain is largest?

Under the additive model (a subset's ratio is 1 + the sum of its layers' costs, its gain the sum of their
gains) this is a 0-1 knapsack. :func:`pareto_front` solves it exactly for every budget at once: it lists
the *Pareto frontier* of the subsets (no other subset costs no more and gains more), by the
Nemhauser-Ullmann merge (one item at a time, the frontier so far merged with itself shifted by the item,
dominated entries dropped). That is exact, and its work grows with the frontier, not with 2^n; should the
frontier grow past ``max_sets`` entries, each merge keeps only the best subset per cost bucket of width
``resolution`` (a knapsack DP over costs discretised to ``resolution``), which loses at most
n x ``resolution`` of cost against the optimum and is flagged (``Frontier.exact``). The optimum within a
budget is the frontier's last point whose ratio fits (:func:`select_within_budget`).

Plain greedy by gain per cost (:func:`budget_curve`, what ``--latency-budget`` used before) is not optimal:
a cheap layer taken first can block a better one (``tests/test_budget.py``: budget 1.1, greedy 0.11,
optimum 0.31). It stays here as the comparison.

Costs are not exactly additive in a real graph, so the commands measure the points: they take the frontier
(thinned to a few points, :func:`points_to_measure`), measure the gain and latency ratio of each subset as
a real graph, and choose the best *measured* point within the budget (:func:`select_within_budget`: if the
additive optimum measures over budget, the choice falls back along the curve). What a person picks from is
the Pareto frontier of the measured points (:func:`measured_front`).

This module is pure (no timing, no torch, no onnxruntime); the commands own the measurements
(:mod:`bncorrect.latency`, ``--latency-budget`` on ``tune`` and ``sweep-alpha``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import UsageError

__all__ = [
    "DEFAULT_MAX_POINTS",
    "DEFAULT_MAX_SETS",
    "DEFAULT_RESOLUTION",
    "BudgetPoint",
    "Frontier",
    "LayerOption",
    "budget_curve",
    "measured_front",
    "pareto_front",
    "points_to_measure",
    "select_within_budget",
]

#: Cost-bucket width (in latency-ratio units) once the exact frontier grows past :data:`DEFAULT_MAX_SETS`.
DEFAULT_RESOLUTION = 1e-3
#: Frontier entries kept exactly before the merge buckets costs by :data:`DEFAULT_RESOLUTION`.
DEFAULT_MAX_SETS = 4096
#: Subsets measured as real graphs (the plain graph included).
DEFAULT_MAX_POINTS = 16
_TOL = 1e-12


@dataclass(frozen=True)
class LayerOption:
    """One correctable layer: gain of correcting it (higher is better, in the metric's units) and its
    latency cost (increase of latency / original latency; >= 0)."""

    name: str
    gain: float
    cost: float


@dataclass(frozen=True)
class BudgetPoint:
    """One point of the curve: the layers corrected, the gain and the latency ratio."""

    layers: tuple[str, ...]
    gain: float
    ratio: float


@dataclass(frozen=True)
class Frontier:
    """The additive Pareto frontier: ``points`` by increasing ratio and strictly increasing gain, the
    empty selection first; ``exact`` is False when cost buckets of ``resolution`` were used."""

    points: list[BudgetPoint]
    exact: bool
    resolution: float


def _check(options: Sequence[LayerOption]) -> None:
    names = [o.name for o in options]
    if len(set(names)) != len(names):
        raise UsageError("each layer may appear once in the latency-budget options")
    for o in options:
        if not (o.cost >= 0) or not math.isfinite(o.cost) or not math.isfinite(o.gain):
            raise UsageError(f"layer {o.name}: cost must be a number >= 0 and gain a number (got {o})")


def _order_key(o: LayerOption) -> tuple[float, float, str]:
    # gain per unit of cost, free layers first (by gain), ties by larger gain then name (deterministic)
    per_cost = float("inf") if o.cost <= 0 else o.gain / o.cost
    return (-per_cost, -o.gain, o.name)


def budget_curve(
    options: Sequence[LayerOption],
    *,
    base_ratio: float = 1.0,
    measure_ratio: Callable[[tuple[str, ...]], float] | None = None,
    measure_gain: Callable[[tuple[str, ...]], float] | None = None,
) -> list[BudgetPoint]:
    """Plain greedy: the empty selection, then one point per layer added by gain per cost. Layers whose
    gain is not positive are never added. Ratios and gains are additive estimates unless ``measure_ratio``
    / ``measure_gain`` give each prefix's measured value."""
    _check(options)
    chosen = sorted((o for o in options if o.gain > 0), key=_order_key)
    first_gain = 0.0 if measure_gain is None else measure_gain(())
    first_ratio = base_ratio if measure_ratio is None else measure_ratio(())
    points = [BudgetPoint((), first_gain, first_ratio)]
    layers: tuple[str, ...] = ()
    gain, ratio = first_gain, first_ratio
    for o in chosen:
        layers = (*layers, o.name)
        gain = measure_gain(layers) if measure_gain is not None else gain + o.gain
        ratio = measure_ratio(layers) if measure_ratio is not None else ratio + o.cost
        points.append(BudgetPoint(layers, gain, ratio))
    return points


# an entry of the merge: (cost, gain, item index or -1, parent entry or None), subsets shared by pointers
_Entry = tuple[float, float, int, "_Entry | None"]


def _prune(entries: list[_Entry], resolution: float | None) -> list[_Entry]:
    """The Pareto-optimal entries (by increasing cost, strictly increasing gain); with ``resolution`` only
    the best entry per cost bucket."""
    entries.sort(key=lambda e: (e[0], -e[1]))
    kept: list[_Entry] = []
    best = -math.inf
    for e in entries:
        if e[1] > best + _TOL:
            if (
                resolution is not None
                and kept
                and math.floor(kept[-1][0] / resolution) == math.floor(e[0] / resolution)
            ):
                kept[-1] = e  # same bucket: the higher gain (costs at most one bucket more)
            else:
                kept.append(e)
            best = e[1]
    return kept


def pareto_front(
    options: Sequence[LayerOption],
    *,
    base_ratio: float = 1.0,
    resolution: float = DEFAULT_RESOLUTION,
    max_sets: int = DEFAULT_MAX_SETS,
) -> Frontier:
    """The additive Pareto frontier of the subsets of layers with positive gain (see the module docstring).
    Each point's layers are in the order of ``options``; the empty selection is always the first point
    (also when a free layer dominates it)."""
    _check(options)
    if not (resolution > 0) or max_sets < 1:
        raise UsageError(f"resolution must be > 0 and max_sets >= 1 (got {resolution}, {max_sets})")
    items = [o for o in options if o.gain > 0]
    front: list[_Entry] = [(0.0, 0.0, -1, None)]
    exact = True
    for i, o in enumerate(items):
        shifted: list[_Entry] = [(e[0] + o.cost, e[1] + o.gain, i, e) for e in front]
        merged = _prune(front + shifted, None if exact else resolution)
        if exact and len(merged) > max_sets:
            exact = False
            merged = _prune(merged, resolution)
        front = merged
    order = {o.name: k for k, o in enumerate(options)}
    points = []
    for e in front:
        names = []
        node: _Entry | None = e
        while node is not None and node[2] >= 0:
            names.append(items[node[2]].name)
            node = node[3]
        layers = tuple(sorted(names, key=order.__getitem__))
        points.append(BudgetPoint(layers, e[1], base_ratio + e[0]))
    if points[0].layers:  # a free layer dominates the empty selection: keep the plain graph as the start
        points.insert(0, BudgetPoint((), 0.0, base_ratio))
    return Frontier(points, exact, resolution)


def select_within_budget(points: Sequence[BudgetPoint], budget: float) -> BudgetPoint:
    """The point of largest gain among ``points`` whose ratio is <= ``budget`` (ties: the lower ratio, then
    fewer layers); :class:`UsageError` when none fits (the budget is below the uncorrected graph)."""
    if not points:
        raise UsageError("no latency-budget curve to select from")
    fits = [p for p in points if p.ratio <= budget + _TOL]
    if not fits:
        lowest = min(p.ratio for p in points)
        raise UsageError(
            f"latency budget {budget:g} is below the uncorrected graph's ratio {lowest:g}",
            hint="use --latency-budget >= 1 (1.0: correct nothing that costs time)",
        )
    return min(fits, key=lambda p: (-p.gain, p.ratio, len(p.layers)))


def measured_front(points: Sequence[BudgetPoint]) -> list[BudgetPoint]:
    """The Pareto frontier of measured points: by increasing ratio, each point gaining strictly more than
    every cheaper one (the first point, the plain graph, always kept). What a person picks from."""
    if not points:
        return []
    first, rest = points[0], sorted(points[1:], key=lambda p: (p.ratio, -p.gain, len(p.layers)))
    front = [first]
    best = first.gain
    for p in rest:
        if p.gain > best + _TOL and math.isfinite(p.gain):
            front.append(p)
            best = p.gain
    return front


def points_to_measure(
    frontier: Sequence[BudgetPoint], budget: float, *, max_points: int = DEFAULT_MAX_POINTS
) -> list[BudgetPoint]:
    """At most ``max_points`` points of an additive frontier to measure as real graphs: all of them when
    they are few; else the empty selection, the additive optimum within ``budget`` and the points just
    below it (where the choice falls back to if it measures over budget), the next two above it, the last
    point (every helpful layer), and the rest spread evenly along the frontier."""
    pts = list(frontier)
    if len(pts) <= max_points:
        return pts
    max_points = max(max_points, 8)
    opt = max(i for i, p in enumerate(pts) if p.ratio <= budget + _TOL) if pts[0].ratio <= budget else 0
    keep = {0, len(pts) - 1, *range(max(1, opt - 3), min(len(pts), opt + 3))}
    spare = max_points - len(keep)
    if spare > 0:
        step = (len(pts) - 1) / (spare + 1)
        keep |= {round(step * (k + 1)) for k in range(spare)}
    return [pts[i] for i in sorted(keep)]
