"""rankalloc: learn per-layer LoRA ranks under an exact parameter budget.

The public surface is small; everything else is an implementation detail.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .budget import BudgetSpec, parse_budget  # noqa: E402
from .errors import (  # noqa: E402
    BudgetError, ConfigError, DataError, DivergenceError, ModelError, RankallocError, RankMapError, RunDirError,
)
from .rank_map import RankMap  # noqa: E402

__all__ = [
    "__version__", "BudgetSpec", "parse_budget", "RankMap", "RankallocError", "BudgetError", "ConfigError",
    "DataError", "DivergenceError", "ModelError", "RankMapError", "RunDirError",
]
