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

# The stages, callable from Python with the config objects the command line builds: every flag is a field
# (``--search.gate_lr 3e-3`` is ``cfg.search.gate_lr = 3e-3``), and a run records the equivalent command.
# Imported on first use, so that ``import rankalloc`` (and the light stages) do not load transformers and peft.
_STAGE_NAMES = {
    "SearchConfig": "config", "ExportConfig": "config", "RetrainConfig": "config", "SweepConfig": "config",
    "run_search": "search", "run_export": "export", "run_retrain": "retrain", "run_sweep": "sweep",
}

__all__ = [
    "__version__", "BudgetSpec", "parse_budget", "RankMap", "RankallocError", "BudgetError", "ConfigError",
    "DataError", "DivergenceError", "ModelError", "RankMapError", "RunDirError", *_STAGE_NAMES,
]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_STAGE_NAMES))


def __getattr__(name: str):
    if name in _STAGE_NAMES:
        import importlib

        return getattr(importlib.import_module(f".{_STAGE_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
