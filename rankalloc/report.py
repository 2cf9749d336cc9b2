"""Figures and a markdown report for a rank search: the rank map, the search trajectory, a Pareto plot.

Every file is written atomically (``io.save_figure`` / ``io.write_text``): a reader sees either the old
file or the complete new one.  Matplotlib is imported lazily and figures are drawn on an Agg canvas
without pyplot, so nothing here touches global GUI state.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .io import save_figure, write_text

if TYPE_CHECKING:  # models imports torch; only the type is needed here
    from .models import Target

logger = logging.getLogger(__name__)

OTHER_LABEL = "other"

# summary keys rendered in their own sections; every other key goes to "Other settings"
_KNOWN_SUMMARY_KEYS = {
    "budget", "total_params", "head_params", "base_model", "task", "seed", "steps",
    "final_lambda", "final_cost_ratio", "wall_time_s", "gap", "command",
}


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


# ---------------------------------------------------------------------------------------------- figures

def _new_figure(figsize: tuple[float, float], **kwargs: Any):
    """A figure on an Agg canvas, made without pyplot (no global state, nothing to close)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained", **kwargs)
    FigureCanvasAgg(fig)
    return fig


def plot_rank_heatmap(path: str | Path, targets: list[Target], ranks: dict[str, int],
                      title: str = "LoRA rank per module") -> None:
    """Heatmap of ranks, layers (y) × module kind (x), each cell annotated with its rank; saved as PNG."""
    import matplotlib
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    kinds, layers, matrix = rank_table(targets, ranks)
    n_layers, n_kinds = matrix.shape
    longest = max((len(k) for k in kinds), default=1)
    rotate = n_kinds > 1 and (longest > 8 or n_kinds > 5)
    width = max(4.5, 1.05 * n_kinds + 2.8)
    height = max(3.0, 0.3 * n_layers + 1.6 + (0.055 * longest if rotate else 0.3))
    fig = _new_figure((width, height))
    ax = fig.add_subplot()

    finite = matrix[np.isfinite(matrix)]
    vmax = float(finite.max()) if finite.size else 1.0
    norm = Normalize(vmin=0.0, vmax=max(vmax, 1.0))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, norm=norm, aspect="auto",
                      interpolation="nearest")

    fontsize = 10 if n_layers <= 12 else 8 if n_layers <= 40 else 6
    for i in range(n_layers):
        for j in range(n_kinds):
            v = matrix[i, j]
            if np.isnan(v):
                ax.text(j, i, "–", ha="center", va="center", fontsize=fontsize, color="#666666")
                continue
            r, g, b, _ = cmap(norm(v))
            luminance = 0.299 * r + 0.587 * g + 0.114 * b
            ax.text(j, i, str(int(v)), ha="center", va="center", fontsize=fontsize,
                    color="black" if luminance > 0.5 else "white")

    ax.set_xticks(range(n_kinds))
    ax.set_yticks(range(n_layers))
    ax.set_yticklabels([_layer_label(layer) for layer in layers], fontsize=fontsize)
    if rotate:
        ax.set_xticklabels(kinds, rotation=35, ha="right", rotation_mode="anchor", fontsize=9)
    else:
        ax.set_xticklabels(kinds, fontsize=9)
    ax.set_xlabel("module kind")
    ax.set_ylabel("layer")
    ax.tick_params(length=0)
    ax.set_xticks(np.arange(-0.5, n_kinds, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n_layers, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8)
    ax.tick_params(which="minor", length=0)
    ax.set_title(title)
    cbar = fig.colorbar(image, ax=ax, shrink=min(1.0, 0.5 + 0.05 * n_layers), pad=0.02)
    cbar.set_label("rank")
    cbar.locator = MaxNLocator(integer=True)
    cbar.update_ticks()
    save_figure(path, fig, dpi=110)
    logger.debug("wrote rank heatmap %s", path)


def _as_float(value: Any) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def plot_trajectory(path: str | Path, history: list[dict]) -> None:
    """Three panels sharing the step axis: (a) C/B and target/B with a dashed line at 1, (b) λ,
    (c) training loss and held-out loss (rows whose val_loss is None/NaN are skipped)."""
    rows = sorted(history, key=lambda h: _as_float(h.get("step")))
    step = np.array([_as_float(h.get("step")) for h in rows])

    def col(key: str) -> np.ndarray:
        return np.array([_as_float(h.get(key)) for h in rows])

    fig = _new_figure((7.5, 7.5))
    ax_cost, ax_lam, ax_loss = fig.subplots(3, 1, sharex=True)
    if not rows:
        for ax in (ax_cost, ax_lam, ax_loss):
            ax.text(0.5, 0.5, "no history recorded", ha="center", va="center", transform=ax.transAxes)
    else:
        ax_cost.plot(step, col("cost_ratio"), color="C0", label="cost / budget (C/B)")
        ax_cost.plot(step, col("target_ratio"), color="C1", linestyle="-.", label="scheduled target / B")
        ax_lam.plot(step, col("lam"), color="C2", label="λ")
        ax_loss.plot(step, col("train_loss"), color="C0", alpha=0.8, linewidth=1.0, label="train loss")
        val = col("val_loss")
        keep = np.isfinite(val)
        if keep.any():
            ax_loss.plot(step[keep], val[keep], color="C3", marker="o", markersize=4, label="held-out loss")
    ax_cost.axhline(1.0, color="black", linestyle="--", linewidth=1.0, label="budget (1.0)")
    ax_cost.set_ylabel("ratio to budget")
    ax_cost.set_title("(a) adapter cost vs budget", loc="left", fontsize=10)
    ax_lam.set_ylabel("λ")
    ax_lam.set_title("(b) Lagrange multiplier λ", loc="left", fontsize=10)
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("(c) training and held-out loss", loc="left", fontsize=10)
    ax_loss.set_xlabel("step")
    for ax in (ax_cost, ax_lam, ax_loss):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    save_figure(path, fig, dpi=110)
    logger.debug("wrote trajectory %s", path)


def plot_pareto(path: str | Path, points: list[dict], title: str | None = None, metric: str = "accuracy") -> None:
    """A point's ``score`` (the task family's ``metric``) against adapter parameters: one marker/line series
    per ``method`` (sorted by params), error bars where ``score_std`` is given; log x axis when the parameter
    span exceeds 10x.  Points with a ``panel`` key (e.g. the task) get one subplot per panel, each method
    in the same colour and marker in every panel."""
    methods: list[str] = []
    panels: list[str] = []
    for p in points:
        if str(p["method"]) not in methods:
            methods.append(str(p["method"]))
        if str(p.get("panel", "")) not in panels:
            panels.append(str(p.get("panel", "")))
    panels = panels or [""]
    fig = _new_figure((6.5 if len(panels) == 1 else 4.2 * len(panels), 4.5))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        _draw_pareto(ax, [p for p in points if str(p.get("panel", "")) == panel], methods, metric)
        if panel:
            ax.set_title(panel)
    if not points:
        axes[0].text(0.5, 0.5, "no points", ha="center", va="center", transform=axes[0].transAxes)
        logger.warning("plot_pareto: no points to plot (%s)", path)
    if title:
        fig.suptitle(title) if len(panels) > 1 else axes[0].set_title(title)
    if methods:
        axes[0].legend(fontsize=9, loc="best")
    save_figure(path, fig, dpi=110)
    logger.debug("wrote pareto plot %s", path)


def _draw_pareto(ax: Any, points: list[dict], methods: list[str], metric: str) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    all_params = []
    for k, method in enumerate(methods):
        series = sorted((p for p in points if str(p["method"]) == method), key=lambda p: float(p["params"]))
        if not series:
            continue
        x = np.array([float(p["params"]) for p in series])
        y = np.array([_as_float(p["score"]) for p in series])
        std = np.array([_as_float(p.get("score_std")) for p in series])
        all_params.extend(x.tolist())
        style = dict(marker=markers[k % len(markers)], color=f"C{k % 10}", label=method, markersize=6,
                     linewidth=1.5)
        yerr = np.where(np.isfinite(std), std, 0.0) if np.isfinite(std).any() else None
        ax.errorbar(x, y, yerr=yerr, capsize=3, **style)  # errorbar for all: legend keeps method order
    positive = [v for v in all_params if v > 0]
    if positive and min(positive) == min(all_params) and max(positive) / min(positive) > 10:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: human_params(v)))
    ax.set_xlabel("adapter parameters")
    ax.set_ylabel(metric)
    ax.grid(True, which="major", alpha=0.3)


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
        return ("The gap compares held-out loss with the continuous gates against the hard rank map; "
                "it could not be measured for this run.")
    rel = abs(gap) / abs(continuous) if continuous else math.inf
    if gap > 0:
        size = "small" if rel < 0.05 else "large"
        return (f"Rounding the continuous gates to the hard rank map raises held-out loss by {gap:.4f} "
                f"({rel:.1%}); a {size} gap means the discrete ranks "
                f"{'behave like' if size == 'small' else 'differ noticeably from'} the relaxed model "
                f"the search optimised.")
    return (f"The hard rank map's held-out loss is not worse than the continuous gates' "
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
        f"| steps | {_fmt(summary.get('steps'))} |",
        f"| final C/B | {_fmt(summary.get('final_cost_ratio'), '.4f')} |",
        f"| final λ | {_fmt(summary.get('final_lambda'), '.4g')} |",
        f"| wall time | {_fmt_duration(summary.get('wall_time_s'))} |",
        "",
        "## Discretisation gap",
        "",
        "| held-out loss, continuous gates | held-out loss, hard rank map | gap (hard − continuous) |",
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
