"""From learned gate scores to integer ranks under the budget: an exact multiple-choice knapsack.

Layer ``l`` may take any rank ``r`` in ``0..R_l``.  Keeping rank ``r`` earns the sum of the ``r``
largest component scores of that layer and costs ``r * c_l`` parameters.  We pick one rank per layer
to maximise the total score subject to ``sum r_l c_l <= B`` and, whenever some choice reaches it,
``sum r_l c_l >= min_fill * B`` (when no choice reaches it: the fullest reachable cost).

Solved exactly by dynamic programming over cost in units of ``gcd(c_l)`` (transformer widths share
large common factors, so this is small); instances too large for the table go to scipy's ``milp``
(HiGHS branch and bound with a zero optimality gap).  The DP breaks ties deterministically: of equally
scored allocations, the cheapest; of those, the one where later layers take the smaller ranks (earlier
layers fill first: three equal layers at two ranks' budget get [2, 0, 0]).  The ``milp`` path may break
exact ties otherwise, as HiGHS finds them.
"""
from __future__ import annotations

import logging
import math
from functools import reduce
from typing import Sequence

import numpy as np

from .errors import BudgetError

logger = logging.getLogger(__name__)

DP_CELL_LIMIT = 60_000_000  # layers x cost units x ranks handled by the table; beyond, use milp


def rank_values(scores: Sequence[float]) -> np.ndarray:
    """Value of ranks 0..R of one layer: cumulative sums of its scores sorted from high to low."""
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    return np.concatenate([[0.0], np.cumsum(s)])


ROUNDINGS = ("knapsack", "probability")


def discretize(scores: Sequence[Sequence[float]], costs: Sequence[int], budget: int,
               min_fill: float = 0.99, rounding: str = "knapsack", warn_unfilled: bool = True) -> list[int]:
    """Integer ranks maximising the kept score under the budget.

    Args:
        scores: per layer, one score per rank-1 component (e.g. keep-probabilities); ``len`` is ``R_l``.
        costs: per layer, parameters of one rank (``d_in + d_out``).
        budget: the parameter budget ``B``.
        min_fill: the rank map must use at least this share of ``B`` whenever that is reachable.
        rounding: ``"knapsack"`` maximises the sum of kept scores, so a component's worth is its score
            per parameter (cheap layers win ties); ``"probability"`` maximises the kept parameters weighted
            by score (sum of ``score * cost``), which keeps the components in order of score, as a
            threshold on the keep-probabilities would - the gates' scores already paid for their cost
            through the Lagrangian, so this does not charge it twice.
        warn_unfilled: warn when no ranks reach ``min_fill`` (off for a budget the user did not give, such as
            one step of AdaLoRA's schedule).

    Raises:
        BudgetError: when even rank 1 on the cheapest layer exceeds ``budget`` (or no layer has a candidate).
    """
    if len(scores) != len(costs):
        raise ValueError("scores and costs must have one entry per layer")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    costs = [int(c) for c in costs]
    values = [rank_values(s) * (c if rounding == "probability" else 1) for s, c in zip(scores, costs)]
    if any(c <= 0 for c in costs):
        raise ValueError("every cost per rank must be positive")
    budget = int(budget)
    rankable = [c for c, v in zip(costs, values) if len(v) > 1]  # layers with at least one candidate rank
    if not rankable or min(rankable) > budget:  # both solvers would return the empty map
        raise BudgetError(f"the budget {budget} is below one rank of the cheapest layer "
                          f"({min(rankable) if rankable else 'no layer has a candidate rank'})")
    unit = reduce(math.gcd, costs)
    cap = budget // unit
    cells = sum(len(v) for v in values) * (cap + 1)
    if cells <= DP_CELL_LIMIT:
        ranks = _solve_dp(values, [c // unit for c in costs], cap, int(math.ceil(min_fill * budget / unit)))
    else:
        ranks = _solve_milp(values, costs, budget, min_fill)
    used = sum(r * c for r, c in zip(ranks, costs))
    assert used <= budget, "discretiser exceeded the budget"  # a bug, not a user error
    if used < min_fill * budget and warn_unfilled:
        logger.warning("the rank map uses %d of the budget %d parameters (%.1f%%): no ranks within these candidates "
                       "fill [%.0f%%, 100%%] of it (cost per rank: %s)", used, budget, 100 * used / budget,
                       100 * min_fill, ", ".join(str(c) for c in sorted(set(costs))[:4]))
    return ranks


def _solve_dp(values: list[np.ndarray], units: list[int], cap: int, floor_units: int) -> list[int]:
    """Exact DP over exact cost (in units): best[c] = max score reaching cost exactly c."""
    neg = -np.inf
    best = np.full(cap + 1, neg)
    best[0] = 0.0
    choices = []
    for vals, u in zip(values, units):
        new = np.full(cap + 1, neg)
        arg = np.zeros(cap + 1, dtype=np.int32)
        for r, v in enumerate(vals):  # r ascending: strict '>' keeps this layer's smaller rank on ties
            shift = r * u
            if shift > cap:
                break
            cand = np.full(cap + 1, neg)
            cand[shift:] = best[: cap + 1 - shift] + v
            better = cand > new
            new[better] = cand[better]
            arg[better] = r
        best = new
        choices.append(arg)
    reachable = np.isfinite(best)
    filled = reachable.copy()
    filled[: min(floor_units, cap + 1)] = False
    if not reachable[1:].any():
        raise BudgetError("the budget is below one rank of the cheapest layer")
    pool = filled
    if not filled.any():  # nothing reaches min_fill: the fullest reachable cost, as near to it as it gets
        pool = np.zeros_like(reachable)
        pool[np.flatnonzero(reachable).max()] = True
    masked = np.where(pool, best, neg)
    c = int(np.argmax(masked))  # first maximum: the cheaper of equally good allocations
    ranks = [0] * len(values)
    for layer in range(len(values) - 1, -1, -1):
        r = int(choices[layer][c])
        ranks[layer] = r
        c -= r * units[layer]
    return ranks


def _solve_milp(values: list[np.ndarray], costs: list[int], budget: int, min_fill: float) -> list[int]:
    """One binary per (layer, rank); exactly one per layer; cost within [min_fill*B, B] if feasible."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    sizes = [len(v) for v in values]
    n = sum(sizes)
    obj = -np.concatenate(values)
    onehot = np.zeros((len(values), n))
    cost_row = np.zeros(n)
    start = 0
    for layer, (v, c) in enumerate(zip(values, costs)):
        onehot[layer, start:start + len(v)] = 1.0
        cost_row[start:start + len(v)] = np.arange(len(v)) * c
        start += len(v)
    options = {"mip_rel_gap": 0.0, "presolve": True}

    def solve(objective: np.ndarray, lower: float):
        cons = [LinearConstraint(onehot, 1, 1), LinearConstraint(cost_row[None, :], lower, budget)]
        return milp(objective, constraints=cons, integrality=np.ones(n), bounds=Bounds(0, 1), options=options)

    res = solve(obj, min_fill * budget)
    if res.status != 0:  # nothing reaches min_fill: the fullest reachable cost, as near to it as it gets
        fullest = solve(-cost_row, 0.0)
        if fullest.status == 0:
            res = solve(obj, float(cost_row @ np.round(fullest.x)))
    if res.status == 0:
        x = np.round(res.x).astype(int)
        ranks, start = [], 0
        for s in sizes:
            ranks.append(int(np.argmax(x[start:start + s])))
            start += s
        return ranks
    raise BudgetError("the budget is below one rank of the cheapest layer")
