"""Paired comparison of two sets of benchmark cells: same task, budget and seed, one difference.

    python benchmarks/compare.py quick-nested:rankalloc quick-shared:rankalloc
    python benchmarks/compare.py full:rankalloc full:uniform --task tweets
    python benchmarks/compare.py tight:rankalloc tight-qv:uniform --budget 9216

Each side is ``GRID:METHOD`` (cells under ``results/GRID/``).  Cells are paired on (task, budget, seed),
so seed-to-seed variation (data order, initialisation) cancels; prints each pair, the mean difference,
its standard deviation (n - 1) and a paired t-test (two-sided), and the mean wall time of each side.  Cells
without a partner on the other side are left out and named.  Several pairs of grids can be pooled by
repeating the arguments: ``A1 B1 A2 B2 ...``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from summarize import load, score  # noqa: E402


def cells(spec: str, results: Path, task: str | None, budget: int | None = None) -> dict[tuple, dict]:
    grid, sep, method = spec.partition(":")
    if not sep or not grid or not method:
        raise SystemExit(f"compare: {spec!r} is not GRID:METHOD (e.g. quick-shared:rankalloc)")
    folder = results / grid
    if not folder.is_dir():
        known = ", ".join(sorted(p.name for p in results.iterdir() if p.is_dir()))
        raise SystemExit(f"compare: no grid {grid!r} under {results}; grids: {known}")
    return {(r["task"], r["budget"], r["seed"]): r for r in load(folder)
            if r["method"] == method and (task is None or r["task"] == task)
            and (budget is None or r["budget"] == budget)}


def compare(pairs: list[tuple[dict, dict]]) -> dict:
    """Differences (a - b) in points of the metric, their mean, std and paired two-sided t-test p-value."""
    from scipy import stats

    diffs = [100 * (score(a) - score(b)) for a, b in pairs]
    out = {"n": len(diffs), "diffs": diffs, "mean": statistics.fmean(diffs) if diffs else float("nan"),
           "std": statistics.stdev(diffs) if len(diffs) > 1 else float("nan"), "p": float("nan")}
    if len(diffs) > 1 and out["std"] > 0:
        out["p"] = float(stats.ttest_rel([score(a) for a, _ in pairs], [score(b) for _, b in pairs]).pvalue)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sides", nargs="+", help="GRID:METHOD pairs: A B [A2 B2 ...]")
    ap.add_argument("--task", default=None, help="Only this task.")
    ap.add_argument("--budget", type=int, default=None, help="Only this budget (adapter parameters).")
    ap.add_argument("--results", default=str(HERE / "results"), help="Folder holding the grids.")
    args = ap.parse_args(argv)
    if len(args.sides) % 2:
        raise SystemExit("compare: give the sides in pairs, A B [A2 B2 ...]")
    results = Path(args.results)
    pairs, unpaired = [], []
    for a_spec, b_spec in zip(args.sides[::2], args.sides[1::2]):
        a, b = cells(a_spec, results, args.task, args.budget), cells(b_spec, results, args.task, args.budget)
        unpaired += [f"{spec} {key[0]} {key[1]:,} s{key[2]}" for spec, own, other in ((a_spec, a, b), (b_spec, b, a))
                     for key in sorted(set(own) - set(other))]
        for key in sorted(set(a) & set(b)):
            pairs.append((a[key], b[key]))
            print(f"{key[0]:>14} {key[1]:>8,} s{key[2]}  {100 * score(a[key]):6.2f}  {100 * score(b[key]):6.2f}  "
                  f"{100 * (score(a[key]) - score(b[key])):+6.2f}")
    if not pairs:
        raise SystemExit("compare: no (task, budget, seed) cell is on both sides")
    if unpaired:
        print(f"left out, no partner on the other side ({len(unpaired)}): {'; '.join(unpaired)}")
    res = compare(pairs)
    walls = [[r["total_s"] for r in side if r.get("total_s")] for side in zip(*pairs)]
    print(f"{res['n']} pairs: mean difference {res['mean']:+.2f} points (std {res['std']:.2f}, paired t-test "
          f"p = {res['p']:.2f}); wall {statistics.fmean(walls[0]):.0f} s vs {statistics.fmean(walls[1]):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
