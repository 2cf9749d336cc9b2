"""benchmarks/compare.py and summarize.py: cells are paired on (task, budget, seed), and only those on both
sides count."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _benchmark_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compare_module():
    return _benchmark_module("compare")


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
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("3 pairs: mean difference +1.00 points")
    assert lines[-2] == "left out, no partner on the other side (1): new:rankalloc tweets 82,944 s7"
    _cell(tmp_path / "new", "rankalloc", 0, 0.50, budget=9216)
    _cell(tmp_path / "old", "rankalloc", 0, 0.40, budget=9216)
    assert compare.main(["new:rankalloc", "old:rankalloc", "--budget", "9216", "--results", str(tmp_path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("1 pairs: mean difference +10.00 points")  # the 82,944 cells left out
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


def test_summarize_adds_another_grids_cells_as_a_named_baseline(tmp_path, capsys):
    summarize = _benchmark_module("summarize")
    for seed, (a, b, c) in enumerate([(0.76, 0.75, 0.70), (0.74, 0.72, 0.71)]):
        _cell(tmp_path / "tight", "rankalloc", seed, a, budget=9216)
        _cell(tmp_path / "tight", "random", seed, c, budget=9216)
        _cell(tmp_path / "tight-qv", "uniform", seed, b, budget=9216)
    _cell(tmp_path / "tight-qv", "adalora", 0, 0.10, budget=9216)  # another method of that grid: left out
    for record in (tmp_path / "tight").glob("*.json"):  # what run.py records besides the score
        data = json.loads(record.read_text())
        record.write_text(json.dumps(dict(data, adapter_params=9216, macro_f1=0.5, meta={"command": "x"})))
    for record in (tmp_path / "tight-qv").glob("*.json"):
        record.write_text(json.dumps(dict(json.loads(record.read_text()), adapter_params=9216)))
    assert summarize.main(["--grid", "tight", "--with", "tight-qv:uniform=uniform q,v",
                           "--results", str(tmp_path)]) == 0
    table = (tmp_path / "tight" / "summary.md").read_text()
    assert "Δ vs random scores | Δ vs uniform q,v |" in table and "adalora" not in table
    row = next(line for line in table.splitlines() if "| rankalloc |" in line)
    assert row.rstrip(" |").endswith("+4.50 | +1.50")  # paired means over seeds 0 and 1, in points
    assert (tmp_path / "tight" / "accuracy_vs_params.png").stat().st_size > 0
    for bad, says in [(["tight-qv:uniform"], "GRID:METHOD=LABEL"), (["tight-qv:uniform=uniform"], "method name"),
                      (["tight-qv:gradient=g"], "no gradient cells"), (["tight-qv:uniform=q|v"], "'|'"),
                      (["tight-qv:uniform=qv", "tight-qv:uniform= qv "], "already used")]:
        with pytest.raises(SystemExit):
            summarize.main(["--grid", "tight", "--results", str(tmp_path)]
                           + [arg for spec in bad for arg in ("--with", spec)])
        assert says in capsys.readouterr().err


def test_summary_of_one_method_is_a_well_formed_table(tmp_path):
    """No baseline, no delta columns: every row must have as many cells as the header and its rule."""
    summarize = _benchmark_module("summarize")
    for seed in (0, 1):
        _cell(tmp_path / "solo", "rankalloc", seed, 0.75)
    for record in (tmp_path / "solo").glob("*.json"):
        record.write_text(json.dumps(dict(json.loads(record.read_text()), adapter_params=82944)))
    assert summarize.main(["--grid", "solo", "--results", str(tmp_path)]) == 0
    rows = [line for line in (tmp_path / "solo" / "summary.md").read_text().splitlines() if line.startswith("|")]
    assert len(rows) == 3
    assert {line.count("|") for line in rows} == {10}  # 9 cells


def test_forest_pairs_each_side_with_the_baseline_and_writes_plot_and_table(tmp_path):
    """Differences +1, -1, +3 (points) against uniform: mean +1.00, std 2.00, 95% t interval +1 +- 4.30 * 2 / sqrt 3."""
    forest = _benchmark_module("forest")
    for seed, (a, b) in enumerate([(0.76, 0.75), (0.74, 0.75), (0.78, 0.75)]):
        _cell(tmp_path / "g", "rankalloc", seed, a)
        _cell(tmp_path / "g", "uniform", seed, b)
    _cell(tmp_path / "g", "rankalloc", 9, 0.99)  # no partner: not counted
    out = tmp_path / "plots" / "forest.png"
    out.parent.mkdir()
    assert forest.main(["--against", "g:uniform", "g:rankalloc=the search", "--bar", "1", "--out", str(out),
                        "--results", str(tmp_path)]) == 0
    assert out.stat().st_size > 0
    row = [line for line in out.with_suffix(".md").read_text().splitlines() if line.startswith("| the search")]
    assert row == ["| the search | 3 | +1.00 | 2.00 | -3.97 to +5.97 | 0.48 | +1.00 |"]


def test_ceiling_trains_every_weight_of_the_model(tmp_path):
    """The ceiling is full fine-tuning: every parameter of the (1-block) model trains, not the head alone as
    load_model leaves it, and the cell reports the task's metrics over the evaluation examples it used."""
    ceiling = _benchmark_module("ceiling")
    record = ceiling.cell("tweets", 1e-4, 0, ("--model.num_layers", "1", "--max-steps", "2",
                                              "--data.max_train_examples", "96", "--data.max_eval_examples", "40"))
    assert record["trainable_params"] == record["model_params"] > 10_000_000  # embeddings and encoder included
    assert record["steps"] == 2 and record["eval_examples"] == 40
    assert 0.0 <= record["accuracy"] <= 1.0 and record["metric"] == "accuracy"


def test_ceiling_on_the_target_matrices_trains_those_weights_and_the_head_only(tmp_path):
    """trainable="matrices": LoRA's target matrices at full rank plus the head; embeddings, LayerNorms and
    biases stay frozen, so the count is exactly the targets' weights and the head's parameters."""
    from rankalloc.config import ModelConfig
    from rankalloc.models import load_model
    from rankalloc.targets import find_targets, head_parameters

    ceiling = _benchmark_module("ceiling")
    record = ceiling.cell("tweets", 1e-4, 0, ("--model.num_layers", "1", "--max-steps", "1",
                                              "--data.max_train_examples", "96", "--data.max_eval_examples", "40"),
                          trainable="matrices")
    model = load_model(ModelConfig(num_layers=1), num_labels=3)
    targets = find_targets(model, ModelConfig(num_layers=1))
    expected = sum(t.in_features * t.out_features for t in targets) + sum(p.numel() for p in head_parameters(model))
    assert len(targets) == 6 and record["trainable"] == "matrices"
    assert record["trainable_params"] == expected < record["model_params"]
