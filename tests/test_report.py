"""Tests for rankalloc.report: tables, figures (valid PNGs), the markdown report, atomic writes."""
from __future__ import annotations

import math

import numpy as np
import pytest

from rankalloc.targets import Target
from rankalloc.figures import plot_pareto, plot_rank_heatmap, plot_trajectory
from rankalloc.report import write_search_report
from rankalloc.tables import human_params, markdown_rank_table, rank_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KINDS = ["attention.self.query", "attention.self.value", "output.dense"]


def small_targets() -> list[Target]:
    """2 layers x 3 kinds; query/value are 8->8 (cost 16), output.dense is 8->4 (cost 12)."""
    out = []
    for layer in range(2):
        out.append(Target(f"enc.layer.{layer}.attention.self.query", 8, 8, layer, KINDS[0]))
        out.append(Target(f"enc.layer.{layer}.attention.self.value", 8, 8, layer, KINDS[1]))
        out.append(Target(f"enc.layer.{layer}.output.dense", 8, 4, layer, KINDS[2]))
    return out


SMALL_RANKS = {
    "enc.layer.0.attention.self.query": 4,
    "enc.layer.0.attention.self.value": 0,
    "enc.layer.0.output.dense": 2,
    "enc.layer.1.attention.self.query": 1,
    "enc.layer.1.attention.self.value": 3,
    "enc.layer.1.output.dense": 4,
}
# layer 0: 4*16 + 0*16 + 2*12 = 88; layer 1: 1*16 + 3*16 + 4*12 = 112; total 200
LAYER_PARAMS = {0: 88, 1: 112}
TOTAL = 200


def llama_targets() -> tuple[list[Target], dict[str, int]]:
    kinds = [("self_attn.q_proj", 4096, 4096), ("self_attn.k_proj", 4096, 1024), ("self_attn.v_proj", 4096, 1024),
             ("self_attn.o_proj", 4096, 4096), ("mlp.gate_proj", 4096, 14336), ("mlp.up_proj", 4096, 14336),
             ("mlp.down_proj", 14336, 4096)]
    rng = np.random.default_rng(0)
    targets, ranks = [], {}
    for layer in range(32):
        for kind, d_in, d_out in kinds:
            name = f"model.layers.{layer}.{kind}"
            targets.append(Target(name, d_in, d_out, layer, kind))
            ranks[name] = int(rng.integers(0, 65))
    return targets, ranks


def history(n: int = 40) -> list[dict]:
    rows = []
    for s in range(n):
        rows.append({
            "step": s,
            "cost_ratio": 2.0 * math.exp(-s / 10) + 0.98,
            "target_ratio": max(1.0, 3.0 - s / 10),
            "lam": 0.01 * s,
            "train_loss": 1.0 / (1 + s),
            "val_loss": (1.2 / (1 + s)) if s % 10 == 9 else (None if s % 2 else float("nan")),
        })
    return rows


def summary(**extra) -> dict:
    out = {
        "budget": 256, "total_params": TOTAL, "head_params": 1538, "base_model": "tiny-bert", "task": "sst2",
        "seed": 7, "steps": 40, "final_lambda": 0.39, "final_cost_ratio": 0.78125, "wall_time_s": 12.5,
        "gap": {"continuous_loss": 0.4123, "hard_loss": 0.4301, "gap": 0.0178},
        "command": "rankalloc search --budget 256 --model tiny-bert --task sst2 --seed 7",
    }
    out.update(extra)
    return out


def assert_png(path, min_side: int = 100) -> None:
    import matplotlib.image as mpimg

    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] >= min_side and img.shape[1] >= min_side
    assert float(np.std(img)) > 0.01  # not a blank canvas


def no_temp_files(folder) -> bool:
    return not [p for p in folder.iterdir() if ".tmp" in p.name]


# ------------------------------------------------------------------------------------------ tables

def test_rank_table_shape_and_order():
    kinds, layers, m = rank_table(small_targets(), SMALL_RANKS)
    assert kinds == KINDS
    assert layers == [0, 1]
    np.testing.assert_array_equal(m, [[4, 0, 2], [1, 3, 4]])


def test_rank_table_nan_for_missing_kind_and_other_row():
    targets = small_targets()[:-1]  # layer 1 has no output.dense
    targets.append(Target("pooler.dense", 8, 8, None, "pooler.dense"))
    targets.insert(0, Target("enc.layer.5.attention.self.query", 8, 8, 5, KINDS[0]))  # out of order
    ranks = dict(SMALL_RANKS, **{"pooler.dense": 6, "enc.layer.5.attention.self.query": 9})
    kinds, layers, m = rank_table(targets, ranks)
    assert kinds == KINDS + ["pooler.dense"]
    assert layers == [0, 1, 5, None]
    assert m.shape == (4, 4)
    assert np.isnan(m[1, 2])  # layer 1, output.dense
    assert m[3, 3] == 6 and np.isnan(m[3, :3]).all()
    assert m[2, 0] == 9 and np.isnan(m[2, 1:]).all()
    table = markdown_rank_table(targets, ranks)
    assert "| other |" in table
    assert "–" in table


def test_markdown_rank_table_sums():
    table = markdown_rank_table(small_targets(), SMALL_RANKS)
    lines = table.strip().splitlines()
    assert lines[0].startswith("| layer |") and lines[0].rstrip().endswith("| params |")
    for k in KINDS:
        assert k in lines[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:]}
    assert rows["0"] == ["0", "4", "0", "2", str(LAYER_PARAMS[0])]
    assert rows["1"] == ["1", "1", "3", "4", str(LAYER_PARAMS[1])]
    assert rows["**total**"] == ["**total**", "5", "3", "6", f"**{TOTAL}**"]


@pytest.mark.parametrize("n, text", [
    (0, "0"), (832, "832"), (999, "999"), (1000, "1k"), (41_000, "41k"), (41_472, "41.5k"),
    (99_000, "99k"), (330_000, "0.33M"), (500_000, "0.50M"), (1_250_000, "1.25M"), (12_345_678, "12.3M"),
    (7_000_000_000, "7.00B"), (-41_472, "-41.5k"), (41_472.0, "41.5k"),
])
def test_human_params(n, text):
    assert human_params(n) == text


# ----------------------------------------------------------------------------------------- figures

def test_heatmap_small_and_single_cell(tmp_path):
    plot_rank_heatmap(tmp_path / "small.png", small_targets(), SMALL_RANKS, "small")
    assert_png(tmp_path / "small.png")
    one = [Target("blocks.0.fc", 8, 8, 0, "fc")]
    plot_rank_heatmap(tmp_path / "one.png", one, {"blocks.0.fc": 3}, "one")
    assert_png(tmp_path / "one.png")
    plot_rank_heatmap(tmp_path / "zeros.png", one, {"blocks.0.fc": 0}, "all zero")
    assert_png(tmp_path / "zeros.png")
    assert no_temp_files(tmp_path)


def test_heatmap_llama_like(tmp_path):
    targets, ranks = llama_targets()
    kinds, layers, m = rank_table(targets, ranks)
    assert len(kinds) == 7 and len(layers) == 32 and not np.isnan(m).any()
    plot_rank_heatmap(tmp_path / "llama.png", targets, ranks, "32 x 7")
    assert_png(tmp_path / "llama.png", min_side=300)


def test_trajectory_with_missing_val_loss(tmp_path):
    plot_trajectory(tmp_path / "t.png", history())
    assert_png(tmp_path / "t.png")
    rows = [{"step": 0, "cost_ratio": 1.5, "target_ratio": 2.0, "lam": 0.0, "train_loss": 0.7, "val_loss": None}]
    plot_trajectory(tmp_path / "t1.png", rows)  # no held-out point at all
    assert_png(tmp_path / "t1.png")
    plot_trajectory(tmp_path / "t0.png", [])
    assert_png(tmp_path / "t0.png")


def test_pareto_two_methods(tmp_path):
    points = [
        {"method": "rankalloc", "params": 41_472, "score": 0.90, "score_std": 0.01},
        {"method": "rankalloc", "params": 10_368, "score": 0.87, "score_std": 0.02},
        {"method": "rankalloc", "params": 330_000, "score": 0.91, "score_std": 0.005},
        {"method": "uniform", "params": 331_776, "score": 0.905},
        {"method": "uniform", "params": 41_472, "score": 0.88},
    ]
    plot_pareto(tmp_path / "pareto.png", points)
    assert_png(tmp_path / "pareto.png")
    # narrow span: linear axis
    plot_pareto(tmp_path / "narrow.png", [dict(p, params=p["params"] // 10 + 40_000) for p in points])
    assert_png(tmp_path / "narrow.png")


def test_pareto_rings_the_front_and_joins_only_it(tmp_path, monkeypatch):
    """A sweep's dominated trial is a plain marker: the dashed staircase runs through the front only."""
    import rankalloc.figures as figures

    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda path, fig, dpi=None: drawn.append(fig))
    trials = [{"method": "rankalloc", "params": 41_000, "score": 0.80, "front": True},
              {"method": "rankalloc", "params": 80_000, "score": 0.78, "front": False},  # dominated
              {"method": "rankalloc", "params": 160_000, "score": 0.83, "front": True}]
    plot_pareto(tmp_path / "pareto.png", trials)
    ax = drawn[0].axes[0]
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and 80_000 not in list(dashed[0].get_xdata())
    assert sorted(dashed[0].get_xdata()) == [41_000, 160_000]
    assert all(line.get_linestyle() in ("None", "none", "--") for line in ax.get_lines())  # no line through all
    assert "Pareto front" in [t.get_text() for t in ax.get_legend().get_texts()]
    plot_pareto(tmp_path / "plain.png", [{k: v for k, v in p.items() if k != "front"} for p in trials])
    plain = drawn[1].axes[0]
    assert not [line for line in plain.get_lines() if line.get_linestyle() == "--"]
    assert "Pareto front" not in [t.get_text() for t in plain.get_legend().get_texts()]


def test_pareto_one_panel_per_task(tmp_path):
    import matplotlib.image as mpimg

    points = [{"method": m, "panel": task, "params": b, "score": 0.7 + 0.01 * i}
              for i, (task, m, b) in enumerate((t, m, b) for t in ("tweets", "movie-reviews", "multiemo-en")
                                                for m in ("rankalloc", "uniform") for b in (41_472, 331_776))]
    plot_pareto(tmp_path / "panels.png", points, title="three tasks", metric="accuracy")
    plot_pareto(tmp_path / "one.png", [dict(p, panel="") for p in points if p["panel"] == "tweets"])
    assert_png(tmp_path / "panels.png")
    panels, one = mpimg.imread(tmp_path / "panels.png"), mpimg.imread(tmp_path / "one.png")
    assert panels.shape[1] > 1.7 * one.shape[1]  # three panels side by side, not one crowded axis


# ------------------------------------------------------------------------------------------ report

def test_write_search_report(tmp_path):
    targets = small_targets()
    r_max = {t.name: 4 for t in targets}
    write_search_report(tmp_path / "out", targets=targets, ranks=SMALL_RANKS, r_max=r_max, history=history(),
                        summary=summary(lr=3e-4, schedule={"warmup": 5}, warmup_steps=2))
    out = tmp_path / "out"
    assert_png(out / "ranks.png")
    assert_png(out / "trajectory.png")
    md = (out / "report.md").read_text()
    assert md.startswith("# ")
    assert summary()["command"] in md
    assert f"| steps | {summary()['steps']} (the first 2 without gate steps) |" in md  # a --max-steps run shrinks it
    assert markdown_rank_table(targets, SMALL_RANKS).strip() in md
    assert f"| 0 | 4 | 0 | 2 | {LAYER_PARAMS[0]} |" in md
    assert f"| 1 | 1 | 3 | 4 | {LAYER_PARAMS[1]} |" in md
    assert f"**{TOTAL}**" in md
    assert "78.1% of budget" in md
    assert "| head params (not counted) | 1,538" in md
    for section in ("## Summary", "## Discretisation gap", "## Ranks", "## Search trajectory", "## Rank statistics"):
        assert section in md
    assert "0.4123" in md and "0.4301" in md and "+0.0178" in md
    assert "![ranks](ranks.png)" in md and "![trajectory](trajectory.png)" in md
    assert "min 0 / median 2.5 / max 4" in md
    assert "1 at rank 0" in md and "2 at their cap" in md
    assert "`lr`: 0.0003" in md and '"warmup": 5' in md
    assert no_temp_files(out)


def test_report_tolerates_missing_summary_values(tmp_path):
    s = summary(gap={"continuous_loss": None, "hard_loss": None, "gap": None}, head_params=None, wall_time_s=None)
    write_search_report(tmp_path, targets=small_targets(), ranks=SMALL_RANKS, r_max={}, history=[], summary=s)
    md = (tmp_path / "report.md").read_text()
    assert "n/a" in md and "could not be measured" in md


# --------------------------------------------------------------------------------------- atomicity

def test_failed_figure_write_keeps_old_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    path = tmp_path / "ranks.png"
    plot_rank_heatmap(path, small_targets(), SMALL_RANKS, "original")
    before = path.read_bytes()

    def half_write_then_fail(self, fname, *args, **kwargs):
        with open(fname, "wb") as fh:
            fh.write(PNG_MAGIC + b"half a picture")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", half_write_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_rank_heatmap(path, small_targets(), {n: 1 for n in SMALL_RANKS}, "changed")
    assert path.read_bytes() == before
    assert no_temp_files(tmp_path)

    # the whole report: a failed figure write happens before report.md is touched
    (tmp_path / "report.md").write_text("old report\n")
    with pytest.raises(RuntimeError):
        write_search_report(tmp_path, targets=small_targets(), ranks=SMALL_RANKS, r_max={}, history=history(),
                            summary=summary())
    assert path.read_bytes() == before
    assert (tmp_path / "report.md").read_text() == "old report\n"
    assert no_temp_files(tmp_path)
