"""Figures of a rank search and of a benchmark: the rank heatmap, the search trajectory, a Pareto plot.

Every file is written atomically (``io.save_figure``).  Matplotlib is imported lazily and figures are drawn
on an Agg canvas without pyplot, so nothing here touches global GUI state.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .io import save_figure
from .tables import _as_float, _layer_label, human_params, rank_table

if TYPE_CHECKING:
    from .targets import Target

logger = logging.getLogger(__name__)


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


def plot_pareto(path: str | Path, points: list[dict], title: str | None = None, metric: str = "accuracy",
                xlabel: str = "adapter parameters") -> None:
    """A point's ``score`` (the task family's ``metric``) against adapter parameters: one marker/line series
    per ``method`` (sorted by params), error bars where ``score_std`` is given; log x axis when the parameter
    span exceeds 10x.  Points with a ``panel`` key (e.g. the task) get one subplot per panel, each method
    in the same colour and marker in every panel.  When points carry a boolean ``front`` (a sweep's trials),
    each method's trials are plain markers and only its non-dominated ones are joined, by a dashed staircase
    through ringed markers: a line through every trial would draw dominated trials as part of the curve."""
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
        _draw_pareto(ax, [p for p in points if str(p.get("panel", "")) == panel], methods, metric, xlabel)
        if panel:
            ax.set_title(panel)
    if not points:
        axes[0].text(0.5, 0.5, "no points", ha="center", va="center", transform=axes[0].transAxes)
        logger.warning("plot_pareto: no points to plot (%s)", path)
    if title:
        fig.suptitle(title) if len(panels) > 1 else axes[0].set_title(title)
    if methods:  # on the panel that shows the most methods (a method may lack points on some panels)
        max(axes, key=lambda ax: len(ax.get_legend_handles_labels()[1])).legend(fontsize=9, loc="best")
    save_figure(path, fig, dpi=110)
    logger.debug("wrote pareto plot %s", path)


def _draw_pareto(ax: Any, points: list[dict], methods: list[str], metric: str, xlabel: str) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    all_params = []
    fronts = 0
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
        on_front = np.array([bool(p.get("front", False)) for p in series])
        if any("front" in p for p in series):
            style.update(linestyle="none", alpha=0.55)
        ax.errorbar(x, y, yerr=yerr, capsize=3, **style)  # errorbar for all: legend keeps method order
        if on_front.any():
            ax.step(x[on_front], y[on_front], where="post", color=f"C{k % 10}", linestyle="--", linewidth=1.2)
            ax.scatter(x[on_front], y[on_front], s=150, facecolors="none", edgecolors=f"C{k % 10}", linewidths=1.5,
                       zorder=3)
            fronts += 1
    if fronts:  # one neutral legend entry for the rings, whatever the number of methods
        ax.scatter([], [], s=150, facecolors="none", edgecolors="0.3", linewidths=1.5, label="Pareto front")
    positive = [v for v in all_params if v > 0]
    if positive and min(positive) == min(all_params) and max(positive) / min(positive) > 10:
        ax.set_xscale("log")
        # 1-2-5 ticks over up to two decades; beyond, their labels would run into each other
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if max(positive) / min(positive) <= 100
                                              else (1.0,)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: human_params(v)))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.grid(True, which="major", alpha=0.3)
