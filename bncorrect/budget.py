"""Pay only for the layers that matter (issue #15, part 3): the selection logic behind a latency budget.

Given, per correctable layer, its held-out gain (how much correcting that layer improves the held-out metric)
and its cost (how much it raises the graph's latency ratio), both measured by the caller, layers are taken
greedily by gain per unit of cost. Each prefix of that order is one point of the curve "held-out metric vs
latency ratio"; a budget R picks the largest prefix whose ratio stays <= R.

The prefixes' ratio and gain are additive estimates by default (1 + sum of costs, sum of gains); callers
that can measure a whole subset (one onnxruntime session on the written graph, one held-out evaluation)
pass ``measure_ratio`` / ``measure_gain`` and each point then carries the measured values, the selection
uses the measured ratio, and a prefix that measures over budget ends the selection.

This module is pure (no timing, no torch, no onnxruntime); the commands own the measurements
(:mod:`bncorrect.latency`, ``--latency-budget`` on ``tune`` and ``sweep-alpha``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import UsageError

__all__ = ["BudgetPoint", "LayerOption", "budget_curve", "select_within_budget"]


@dataclass(frozen=True)
class LayerOption:
    """One correctable layer: held-out gain of correcting it (higher is better, in the metric's units) and
    its latency cost (increase of latency / original latency; >= 0)."""

    name: str
    gain: float
    cost: float


@dataclass(frozen=True)
class BudgetPoint:
    """One point of the curve: the layers corrected, the held-out gain and the latency ratio."""

    layers: tuple[str, ...]
    gain: float
    ratio: float


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
    """The curve: the empty selection, then one point per layer added in greedy order (gain per cost).
    Layers whose gain is not positive are never added (correcting them costs time and does not help)."""
    names = [o.name for o in options]
    if len(set(names)) != len(names):
        raise UsageError("each layer may appear once in the latency-budget options")
    for o in options:
        if not (o.cost >= 0) or o.cost != o.cost or o.gain != o.gain:
            raise UsageError(f"layer {o.name}: cost must be a number >= 0 and gain a number (got {o})")
    chosen = sorted((o for o in options if o.gain > 0), key=_order_key)
    points = [BudgetPoint((), 0.0 if measure_gain is None else measure_gain(()), base_ratio)]
    if measure_ratio is not None:
        points[0] = BudgetPoint((), points[0].gain, measure_ratio(()))
    layers: tuple[str, ...] = ()
    gain, ratio = points[0].gain, points[0].ratio
    for o in chosen:
        layers = (*layers, o.name)
        gain = measure_gain(layers) if measure_gain is not None else gain + o.gain
        ratio = measure_ratio(layers) if measure_ratio is not None else ratio + o.cost
        points.append(BudgetPoint(layers, gain, ratio))
    return points


def select_within_budget(curve: Sequence[BudgetPoint], budget: float) -> BudgetPoint:
    """The last point of ``curve`` (a prefix order) before the first one whose ratio exceeds ``budget``;
    :class:`UsageError` when even the empty selection does (the budget is below the original graph)."""
    if not curve:
        raise UsageError("no latency-budget curve to select from")
    if budget < curve[0].ratio:
        raise UsageError(
            f"latency budget {budget:g} is below the uncorrected graph's ratio {curve[0].ratio:g}",
            hint="use --latency-budget >= 1 (1.0: correct nothing that costs time)",
        )
    best = curve[0]
    for point in curve[1:]:
        if point.ratio > budget:
            break
        best = point
    return best
