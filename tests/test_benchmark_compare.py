"""benchmarks/compare.py: cells are paired on (task, budget, seed), and only those on both sides count."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _compare_module():
    spec = importlib.util.spec_from_file_location("bench_compare", REPO / "benchmarks" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cell(folder: Path, method: str, seed: int, score: float, budget: int = 82944, task: str = "tweets") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"task": task, "budget": budget, "method": method, "seed": seed, "score": score, "total_s": 100.0 + seed}
    (folder / f"{task}-{budget}-{method}-s{seed}.json").write_text(json.dumps(record))


def test_pairs_on_task_budget_seed_and_reports_the_mean_difference(tmp_path, capsys):
    compare = _compare_module()
    for seed, (a, b) in enumerate([(0.76, 0.75), (0.74, 0.75), (0.78, 0.75)]):
        _cell(tmp_path / "new", "rankalloc", seed, a)
        _cell(tmp_path / "old", "rankalloc", seed, b)
    _cell(tmp_path / "new", "rankalloc", 7, 0.99)  # no partner: must not count
    _cell(tmp_path / "old", "uniform", 0, 0.10)  # another method: must not count
    assert compare.main(["new:rankalloc", "old:rankalloc", "--results", str(tmp_path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("3 pairs: mean difference +1.00 points")
    res = compare.compare([({"score": 0.76}, {"score": 0.75}), ({"score": 0.78}, {"score": 0.75})])
    assert res["diffs"] == pytest.approx([1.0, 3.0]) and 0 < res["p"] < 1


def test_bad_sides_are_refused_in_one_line(tmp_path):
    compare = _compare_module()
    _cell(tmp_path / "old", "rankalloc", 0, 0.75)
    for argv, needle in ([["old", "old:rankalloc"], "GRID:METHOD"], [["nope:rankalloc", "old:rankalloc"], "grids: old"],
                         [["old:rankalloc"], "in pairs"], [["old:rankalloc", "old:uniform"], "on both sides"]):
        with pytest.raises(SystemExit) as err:
            compare.main([*argv, "--results", str(tmp_path)])
        assert needle in str(err.value) and "\n" not in str(err.value)
