"""Latency-budget selection (bncorrect.budget) on a toy cost model: no timing anywhere."""

from __future__ import annotations

import itertools

import pytest

from bncorrect.budget import BudgetPoint, LayerOption, budget_curve, select_within_budget
from bncorrect.errors import UsageError

TOY = [
    LayerOption("a", gain=0.30, cost=0.10),  # 3.0 per unit of cost
    LayerOption("b", gain=0.10, cost=0.02),  # 5.0
    LayerOption("c", gain=0.20, cost=0.20),  # 1.0
    LayerOption("d", gain=-0.05, cost=0.05),  # hurts: never taken
    LayerOption("e", gain=0.01, cost=0.0),  # free: first
]


def test_curve_is_greedy_by_gain_per_cost_with_additive_estimates() -> None:
    curve = budget_curve(TOY)
    assert [p.layers for p in curve] == [(), ("e",), ("e", "b"), ("e", "b", "a"), ("e", "b", "a", "c")]
    assert [round(p.ratio, 10) for p in curve] == [1.0, 1.0, 1.02, 1.12, 1.32]
    assert [round(p.gain, 10) for p in curve] == [0.0, 0.01, 0.11, 0.41, 0.61]


@pytest.mark.parametrize("budget", [1.0, 1.01, 1.02, 1.1, 1.12, 1.2, 1.32, 2.0])
def test_selection_is_the_largest_prefix_within_budget(budget: float) -> None:
    curve = budget_curve(TOY)
    point = select_within_budget(curve, budget)
    assert point.ratio <= budget
    prefixes = [p for p in curve if p.ratio <= budget]
    assert point == prefixes[-1]
    following = curve[len(point.layers) + 1 :]
    assert not following or following[0].ratio > budget  # the next greedy step would break the budget
    # against brute force over all subsets: optimal except where a cheap high-ratio layer blocks a better one
    # (budget 1.1: greedy takes e, b (0.11) and then a does not fit; e + a alone would give 0.31)
    best = max(
        sum(o.gain for o in s)
        for k in range(len(TOY) + 1)
        for s in itertools.combinations(TOY, k)
        if 1.0 + sum(o.cost for o in s) <= budget + 1e-12
    )
    if budget == 1.1:
        assert (point.gain, best) == (pytest.approx(0.11), pytest.approx(0.31))
    else:
        assert point.gain == pytest.approx(best)
    assert "d" not in point.layers


def test_measured_ratio_and_gain_replace_the_estimates() -> None:
    # a toy "measurement" where layers share a cost (the second corrected layer is cheaper) and gains saturate
    calls: list[tuple[str, ...]] = []

    def ratio(layers: tuple[str, ...]) -> float:
        calls.append(layers)
        return 1.0 + 0.1 * len(layers) ** 0.5

    def gain(layers: tuple[str, ...]) -> float:
        return 1.0 - 0.5 ** len(layers)

    curve = budget_curve(TOY, measure_ratio=ratio, measure_gain=gain)
    assert calls == [p.layers for p in curve]
    assert [p.ratio for p in curve] == [ratio(p.layers) for p in curve]
    assert curve[2] == BudgetPoint(("e", "b"), 0.75, 1.0 + 0.1 * 2**0.5)
    assert select_within_budget(curve, 1.15).layers == ("e", "b")


def test_an_over_budget_prefix_ends_the_selection() -> None:
    curve = [BudgetPoint((), 0.0, 1.0), BudgetPoint(("x",), 0.1, 1.3), BudgetPoint(("x", "y"), 0.2, 1.1)]
    assert select_within_budget(curve, 1.2).layers == ()


def test_bad_inputs() -> None:
    with pytest.raises(UsageError, match="below the uncorrected"):
        select_within_budget(budget_curve(TOY, base_ratio=1.0), 0.9)
    with pytest.raises(UsageError, match="once"):
        budget_curve([LayerOption("a", 0.1, 0.1), LayerOption("a", 0.2, 0.1)])
    with pytest.raises(UsageError, match="cost"):
        budget_curve([LayerOption("a", 0.1, -0.1)])
    with pytest.raises(UsageError, match="cost"):
        budget_curve([LayerOption("a", float("nan"), 0.1)])
