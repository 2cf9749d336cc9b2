"""Tables and the accuracy-versus-parameters plot from ``benchmarks/results/<grid>/*.json``.

    python benchmarks/summarize.py --grid quick     # writes results/quick/summary.md and accuracy_vs_params.png
    python benchmarks/summarize.py --grid tight --with "tight-qv:uniform=uniform q,v"   # add another grid's cells

``--with GRID:METHOD=LABEL`` (repeatable) adds the cells of METHOD from another grid under the name LABEL,
e.g. a uniform baseline on hand-picked targets that ran in its own grid; rankalloc's deltas include it.
"""
from __future__ import annotations

import argparse
import shlex
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def load(grid: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(grid.glob("*.json"))]


def load_extra(spec: str, results: Path = HERE / "results") -> list[dict]:
    """``GRID:METHOD=LABEL``: METHOD's records from ``results/GRID``, renamed LABEL.

    Raises:
        ValueError: a malformed spec, a LABEL that is already a method name, or no such cells.
    """
    where, sep, label = spec.partition("=")
    other, colon, method = where.partition(":")
    label = label.strip()
    if not (sep and colon and other and method and label):
        raise ValueError(f"--with {spec!r}: expected GRID:METHOD=LABEL, e.g. 'tight-qv:uniform=uniform q,v'")
    if "|" in label:
        raise ValueError(f"--with {spec!r}: a label cannot contain '|' (it separates the table's columns)")
    if label in ("rankalloc", "random", "gradient", "uniform", "adalora"):
        raise ValueError(f"--with {spec!r}: the label {label!r} is a method name; pick another")
    records = [dict(r, method=label) for r in load(results / other) if r["method"] == method]
    if not records:
        raise ValueError(f"--with {spec!r}: no {method} cells in results/{other}")
    return records


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def score(record: dict) -> float:
    """The task family's metric (accuracy for classification and multiple choice); older records hold accuracy."""
    return record["score"] if record.get("score") is not None else record["accuracy"]


def peak_rss(records: list[dict]) -> str:
    """Mean peak resident memory of the cell's largest stage (rankalloc: search or retrain, whichever is
    larger; only records that carry the search's figure count for rankalloc)."""
    peaks = []
    for r in records:
        stages = [r.get("peak_memory_mb")] + ([r.get("search_peak_memory_mb")] if r["method"] == "rankalloc" else [])
        if all(s and s.get("cpu_rss") for s in stages):
            peaks.append(max(s["cpu_rss"] for s in stages))
    return f"{statistics.fmean(peaks):,.0f}" if peaks else "n/a"


def _row(cells: list) -> str:
    """One markdown table row: as many cells as given (none left empty at the end)."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def summarize(records: list[dict]) -> tuple[str, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["task"], r["budget"], r["method"])].append(r)
    # every other method present is a baseline (the default grid's three first, in this order)
    present = {k[2] for k in groups} - {"rankalloc"}
    bases = [m for m in ("random", "gradient", "uniform", "adalora") if m in present] \
        + sorted(present - {"random", "gradient", "uniform", "adalora"})
    names = {"random": "random scores", "gradient": "gradient", "uniform": "uniform", "adalora": "AdaLoRA"}
    names.update({m: m for m in bases if m not in names})
    header = ["task", "budget", "method", "seeds", "score (mean ± std)", "macro-F1", "adapter params (% of B)",
              "wall time (s)", "peak RSS (MiB)"] + [f"Δ vs {names[b]}" for b in bases]
    lines = [_row(header), "|---|---:|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(bases)]
    points = []
    for (task, budget, method), rs in sorted(groups.items()):
        acc, acc_sd = mean_std([100 * score(r) for r in rs])
        metric = rs[0].get("metric", "accuracy")
        f1s = [100 * r["macro_f1"] for r in rs if r.get("macro_f1") is not None]
        f1 = f"{statistics.fmean(f1s):.2f}" if f1s else "n/a"
        params = statistics.fmean(r["adapter_params"] for r in rs)
        wall = statistics.fmean(r["total_s"] for r in rs)
        peak = peak_rss(rs)
        deltas = []
        for base in bases:
            # paired: over the seeds both sides have, and says how many when that is not every seed
            other = {r["seed"]: r for r in groups.get((task, budget, base), [])}
            mine = {r["seed"]: r for r in rs}
            shared = sorted(set(mine) & set(other))
            if method == "rankalloc" and shared:
                delta = statistics.fmean(100 * (score(mine[s]) - score(other[s])) for s in shared)
                note = "" if len(shared) == len(mine) == len(other) else f" (n={len(shared)})"
                deltas.append(f"{delta:+.2f}{note}")
            else:
                deltas.append("")
        lines.append(_row([task, f"{budget:,}", method, len(rs), f"{acc:.2f} ± {acc_sd:.2f} ({metric})", f1,
                           f"{params:,.0f} ({100 * params / budget:.1f}%)", f"{wall:.0f}", peak] + deltas))
        points.append({"method": method, "panel": task if len({k[0] for k in groups}) > 1 else "",
                       "params": params, "score": acc / 100, "score_std": acc_sd / 100, "metric": metric})
    return "\n".join(lines), points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="quick")
    parser.add_argument("--with", dest="extra", action="append", default=[], metavar="GRID:METHOD=LABEL",
                        help="add METHOD's cells from results/GRID under the name LABEL (repeatable)")
    parser.add_argument("--results", type=Path, default=HERE / "results", help="the folder of the grids")
    args = parser.parse_args(argv)
    grid = args.results / args.grid
    records = load(grid)
    if not records:
        print(f"no results in {grid}", file=sys.stderr)
        return 1
    for spec in args.extra:
        try:
            extra = load_extra(spec, args.results)
        except ValueError as e:
            parser.error(str(e))
        if extra[0]["method"] in {r["method"] for r in records}:  # two sources would merge into one row
            parser.error(f"--with {spec!r}: the label {extra[0]['method']!r} is already used; pick another")
        records += extra
    table, points = summarize(records)
    meta = records[0].get("meta", {})
    runs = sorted({(r.get("meta", {}).get("command", "?"), r.get("meta", {}).get("git_revision", "?"),
                    r.get("meta", {}).get("date", "?")) for r in records})
    from rankalloc import io
    from rankalloc.figures import plot_pareto

    metric = "/".join(sorted({p["metric"] for p in points}))
    plot_pareto(grid / "accuracy_vs_params.png", points, title=f"{metric} vs adapter parameters ({args.grid})",
                metric=metric)
    this = "python benchmarks/summarize.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    text = "\n".join([f"# Benchmark results: {args.grid}", "",
                      f"- this table: `{this}` (another `--with` set rewrites it with other columns)",
                      *[f"- command: `{c}` (git {g}, {d})" for c, g, d in runs],
                      f"- machine: {meta.get('machine', '?')}",
                      f"- recipe (all methods): `{' '.join(meta.get('recipe', []))}` "
                      f"{meta.get('retrain_args', '')}", "", table, "",
                      "![accuracy vs parameters](accuracy_vs_params.png)", ""])
    io.write_text(grid / "summary.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
