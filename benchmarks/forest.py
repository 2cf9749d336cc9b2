"""Paired differences of several methods against one baseline, with 95% confidence intervals, in one plot.

    python benchmarks/forest.py --against full:uniform full:rankalloc full:random full:gradient full:adalora \\
        "lagr-ramp:rankalloc=Lagrangian on the ramp only" --bar 1.0 --out results/full/paired_vs_uniform.png

Each side is ``GRID:METHOD[=LABEL]``; its cells are paired with ``--against`` on (task, budget, seed), as
``compare.py`` pairs them.  One row per side: the mean difference over its pairs (dot) with the 95% t
interval of that mean (bar), and the mean at each budget (small marks).  ``--bar`` draws the accuracy bar a
method has to clear.  Next to the plot, a markdown table with n, mean, std, interval and paired t-test p.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from compare import cells, compare  # noqa: E402
from run import git_revision  # noqa: E402
from summarize import score  # noqa: E402


def paired_rows(sides: list[str], against: str, results: Path) -> list[dict]:
    """Per side: its label, the paired differences (points) and their budgets."""
    from scipy import stats

    base = cells(against, results, None)
    rows = []
    for side in sides:
        spec, _, label = side.partition("=")
        mine = cells(spec, results, None)
        keys = sorted(set(mine) & set(base))
        if not keys:
            raise SystemExit(f"forest: no (task, budget, seed) cell of {spec} is in {against}")
        res = compare([(mine[k], base[k]) for k in keys])
        half = (stats.t.ppf(0.975, res["n"] - 1) * res["std"] / res["n"] ** 0.5) if res["n"] > 1 else float("nan")
        by_budget: dict[int, list[float]] = {}
        for k in keys:
            by_budget.setdefault(k[1], []).append(100 * (score(mine[k]) - score(base[k])))
        rows.append({"label": label or spec, "spec": spec, **res, "low": res["mean"] - half, "high": res["mean"] + half,
                     "by_budget": {b: statistics.fmean(v) for b, v in sorted(by_budget.items())}})
    return rows


def draw(rows: list[dict], against: str, bar: float | None, out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from rankalloc.io import save_figure

    budgets = sorted({b for r in rows for b in r["by_budget"]})
    markers = dict(zip(budgets, "^sDvP*"))
    fig = Figure(figsize=(9, 0.55 * len(rows) + 2.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shown: set[int] = set()
    for y, r in enumerate(reversed(rows)):
        ax.errorbar(r["mean"], y, xerr=[[r["mean"] - r["low"]], [r["high"] - r["mean"]]], fmt="o", color="black",
                    capsize=3, zorder=3, label="mean, 95% interval" if y == 0 else None)
        for b, m in r["by_budget"].items():
            ax.plot(m, y + 0.22, markers[b], color="tab:blue", alpha=0.6, markersize=5,
                    label=None if b in shown else f"mean at {b:,}")
            shown.add(b)
    ax.axvline(0, color="gray", lw=1)
    if bar is not None:
        ax.axvline(bar, color="tab:red", ls="--", lw=1, label=f"the bar: +{bar:g}")
    ax.set_yticks(range(len(rows)), [f"{r['label']} (n={r['n']})" for r in reversed(rows)])
    ax.set_xlabel(f"points against {against} (paired cells)")
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: (not labels[i].startswith("mean at"),
                                                      int("".join(filter(str.isdigit, labels[i])) or 0), labels[i]))
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=7, loc="upper center",
              bbox_to_anchor=(0.5, -0.12), ncol=3, frameon=False)
    fig.tight_layout()
    save_figure(out, fig, dpi=130)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sides", nargs="+", help="GRID:METHOD[=LABEL] for each row")
    ap.add_argument("--against", required=True, help="GRID:METHOD every side is paired with")
    ap.add_argument("--bar", type=float, default=None, help="Draw this difference as the bar to clear.")
    ap.add_argument("--out", required=True, help="The plot (.png); the table goes next to it (.md).")
    ap.add_argument("--results", default=str(HERE / "results"), help="Folder holding the grids.")
    args = ap.parse_args(argv)
    out = Path(args.out) if Path(args.out).is_absolute() else HERE / args.out
    rows = paired_rows(args.sides, args.against, Path(args.results))
    draw(rows, args.against, args.bar, out)
    this = "python benchmarks/forest.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    budgets = sorted({b for r in rows for b in r["by_budget"]})
    lines = [f"# Paired differences against {args.against}", "",
             f"- this table and `{out.name}`: `{this}` (git {git_revision()})", "",
             "| method | pairs | mean | std | 95% interval | p (paired t) | " + " | ".join(f"at {b:,}" for b in budgets) + " |",
             "|---|---:|---:|---:|---:|---:|" + "---:|" * len(budgets)]
    for r in rows:
        at = [f"{r['by_budget'][b]:+.2f}" if b in r["by_budget"] else "" for b in budgets]
        lines.append(f"| {r['label']} | {r['n']} | {r['mean']:+.2f} | {r['std']:.2f} | {r['low']:+.2f} to "
                     f"{r['high']:+.2f} | {r['p']:.2f} | " + " | ".join(at) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
