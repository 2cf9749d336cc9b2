"""The knapsack discretiser: optimal against brute force, never above B, fills >= 99% when possible."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rankalloc import discretize as disc
from rankalloc.discretize import discretize, rank_values


def brute_force(scores, costs, budget, min_fill=0.99):
    vals = [rank_values(s) for s in scores]
    options = []
    for ranks in itertools.product(*[range(len(v)) for v in vals]):
        cost = sum(r * c for r, c in zip(ranks, costs))
        if cost <= budget:
            options.append((sum(v[r] for v, r in zip(vals, ranks)), cost, ranks))
    filled = [o for o in options if o[1] >= min_fill * budget]
    fullest = max(o[1] for o in options)  # no fill possible: the fullest reachable cost
    pool = filled or [o for o in options if o[1] == fullest]
    return max(o[0] for o in pool), bool(filled)


def value_of(scores, ranks):
    return sum(rank_values(s)[r] for s, r in zip(scores, ranks))


instances = st.integers(min_value=1, max_value=4).flatmap(lambda layers: st.tuples(
    st.lists(st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=4), min_size=layers, max_size=layers),
    st.lists(st.sampled_from([3, 5, 6, 8, 10]), min_size=layers, max_size=layers),
    st.integers(min_value=3, max_value=80),
))


@settings(max_examples=200, deadline=None)
@given(instances)
def test_optimal_against_brute_force(instance):
    scores, costs, budget = instance
    if budget < min(costs):
        return
    ranks = discretize(scores, costs, budget)
    used = sum(r * c for r, c in zip(ranks, costs))
    assert used <= budget
    best, fill_possible = brute_force(scores, costs, budget)
    assert value_of(scores, ranks) == pytest.approx(best, abs=1e-9)
    if fill_possible:
        assert used >= 0.99 * budget


@settings(max_examples=60, deadline=None)
@given(instances)
def test_milp_path_agrees_with_dp(instance):
    scores, costs, budget = instance
    if budget < min(costs):
        return
    dp = discretize(scores, costs, budget)
    milp = disc._solve_milp([rank_values(s) for s in scores], costs, budget, 0.99)
    assert sum(r * c for r, c in zip(milp, costs)) <= budget
    assert value_of(scores, milp) == pytest.approx(value_of(scores, dp), abs=1e-6)


def test_deterministic_under_ties():
    scores = [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]
    costs = [4, 4, 4]
    first = discretize(scores, costs, 8)
    for _ in range(5):
        assert discretize(scores, costs, 8) == first
    assert sum(first) == 2


def test_fills_the_budget_even_when_scores_prefer_less():
    # the expensive layer scores low; without the fill floor, the cheap ones alone would do
    scores = [[1.0, 1.0], [0.01, 0.01, 0.01, 0.01]]
    costs = [100, 1000]
    ranks = discretize(scores, costs, 4200)
    assert sum(r * c for r, c in zip(ranks, costs)) >= 0.99 * 4200


def test_minilm_sized_instance_uses_the_budget():
    rng = np.random.default_rng(0)
    costs = ([768] * 4 + [1920] * 2) * 6
    scores = [rng.random(32) for _ in costs]
    budget = 500_000
    ranks = discretize(scores, costs, budget)
    used = sum(r * c for r, c in zip(ranks, costs))
    assert 0.99 * budget <= used <= budget
    assert len(set(ranks)) > 1


def test_large_coprime_instance_goes_through_milp(monkeypatch):
    monkeypatch.setattr(disc, "DP_CELL_LIMIT", 10)
    scores = [[0.9, 0.8, 0.1], [0.7, 0.2], [0.6, 0.5, 0.4]]
    costs = [7, 11, 13]
    ranks = discretize(scores, costs, 40)
    best, _ = brute_force(scores, costs, 40)
    assert value_of(scores, ranks) == pytest.approx(best)


@settings(max_examples=150, deadline=None)
@given(instances)
def test_probability_rounding_is_optimal_for_cost_weighted_scores(instance):
    scores, costs, budget = instance
    if budget < min(costs):
        return
    ranks = discretize(scores, costs, budget, rounding="probability")
    assert sum(r * c for r, c in zip(ranks, costs)) <= budget
    weighted = [[x * c for x in s] for s, c in zip(scores, costs)]
    best, _ = brute_force(weighted, costs, budget)
    assert value_of(weighted, ranks) == pytest.approx(best, abs=1e-9)


def test_knapsack_charges_cost_where_probability_rounding_does_not():
    # one wide layer (cost 5) whose components are surer than a narrow layer's (cost 2)
    scores, costs = [[0.9, 0.9], [0.6, 0.6, 0.6, 0.6, 0.6]], [5, 2]
    assert discretize(scores, costs, 10, rounding="knapsack") == [0, 5]  # 5 x 0.6 = 3.0 beats 2 x 0.9
    assert discretize(scores, costs, 10, rounding="probability") == [2, 0]  # the surer components first
    with pytest.raises(ValueError, match="rounding must be one of"):
        discretize(scores, costs, 10, rounding="greedy")


def test_a_budget_that_no_ranks_fill_to_99_percent_is_said_in_the_log(caplog):
    """Four 1,536-parameter ranks cannot fill 2,536 beyond 1,536 (61%): the map is the best below B, and
    the log says how full it is instead of leaving it to be noticed."""
    with caplog.at_level("WARNING", logger="rankalloc.discretize"):
        ranks = discretize([[0.9] * 8] * 4, [1536] * 4, 2536)
    assert sum(ranks) == 1
    assert "uses 1536 of the budget 2536 parameters (60.6%)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="rankalloc.discretize"):
        discretize([[0.9] * 8] * 4, [1536] * 4, 3072)
    assert caplog.text == ""


def test_when_no_map_fills_99_percent_the_fullest_one_is_kept():
    """Four 768-parameter and two 1,920-parameter ranks under 6,000: 5,376 (90%) is the fullest map; the
    best-scoring one (the cheap ranks, 4,992) would leave more of the budget unused than needed."""
    scores, costs = [[0.9]] * 4 + [[0.1]] * 2, [768] * 4 + [1920] * 2
    dp = discretize(scores, costs, 6000)
    milp = disc._solve_milp([rank_values(s) for s in scores], costs, 6000, 0.99)
    assert sum(r * c for r, c in zip(dp, costs)) == sum(r * c for r, c in zip(milp, costs)) == 5376
    assert dp[4:] == [1, 1] and sum(dp[:4]) == 2


@pytest.mark.parametrize("cell_limit", [disc.DP_CELL_LIMIT, 0])
def test_a_budget_below_one_rank_is_refused_by_both_solvers(monkeypatch, cell_limit):
    """Neither the table nor HiGHS returns the empty map when no single rank fits: both refuse."""
    monkeypatch.setattr(disc, "DP_CELL_LIMIT", cell_limit)
    with pytest.raises(disc.BudgetError, match="below one rank of the cheapest layer"):
        discretize([[0.9, 0.8], [0.7]], [700, 500], 499)
    with pytest.raises(disc.BudgetError, match="no layer has a candidate rank"):
        discretize([[], []], [700, 500], 5000)
    assert discretize([[0.9, 0.8], [0.7]], [700, 500], 500) == [0, 1]
