"""Rank maps as tables: per layer and kind, parameter counts, and the markdown table of a report."""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # models imports torch; only the type is needed here
    from .targets import Target

logger = logging.getLogger(__name__)

OTHER_LABEL = "other"


# ----------------------------------------------------------------------------------------------- tables

def human_params(n: float) -> str:
    """A short parameter count: 832, 41.5k, 41k, 0.50M, 12.3M, 1.20B."""
    if n is None or (isinstance(n, float) and not math.isfinite(n)):
        return "n/a"
    sign = "-" if n < 0 else ""
    a = abs(n)
    if round(a) < 1000:
        return f"{sign}{int(round(a))}"
    if a < 99_950:
        text = f"{a / 1e3:.1f}"
        if text.endswith(".0"):
            text = text[:-2]
        return f"{sign}{text}k"
    if a < 9_995_000:
        return f"{sign}{a / 1e6:.2f}M"
    if a < 999_950_000:
        return f"{sign}{a / 1e6:.1f}M"
    return f"{sign}{a / 1e9:.2f}B"


def _layer_label(layer: int | None) -> str:
    return OTHER_LABEL if layer is None else str(layer)


def rank_table(targets: list[Target], ranks: dict[str, int]) -> tuple[list[str], list[int | None], np.ndarray]:
    """(kinds, layers, matrix): rows are layers (sorted, ``None`` = "other" last), columns module kinds in
    first-seen order, cells the rank (NaN where a layer has no module of that kind)."""
    kinds: list[str] = []
    for t in targets:
        if t.kind not in kinds:
            kinds.append(t.kind)
    int_layers = sorted({t.layer for t in targets if t.layer is not None})
    layers: list[int | None] = list(int_layers)
    if any(t.layer is None for t in targets):
        layers.append(None)
    row = {layer: i for i, layer in enumerate(layers)}
    col = {kind: j for j, kind in enumerate(kinds)}
    matrix = np.full((len(layers), len(kinds)), np.nan)
    missing = [t.name for t in targets if t.name not in ranks]
    if missing:
        logger.warning("%d targets have no rank in the rank map (shown as empty): %s", len(missing),
                       ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    for t in targets:
        if t.name not in ranks:
            continue
        i, j = row[t.layer], col[t.kind]
        if np.isnan(matrix[i, j]):
            matrix[i, j] = int(ranks[t.name])
        else:  # two modules share (layer, kind): show their total rank
            logger.warning("several targets share layer %s, kind %s; their ranks are summed in the table",
                           _layer_label(t.layer), t.kind)
            matrix[i, j] += int(ranks[t.name])
    return kinds, layers, matrix


def _layer_params(targets: list[Target], ranks: dict[str, int]) -> dict[int | None, int]:
    out: dict[int | None, int] = {}
    for t in targets:
        out[t.layer] = out.get(t.layer, 0) + int(ranks.get(t.name, 0)) * t.cost_per_rank
    return out


def _kind_params(targets: list[Target], ranks: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in targets:
        out[t.kind] = out.get(t.kind, 0) + int(ranks.get(t.name, 0)) * t.cost_per_rank
    return out


def _count(n: int) -> str:
    """``41,472 (41.5k)``; just ``832`` below a thousand."""
    n = int(n)
    return f"{n:,} ({human_params(n)})" if abs(n) >= 1000 else f"{n:,}"


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def markdown_rank_table(targets: list[Target], ranks: dict[str, int]) -> str:
    """A markdown table: one row per layer, one column per module kind (the rank), a "params" column
    (Σ rank × cost_per_rank over the layer) and a total row (rank sums per kind, total params)."""
    kinds, layers, matrix = rank_table(targets, ranks)
    per_layer = _layer_params(targets, ranks)
    header = "| layer | " + " | ".join(f"`{_md_escape(k)}`" for k in kinds) + " | params |"
    align = "|---:|" + "---:|" * len(kinds) + "---:|"
    lines = [header, align]
    for i, layer in enumerate(layers):
        cells = ["–" if np.isnan(v) else str(int(v)) for v in matrix[i]]
        lines.append(f"| {_layer_label(layer)} | " + " | ".join(cells) + f" | {per_layer.get(layer, 0):,} |")
    totals = []
    for j in range(len(kinds)):
        column = matrix[:, j]
        totals.append(str(int(np.nansum(column))) if np.any(~np.isnan(column)) else "–")
    total_params = sum(per_layer.values())
    lines.append("| **total** | " + " | ".join(totals) + f" | **{total_params:,}** |")
    return "\n".join(lines) + "\n"


def _as_float(value: Any) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
