"""Parameter budgets: parse "0.5M" / "500k" / "500000" / "0.5%", cost of ranks, feasible range.

One rank of LoRA on a module with ``d_in`` inputs and ``d_out`` outputs costs ``d_in + d_out``
parameters (a row of A and a column of B).  Parsing is purely syntactic, so a malformed budget is
refused before any model is loaded; the range check needs only the target shapes.
"""
from __future__ import annotations

import math
import re
from decimal import Decimal, localcontext
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .errors import BudgetError

_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgb%]?)\s*$", re.IGNORECASE)
ALLOWED = "a positive parameter count such as 500000, 500k, 0.5M, 1.2M, or a share of the base model such as 0.5%"
MAX_ABSOLUTE = 10**13  # no model has 10 trillion adapter parameters; larger values are typos


@dataclass(frozen=True)
class BudgetSpec:
    """A parsed budget: an absolute parameter count, or a percentage of the base model's parameters."""

    text: str
    value: float
    percent: bool

    def resolve(self, base_params: int) -> int:
        """The budget in parameters (a percentage is taken of ``base_params`` and floored)."""
        if not self.percent:
            return int(self.value)
        budget = int(math.floor(self.value / 100.0 * base_params))
        if budget <= 0:
            raise BudgetError(f"--budget {self.text}: {self.value}% of {base_params:,} parameters is "
                              f"below one parameter; allowed: {ALLOWED}")
        return budget


def parse_budget(text: str | int, flag: str = "--budget") -> BudgetSpec:
    """Parse a budget string; errors name ``flag``.

    Raises:
        BudgetError: unparsable, zero, negative, fractional counts, percentages above 100, absurdly large.
    """
    raw = str(text).strip()
    if isinstance(text, bool):
        raise BudgetError(f"{flag} {raw!r} is not a budget; allowed: {ALLOWED}")
    if raw.startswith("-"):
        raise BudgetError(f"{flag} {raw}: a budget must be positive; allowed: {ALLOWED}")
    m = _PATTERN.match(raw)
    if not m:
        raise BudgetError(f"{flag} {raw!r} is not a budget; allowed: {ALLOWED}")
    number, suffix = float(m.group(1)), m.group(2).lower()
    if not math.isfinite(number):
        raise BudgetError(f"{flag} {raw}: not a finite number; allowed: {ALLOWED}")
    if number <= 0:
        raise BudgetError(f"{flag} {raw}: a budget must be positive; allowed: {ALLOWED}")
    if suffix == "%":
        if number > 100:
            raise BudgetError(f"{flag} {raw}: a percentage of the base model must lie in (0, 100]")
        return BudgetSpec(raw, number, True)
    value = number * _SUFFIX[suffix]
    if value > MAX_ABSOLUTE:
        raise BudgetError(f"{flag} {raw}: {value:.3g} parameters is beyond any model (at most {MAX_ABSOLUTE:.0e})")
    with localcontext() as ctx:  # as written, every digit: 0.5M is 500000, 2500000.9 is no count
        ctx.prec = len(m.group(1)) + 12
        exact = Decimal(m.group(1)) * int(_SUFFIX[suffix])
    if exact != exact.to_integral_value():
        raise BudgetError(f"{flag} {raw}: a parameter count must be a whole number, got {exact.normalize():f}")
    rounded = int(exact)
    if rounded <= 0:
        raise BudgetError(f"{flag} {raw}: a budget must be at least one parameter; allowed: {ALLOWED}")
    return BudgetSpec(raw, float(rounded), False)


def rank_cost(ranks: Mapping[str, int], cost_per_rank: Mapping[str, int]) -> int:
    """Adapter parameters of a rank map: sum of rank times (d_in + d_out)."""
    return int(sum(int(r) * int(cost_per_rank[name]) for name, r in ranks.items()))


def feasible_range(costs: Iterable[int], r_max: Iterable[int]) -> tuple[int, int]:
    """(smallest non-empty allocation, cost of every module at its largest rank)."""
    costs, r_max = list(costs), list(r_max)
    lo = min(c for c, r in zip(costs, r_max) if r > 0)
    hi = sum(c * r for c, r in zip(costs, r_max))
    return lo, hi


def check_budget(budget: int, costs: Iterable[int], r_max: Iterable[int], text: str | None = None,
                 raise_cap: str = "raise --search.r_max to allow more", flag: str = "--budget",
                 full_ranks: Iterable[int] | None = None) -> None:
    """Refuse a budget that no rank map can use; ``raise_cap`` says how the caller's user lifts the caps,
    and errors name ``flag``.  ``full_ranks`` (each module's full rank), when the caps can be lifted or grow
    with the budget (the automatic ``r_max``), make the allowed range the one any setting reaches.

    Raises:
        BudgetError: below one rank of the cheapest module, or above the all-``r_max`` cost.
    """
    costs = list(costs)
    lo, hi = feasible_range(costs, r_max)
    top = feasible_range(costs, full_ranks)[1] if full_ranks is not None else hi
    shown = text if text is not None else f"{budget:,}"
    if budget < lo:
        raise BudgetError(f"{flag} {shown} ({budget:,} parameters) is below the smallest non-empty "
                          f"allocation ({lo:,}: rank 1 on the cheapest module); allowed: {lo:,} to {top:,}")
    if full_ranks is not None and budget > top:  # no cap could be raised far enough
        raise BudgetError(f"{flag} {shown} ({budget:,} parameters) exceeds every module at full rank "
                          f"({top:,}); allowed: {lo:,} to {top:,}")
    if budget > hi:
        raise BudgetError(f"{flag} {shown} ({budget:,} parameters) exceeds every module at its largest "
                          f"rank ({hi:,}); allowed: {lo:,} to {hi:,} ({raise_cap})")


def auto_r_max(budget: int, costs: Iterable[int], factor: float = 2.5, floor: int = 4, cap: int = 64) -> int:
    """A default largest rank: the power of two at or above ``factor`` times the uniform rank B affords."""
    total = sum(costs)
    uniform = budget / total
    want = max(floor, factor * uniform)
    r = 1 << max(0, math.ceil(math.log2(want)))
    return int(min(max(r, floor), max(cap, 1 << math.ceil(math.log2(max(1.0, uniform * 1.25))))))


def candidate_r_max(targets: Iterable[Any], budget: int, r_max: int | None = None) -> dict[str, int]:
    """Each target's largest candidate rank: ``r_max`` (automatic when ``None``) capped by the module's size.

    ``targets`` are :class:`~rankalloc.targets.Target` s (``name``, ``cost_per_rank``, ``max_rank``).  The
    search and the baselines that reuse its knapsack (random and gradient scores) all draw their
    candidates from here, so they compare like with like.
    """
    targets = list(targets)
    r = r_max or auto_r_max(budget, [t.cost_per_rank for t in targets])
    return {t.name: min(r, t.max_rank) for t in targets}
