"""The markdown report of a rank search (``report.md``), with its rank heatmap and trajectory figures.

Every file is written atomically (``io.save_figure`` / ``io.write_text``): a reader sees either the old
file or the complete new one.  Tables live in :mod:`rankalloc.tables`, figures in :mod:`rankalloc.figures`.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .figures import plot_rank_heatmap, plot_trajectory
from .io import write_text
from .tables import (_as_float, _count, _kind_params, _layer_params, _md_escape,
                     markdown_rank_table)

if TYPE_CHECKING:
    from .targets import Target

logger = logging.getLogger(__name__)

# summary keys rendered in their own sections; every other key goes to "Other settings"
_KNOWN_SUMMARY_KEYS = {
    "budget", "total_params", "head_params", "base_model", "task", "seed", "steps", "warmup_steps",
    "final_lambda", "final_cost_ratio", "wall_time_s", "resumed_from_step", "gap", "command",
}


# ----------------------------------------------------------------------------------------------- report

def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def _fmt_duration(seconds: Any) -> str:
    s = _as_float(seconds)
    if not math.isfinite(s):
        return "n/a"
    if s < 60:
        return f"{s:.1f} s"
    minutes, sec = divmod(int(round(s)), 60)
    hours, minutes = divmod(minutes, 60)
    clock = f"{hours}h {minutes:02d}m {sec:02d}s" if hours else f"{minutes}m {sec:02d}s"
    return f"{s:.0f} s ({clock})"


def _fmt_extra(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        try:
            return f"`{json.dumps(value, default=str)}`"
        except (TypeError, ValueError):
            pass
    return _md_escape(_fmt(value))


def _gap_sentence(continuous: float, hard: float, gap: float) -> str:
    if not (math.isfinite(continuous) and math.isfinite(hard) and math.isfinite(gap)):
        return ("The gap compares the gate split's loss under sampled gates (the objective the search "
                "optimised) against the hard rank map; it could not be measured for this run.")
    rel = abs(gap) / abs(continuous) if continuous else math.inf
    if gap > 0:
        size = "small" if rel < 0.05 else "large"
        return (f"Fixing the sampled gates to the hard rank map raises the gate split's loss by {gap:.4f} "
                f"({rel:.1%}); a {size} gap means the discrete ranks "
                f"{'behave like' if size == 'small' else 'differ noticeably from'} the relaxed model "
                f"the search optimised.")
    return (f"The hard rank map's loss on the gate split is not worse than the sampled gates' "
            f"(gap {gap:.4f}), so discretisation lost nothing measurable.")


def _rank_statistics(targets: list[Target], ranks: dict[str, int], r_max: dict[str, int]) -> str:
    values = [int(ranks[t.name]) for t in targets if t.name in ranks]
    if not values:
        return "No ranks."
    arr = np.array(values)
    at_cap = sum(1 for t in targets if t.name in ranks and t.name in r_max
                 and int(ranks[t.name]) >= int(r_max[t.name]) and int(r_max[t.name]) > 0)
    per_kind = _kind_params(targets, ranks)
    kinds = "; ".join(f"`{_md_escape(k)}` {_count(v)}" for k, v in per_kind.items())
    return (f"Rank min {int(arr.min())} / median {float(np.median(arr)):g} / max {int(arr.max())} over "
            f"{len(values)} modules; {int((arr == 0).sum())} at rank 0; {at_cap} at their cap r_max. "
            f"Params per kind: {kinds}.")


def write_search_report(out_dir: str | Path, *, targets: list[Target], ranks: dict[str, int],
                        r_max: dict[str, int], history: list[dict], summary: dict) -> None:
    """Write ``ranks.png``, ``trajectory.png`` and ``report.md`` (last, so it never points at missing
    figures) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = summary.get("base_model", "?")
    task = summary.get("task", "?")
    plot_rank_heatmap(out / "ranks.png", targets, ranks, title=f"LoRA ranks: {base} on {task}")
    plot_trajectory(out / "trajectory.png", history)

    budget = summary.get("budget")
    used = summary.get("total_params")
    computed = sum(_layer_params(targets, ranks).values())
    if used is None:
        used = computed
    elif int(used) != computed:
        logger.warning("summary total_params %s differs from the rank map's cost %s", used, computed)
    pct = f" ({100.0 * int(used) / int(budget):.1f}% of budget)" if budget else ""
    budget_cell = _count(budget) if budget is not None else "n/a"
    head = summary.get("head_params")
    head_cell = _count(head) if head is not None else "n/a"

    gap = summary.get("gap") or {}
    cont, hard, g = (_as_float(gap.get("continuous_loss")), _as_float(gap.get("hard_loss")),
                     _as_float(gap.get("gap")))
    if not math.isfinite(g) and math.isfinite(cont) and math.isfinite(hard):
        g = hard - cont

    warmup = summary.get("warmup_steps")
    warm = f" (the first {warmup} without gate steps)" if warmup is not None else ""
    at = summary.get("resumed_from_step")
    resumed = "" if at is None else f" (resumed at step {at}: with the earlier processes up to their last checkpoint)"
    command = str(summary.get("command", "")).strip() or "(not recorded)"
    lines = [
        f"# Rank search: {_md_escape(base)} on {_md_escape(task)}",
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        "## Summary",
        "",
        "| | |",
        "|---|---:|",
        f"| base model | {_md_escape(base)} |",
        f"| task | {_md_escape(task)} |",
        f"| seed | {_fmt(summary.get('seed'))} |",
        f"| budget | {budget_cell} |",
        f"| adapter params used | {_count(used)}{pct} |",
        f"| head params (not counted) | {head_cell} |",
        f"| steps | {_fmt(summary.get('steps'))}{warm} |",
        f"| final C/B | {_fmt(summary.get('final_cost_ratio'), '.4f')} |",
        f"| final λ | {_fmt(summary.get('final_lambda'), '.4g')} |",
        f"| wall time | {_fmt_duration(summary.get('wall_time_s'))}{resumed} |",
        "",
        "## Discretisation gap",
        "",
        "Loss on the gate split (held out from the weight steps), under gates sampled as in the search "
        "(mean of its draws) and under the hard rank map.",
        "",
        "| loss, sampled gates | loss, hard rank map | gap (hard − sampled) |",
        "|---:|---:|---:|",
        f"| {_fmt(cont, '.4f')} | {_fmt(hard, '.4f')} | {_fmt(g, '+.4f')} |",
        "",
        _gap_sentence(cont, hard, g),
        "",
        "## Ranks",
        "",
        markdown_rank_table(targets, ranks).rstrip("\n"),
        "",
        "![ranks](ranks.png)",
        "",
        "## Rank statistics",
        "",
        _rank_statistics(targets, ranks, r_max),
        "",
        "## Search trajectory",
        "",
        "![trajectory](trajectory.png)",
        "",
    ]
    extras = {k: v for k, v in summary.items() if k not in _KNOWN_SUMMARY_KEYS}
    if extras:
        lines += ["## Other settings", ""]
        lines += [f"- `{_md_escape(k)}`: {_fmt_extra(v)}" for k, v in extras.items()]
        lines.append("")
    write_text(out / "report.md", "\n".join(lines))
    logger.info("wrote search report to %s", out)
