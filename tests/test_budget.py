"""Latency-budget selection (bncorrect.budget) on a toy cost model: no timing anywhere. The exact frontier
against brute force over all subsets, the bucketed frontier against its bound, greedy as the comparison,
the measured frontier and the choice among measured points, the thinning of a large frontier."""

from __future__ import annotations

import itertools
import random

import pytest

from bncorrect.budget import (
    BudgetPoint,
    LayerOption,
    budget_curve,
    measured_front,
    pareto_front,
    points_to_measure,
    select_within_budget,
)
from bncorrect.errors import UsageError

TOY = [
    LayerOption("a", gain=0.30, cost=0.10),  # 3.0 per unit of cost
    LayerOption("b", gain=0.10, cost=0.02),  # 5.0
    LayerOption("c", gain=0.20, cost=0.20),  # 1.0
    LayerOption("d", gain=-0.05, cost=0.05),  # hurts: never taken
    LayerOption("e", gain=0.01, cost=0.0),  # free: first
]
BUDGETS = [1.0, 1.01, 1.02, 1.1, 1.12, 1.2, 1.3, 1.32, 2.0]


def brute_force(options, budget):
    """The best additive gain of any subset within ``budget`` (all 2^n of them), and a subset with it."""
    best, best_set = 0.0, ()
    for k in range(len(options) + 1):
        for s in itertools.combinations(options, k):
            if 1.0 + sum(o.cost for o in s) <= budget + 1e-12:
                g = sum(o.gain for o in s)
                if g > best + 1e-12:
                    best, best_set = g, tuple(o.name for o in s)
    return best, best_set


def test_greedy_curve_is_by_gain_per_cost_with_additive_estimates() -> None:
    curve = budget_curve(TOY)
    assert [p.layers for p in curve] == [(), ("e",), ("e", "b"), ("e", "b", "a"), ("e", "b", "a", "c")]
    assert [round(p.ratio, 10) for p in curve] == [1.0, 1.0, 1.02, 1.12, 1.32]
    assert [round(p.gain, 10) for p in curve] == [0.0, 0.01, 0.11, 0.41, 0.61]


@pytest.mark.parametrize("budget", BUDGETS)
def test_exact_selection_is_the_brute_force_optimum(budget: float) -> None:
    front = pareto_front(TOY)
    assert front.exact
    point = select_within_budget(front.points, budget)
    best, _ = brute_force(TOY, budget)
    assert point.ratio <= budget and point.gain == pytest.approx(best)
    assert point.gain == pytest.approx(sum(o.gain for o in TOY if o.name in point.layers))
    assert point.ratio == pytest.approx(1.0 + sum(o.cost for o in TOY if o.name in point.layers))
    assert "d" not in point.layers
    # greedy's longest prefix within budget is not always optimal: at 1.1 it takes e, b (0.11) and then a
    # does not fit, where e + a alone gives 0.31; at 1.3 e, b, a (0.41) where e, a, c give 0.51
    greedy = [p for p in budget_curve(TOY) if p.ratio <= budget][-1]
    if budget == 1.1:
        assert (greedy.gain, point.gain) == (pytest.approx(0.11), pytest.approx(0.31))
        assert point.layers == ("a", "e")  # in the options' order
    elif budget == 1.3:
        assert (greedy.gain, point.gain) == (pytest.approx(0.41), pytest.approx(0.51))
        assert point.layers == ("a", "c", "e")
    else:
        assert greedy.gain == pytest.approx(best)


def test_frontier_points_are_pareto_optimal_and_start_plain() -> None:
    points = pareto_front(TOY).points
    assert points[0] == BudgetPoint((), 0.0, 1.0)  # kept although the free layer e dominates it
    ratios = [p.ratio for p in points]
    gains = [p.gain for p in points]
    assert ratios == sorted(ratios) and all(b > a for a, b in itertools.pairwise(gains))
    for p in points[1:]:
        assert p.gain == pytest.approx(brute_force(TOY, p.ratio)[0])  # nothing as cheap gains more


@pytest.mark.parametrize("seed", range(6))
def test_random_instances_against_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(4, 9)
    options = [
        LayerOption(f"L{i}", gain=rng.uniform(-0.05, 0.3), cost=rng.choice([0.0, rng.uniform(0.0, 0.4)]))
        for i in range(n)
    ]
    front = pareto_front(options)
    assert front.exact
    for budget in [1.0, 1.05, 1.15, 1.3, 1.6, 2.5]:
        point = select_within_budget(front.points, budget)
        assert point.gain == pytest.approx(brute_force(options, budget)[0], abs=1e-12)
        assert point.ratio <= budget + 1e-12


def test_bucketed_frontier_is_feasible_and_within_its_bound() -> None:
    """Past max_sets the merge keeps the best subset per cost bucket (a DP over costs discretised to the
    resolution): feasible, and at least as good as the exact optimum of a budget n x resolution smaller."""
    rng = random.Random(7)
    options = [LayerOption(f"L{i}", rng.uniform(0.01, 0.3), rng.uniform(0.0, 0.3)) for i in range(10)]
    res = 0.02
    front = pareto_front(options, resolution=res, max_sets=3)
    assert not front.exact
    assert len(front.points) < len(pareto_front(options).points)
    for budget in [1.1, 1.3, 1.5, 2.0]:
        point = select_within_budget(front.points, budget)
        cost = sum(o.cost for o in options if o.name in point.layers)
        assert point.ratio == pytest.approx(1.0 + cost) and point.ratio <= budget + 1e-12
        assert point.gain == pytest.approx(sum(o.gain for o in options if o.name in point.layers))
        assert point.gain >= brute_force(options, budget - len(options) * res)[0] - 1e-12
        assert point.gain <= brute_force(options, budget)[0] + 1e-12


def test_selection_among_measured_points_falls_back_along_the_curve() -> None:
    # the additive optimum ("x", "y") measured over budget: the best measured point that fits is chosen
    measured = [
        BudgetPoint((), 0.0, 1.0),
        BudgetPoint(("x",), 0.1, 1.3),
        BudgetPoint(("y",), 0.15, 1.15),
        BudgetPoint(("x", "y"), 0.2, 1.25),
        BudgetPoint(("z",), 0.05, 1.1),
    ]
    assert select_within_budget(measured, 1.2).layers == ("y",)
    assert select_within_budget(measured, 1.25).layers == ("x", "y")
    assert select_within_budget(measured, 1.12).layers == ("z",)
    assert select_within_budget(measured, 1.0).layers == ()
    # ties: the cheaper point
    tie = [BudgetPoint((), 0.0, 1.0), BudgetPoint(("a",), 0.1, 1.2), BudgetPoint(("b",), 0.1, 1.1)]
    assert select_within_budget(tie, 2.0).layers == ("b",)
    # the frontier a person picks from: ("x",) costs more than ("y",) and gains less
    assert [p.layers for p in measured_front(measured)] == [(), ("z",), ("y",), ("x", "y")]


def test_thinning_keeps_the_plain_graph_the_optimum_its_neighbours_and_the_end() -> None:
    rng = random.Random(3)
    options = [LayerOption(f"L{i}", rng.uniform(0.01, 0.3), rng.uniform(0.01, 0.2)) for i in range(14)]
    points = pareto_front(options).points
    assert len(points) > 40
    budget = 1.4
    chosen = points_to_measure(points, budget, max_points=12)
    assert len(chosen) <= 12
    opt = select_within_budget(points, budget)
    i = points.index(opt)
    assert chosen[0] == points[0] and chosen[-1] == points[-1]
    assert opt in chosen and points[i - 1] in chosen and points[i + 1] in chosen
    assert [points.index(p) for p in chosen] == sorted(points.index(p) for p in chosen)
    assert points_to_measure(points[:5], budget, max_points=12) == points[:5]


def test_bad_inputs() -> None:
    with pytest.raises(UsageError, match="below the uncorrected"):
        select_within_budget(pareto_front(TOY).points, 0.9)
    with pytest.raises(UsageError, match="once"):
        pareto_front([LayerOption("a", 0.1, 0.1), LayerOption("a", 0.2, 0.1)])
    with pytest.raises(UsageError, match="cost"):
        pareto_front([LayerOption("a", 0.1, -0.1)])
    with pytest.raises(UsageError, match="cost"):
        budget_curve([LayerOption("a", float("nan"), 0.1)])
    with pytest.raises(UsageError, match="no latency-budget curve"):
        select_within_budget([], 1.2)
