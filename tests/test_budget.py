"""Budget parsing and range checks (table-driven), plus property tests of the parser."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from rankalloc.budget import auto_r_max, check_budget, feasible_range, parse_budget, rank_cost
from rankalloc.errors import BudgetError


@pytest.mark.parametrize("text, value, percent", [
    ("500000", 500000, False),
    ("500k", 500000, False),
    ("500K", 500000, False),
    ("0.5M", 500000, False),
    ("1.2M", 1200000, False),
    ("41472", 41472, False),
    ("83k", 83000, False),
    (" 2m ", 2000000, False),
    ("5e5", 500000, False),
    ("0.5%", 0.5, True),
    ("100%", 100.0, True),
    (331776, 331776, False),
])
def test_valid_budgets(text, value, percent):
    spec = parse_budget(text)
    assert spec.percent is percent
    assert spec.value == value


@pytest.mark.parametrize("text, fragment", [
    ("0", "positive"),
    ("-5k", "positive"),
    ("abc", "not a budget"),
    ("0.5Q", "not a budget"),
    ("1e99", "beyond any model"),
    ("150%", "(0, 100]"),
    ("0%", "positive"),
    ("", "not a budget"),
    ("0.5", "whole number"),
    ("2500000.9", "whole number, got 2500000.9"),  # large counts too: no tolerance that rounds them
    ("1000000.5", "whole number"),
    ("2500000.0000000000000000000001", "whole number"),  # every digit counts, beyond 28
    ("1.5k5", "not a budget"),
    ("nan", "not a budget"),
    ("inf", "not a budget"),
    ("1e999", "not a finite number"),
    ("1e999%", "not a finite number"),
])
def test_invalid_budgets(text, fragment):
    with pytest.raises(BudgetError) as err:
        parse_budget(text)
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message


def test_percent_resolves_against_base_model():
    assert parse_budget("0.5%").resolve(22_713_216) == 113_566
    with pytest.raises(BudgetError, match="below one parameter"):
        parse_budget("0.000001%").resolve(1000)


def test_range_check_names_the_allowed_range():
    costs, r_max = [768, 1920], [4, 4]
    assert feasible_range(costs, r_max) == (768, 4 * 768 + 4 * 1920)
    check_budget(768, costs, r_max)
    check_budget(10752, costs, r_max)
    with pytest.raises(BudgetError, match="below the smallest non-empty allocation.*allowed: 768 to 10,752"):
        check_budget(767, costs, r_max)
    with pytest.raises(BudgetError, match="exceeds every module at its largest rank.*allowed: 768 to 10,752"):
        check_budget(10753, costs, r_max)


def test_rank_cost_and_auto_r_max():
    assert rank_cost({"a": 2, "b": 3}, {"a": 768, "b": 1920}) == 2 * 768 + 3 * 1920
    costs = [768] * 24 + [1920] * 12  # MiniLM-L6: uniform rank 1 costs 41,472
    assert sum(costs) == 41_472
    assert auto_r_max(500_000, costs) == 32  # uniform rank ~12 -> 2.5x = 30 -> 32
    assert auto_r_max(41_472, costs) == 4
    r = auto_r_max(331_776, costs)
    assert r * 41_472 >= 331_776


@given(st.integers(min_value=1, max_value=10**12))
@settings(deadline=None)  # no timing: a stalled shared CPU is not a failure
def test_integers_round_trip(n):
    assert parse_budget(str(n)).value == n


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(["k", "M"]))
@settings(deadline=None)  # no timing: a stalled shared CPU is not a failure
def test_suffixes_scale(n, suffix):
    assert parse_budget(f"{n}{suffix}").value == n * (1000 if suffix == "k" else 1_000_000)


@given(st.text(max_size=12))
@settings(deadline=None)  # no timing: a stalled shared CPU is not a failure
def test_parser_never_crashes(text):
    try:
        spec = parse_budget(text)
    except BudgetError:
        return
    assert spec.value > 0
