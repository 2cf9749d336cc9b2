"""The bilevel search: gradient isolation of the steps, and tiny end-to-end searches on three architectures."""
from __future__ import annotations

import copy
import subprocess
import sys
import json

import pytest
import torch

from rankalloc.adapters import GatedModel
from rankalloc.budget import parse_budget
from rankalloc.config import DataConfig, ModelConfig, SearchConfig, SearchParams
from rankalloc.errors import BudgetError, ConfigError
from rankalloc.lagrangian import Lagrangian
from rankalloc.targets import find_targets
from rankalloc.rank_map import RankMap
from rankalloc.search import cost_target, gate_step, run_search, weight_step


def tiny_config(tmp_path, model: ModelConfig, budget: str, steps: int = 8, **search) -> SearchConfig:
    return SearchConfig(
        budget=budget, seed=0, device="cpu", out=str(tmp_path / "run"),
        model=model,
        data=DataConfig(task="tweets", max_length=24, max_train_examples=160, max_eval_examples=32,
                        batch_size=16, eval_batch_size=32),
        search=SearchParams(steps=steps, warmup_steps=2, log_every=4, checkpoint_every=4, gap_batches=2,
                            **search))


def _batch(labels):
    g = torch.Generator().manual_seed(len(labels))
    n = len(labels)
    return {"input_ids": torch.randint(1000, 2000, (n, 8), generator=g),
            "attention_mask": torch.ones(n, 8, dtype=torch.long), "labels": torch.tensor(labels)}


def test_each_step_moves_only_its_own_parameters(minilm_1layer):
    cfg, model = minilm_1layer
    model = copy.deepcopy(model)
    targets = find_targets(model, cfg)
    gated = GatedModel(model, targets, {t.name: 4 for t in targets}, scale=2.0)
    w_opt = torch.optim.AdamW(gated.weight_parameters(), lr=1e-2)
    g_opt = torch.optim.Adam(gated.gate_parameters(), lr=1e-2)
    train_batch, held_out_batch = _batch([0, 1, 2, 0]), _batch([2, 2, 1])

    gates_before = [p.detach().clone() for p in gated.gate_parameters()]
    weight_step(gated, train_batch, w_opt)
    assert all(p.grad is None for p in gated.gate_parameters())  # no gradient from the training batch
    assert all(torch.equal(a, b) for a, b in zip(gates_before, gated.gate_parameters()))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gated.adapter_parameters())

    w_opt.zero_grad(set_to_none=True)
    weights_before = [p.detach().clone() for p in gated.weight_parameters()]
    gate_step(gated, held_out_batch, g_opt, Lagrangian(10_000, 0.1, 1.0, lam=0.3), target=10_000)
    assert all(p.grad is None for p in gated.weight_parameters())  # no gradient from the held-out batch
    assert all(torch.equal(a, b) for a, b in zip(weights_before, gated.weight_parameters()))
    assert all(p.grad is not None for p in gated.gate_parameters())
    assert all(p.requires_grad for p in gated.weight_parameters() + gated.gate_parameters())  # restored


def test_cost_target_schedule():
    assert cost_target(0, 1000, 400, start=10, ramp=20) == 1000
    assert cost_target(20, 1000, 400, start=10, ramp=20) == pytest.approx(700)
    assert cost_target(30, 1000, 400, start=10, ramp=20) == 400
    assert cost_target(99, 1000, 400, start=10, ramp=0) == 400


def _check_run(out, budget):
    rm = RankMap.load(out / "rank_map.json")
    assert 0.99 * budget <= rm.total_params <= budget
    for name in ("adapter_config.json", "report.md", "ranks.png", "trajectory.png", "scores.json",
                 "history.json", "checkpoint.pt", "summary.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "status.json").read_text())["state"] == "done"
    report = (out / "report.md").read_text()
    assert "Discretisation gap" in report
    return rm


def test_tiny_search_on_a_minilm_slice(tmp_path):
    cfg = tiny_config(tmp_path, ModelConfig(num_layers=2), budget="20k", r_max=8)
    result = run_search(cfg, command="test")
    rm = _check_run(result.out, 20_000)
    assert len(rm.modules) == 12
    assert rm.search["steps"] == 8
    assert rm.search["data"]["task"] == "tweets" and rm.search["data"]["text_column"] == "text"  # for the retrain
    assert all(0 <= r <= 8 for r in rm.ranks.values())
    assert set(result.gap) >= {"continuous_loss", "hard_loss", "gap"}
    assert len(result.history) == 8 and all(row["lam"] >= 0 for row in result.history)
    summary = json.loads((result.out / "summary.json").read_text())
    assert summary["total_params"] == rm.total_params and summary["peak_memory_mb"]["cpu_rss"] > 100
    assert summary["warmup_steps"] == 2 and "| steps | 8 (the first 2 without gate steps) |" in \
        (result.out / "report.md").read_text()


def test_tiny_search_on_random_gpt2(tmp_path, tiny_gpt2):
    cfg = tiny_config(tmp_path, ModelConfig(name=tiny_gpt2), budget="2000", r_max=4)
    out = run_search(cfg, command="test").out
    rm = _check_run(out, 2000)
    assert any(name.endswith("attn.c_attn") for name in rm.modules)
    # GPT-2's Conv1D keeps its weight as (in, out): the peft config says so, so peft need not correct it
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    from rankalloc.config import ExportConfig
    from rankalloc.export import run_export

    exported, _ = run_export(ExportConfig(run=str(out), budget="1500"))
    assert json.loads((exported / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    for folder in (out, exported):  # the map alone builds what its adapter_config.json builds (head included)
        written = json.loads((folder / "adapter_config.json").read_text())
        from_map = RankMap.load(folder / "rank_map.json").lora_config()
        assert from_map["modules_to_save"] == written["modules_to_save"] == ["score"]
        assert from_map["fan_in_fan_out"] is True and from_map["task_type"] == written["task_type"] == "SEQ_CLS"
        assert from_map["alpha_pattern"] == written["alpha_pattern"] and from_map["lora_alpha"] == written["lora_alpha"]


def test_tiny_search_on_random_llama(tmp_path, tiny_llama):
    cfg = tiny_config(tmp_path, ModelConfig(name=tiny_llama), budget="1500", r_max=4)
    out = run_search(cfg, command="test").out
    rm = _check_run(out, 1500)
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    assert any(name.endswith("mlp.gate_proj") for name in rm.modules)


def test_divergence_stops_with_one_line_naming_step_and_checkpoint(tmp_path):
    from rankalloc.errors import DivergenceError

    cfg = tiny_config(tmp_path, ModelConfig(num_layers=1), budget="5k", steps=12, r_max=4, weight_lr=1e30)
    cfg.search.checkpoint_every = 1
    with pytest.raises(DivergenceError) as err:
        run_search(cfg, command="test")
    message = str(err.value)
    assert "\n" not in message and "at step" in message and "checkpoint" in message
    out = tmp_path / "run"
    assert json.loads((out / "status.json").read_text())["state"] == "failed"
    assert not (out / "rank_map.json").exists()  # never export from a diverged state


def test_projecting_during_the_ramp_keeps_the_cost_on_its_target(tmp_path):
    cfg = tiny_config(tmp_path, ModelConfig(num_layers=1), budget="20k", steps=10, r_max=8, project_ramp=True,
                      budget_warmup=0.5)
    history = run_search(cfg, command="test").history
    gated_rows = [row for row in history if row["val_loss"] is not None]
    assert len(gated_rows) == 8 and gated_rows[0]["target_ratio"] > 1.5  # the ramp starts well above B ...
    assert all(abs(row["cost_ratio"] - row["target_ratio"]) < 1e-3 for row in gated_rows)  # ... C follows it


def test_without_the_lagrangian_at_the_budget_the_gates_follow_the_held_out_loss_alone(tmp_path, monkeypatch):
    """10 steps, gates from step 2, the target reaches B at step 7: the 5 ramp gate steps are priced, the 3
    at the budget are not, the projection holds C = B there, and the gate moments restart at step 7."""
    priced = []
    term = Lagrangian.term
    monkeypatch.setattr(Lagrangian, "term", lambda self, cost, target: priced.append(target) or term(self, cost, target))
    cfg = tiny_config(tmp_path, ModelConfig(num_layers=1), budget="20k", steps=10, r_max=8, budget_warmup=0.5,
                      lagrangian_at_budget=False)
    history = run_search(cfg, command="test").history
    at_budget = [row for row in history if row["val_loss"] is not None and row["target_ratio"] == 1.0]
    assert len(at_budget) == 3 and all(abs(row["cost_ratio"] - 1.0) < 1e-3 for row in at_budget)
    budget = float(parse_budget("20k").value)
    assert len(priced) == 5 and all(t > budget for t in priced)
    gate_moments = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["gate_opt"]["state"]
    assert {int(s["step"]) for s in gate_moments.values()} == {3}  # restarted at the first step at B
    assert "held-out loss alone" in (tmp_path / "run" / "report.md").read_text()


def test_without_the_lagrangian_the_projection_is_required():
    with pytest.raises(ConfigError, match="lagrangian_at_budget false needs --search.project_cost true"):
        SearchParams(lagrangian_at_budget=False, project_cost=False).validate()


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tmp_path, tiny_gpt2):
    from rankalloc.config import ExportConfig
    from rankalloc.errors import RunDirError
    from rankalloc.export import run_export
    from rankalloc.rundir import open_run

    mine = tmp_path / "my-experiments"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(RunDirError, match="not a rankalloc run folder; it is left as it is"):
        open_run(mine, overwrite=True, resume=False)
    run = run_search(tiny_config(tmp_path, ModelConfig(name=tiny_gpt2), budget="2000", steps=4, r_max=4),
                     command="test").out
    with pytest.raises(RunDirError, match="not a rankalloc run folder"):
        run_export(ExportConfig(run=str(run), budget="1500", out=str(mine), overwrite=True))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]  # not even a lock file left behind
    (mine / "rank_map.json").write_text("a map of my own")  # an export's file name does not make it an export
    with pytest.raises(RunDirError, match="not a rankalloc run folder"):
        run_export(ExportConfig(run=str(run), budget="1500", out=str(mine), overwrite=True))
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "rank_map.json"]
    (mine / "rank_map.json").unlink()
    with pytest.raises(RunDirError, match="holds the search run"):  # would delete scores.json and checkpoint.pt
        run_export(ExportConfig(run=str(run), budget="1500", out=str(run), overwrite=True))
    assert (run / "scores.json").is_file()
    first, _ = run_export(ExportConfig(run=str(run), budget="1500", out=str(tmp_path / "e")))
    again, rm = run_export(ExportConfig(run=str(run), budget="1800", out=str(tmp_path / "e"), overwrite=True))
    assert first == again and rm.budget == 1800  # a previous export is replaced
    open_run(run, overwrite=True, resume=False)  # a run folder is set aside for --overwrite, not deleted
    assert not (run / "scores.json").exists() and (tmp_path / "run.replaced" / "scores.json").is_file()


def test_an_export_killed_midway_can_be_overwritten(tmp_path, tiny_gpt2, monkeypatch):
    from rankalloc import io
    from rankalloc.config import ExportConfig
    from rankalloc.export import run_export

    run = run_search(tiny_config(tmp_path, ModelConfig(name=tiny_gpt2), budget="2000", steps=4, r_max=4),
                     command="test").out
    out = tmp_path / "export"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "write_text", killed)  # killed after the heatmap, before any other file
    with pytest.raises(KeyboardInterrupt):
        run_export(ExportConfig(run=str(run), budget="1500", out=str(out)))
    monkeypatch.undo()
    assert (out / "ranks.png").is_file() and not (out / "export.md").exists()
    run_export(ExportConfig(run=str(run), budget="1500", out=str(out), overwrite=True))
    assert json.loads((out / "rank_map.json").read_text())["total_params"] <= 1500
    with pytest.raises(BudgetError, match=r"\(search again with a larger --search.r_max\)$"):
        run_export(ExportConfig(run=str(run), budget="20k", out=str(tmp_path / "big")))
    with pytest.raises(BudgetError, match=r"\(raise --max-rank, or search again"):
        run_export(ExportConfig(run=str(run), budget="20k", max_rank=1, out=str(tmp_path / "big")))
    with pytest.raises(BudgetError, match=r"exceeds every module at full rank \(32,768\); allowed: 64 to 32,768$"):
        run_export(ExportConfig(run=str(run), budget="1M", out=str(tmp_path / "big")))  # no r_max reaches it


def test_an_export_folder_held_by_another_process_is_refused(tmp_path, tiny_gpt2):
    """Two exports (or an export and a run) never write one folder together: the second is refused in one
    line, with or without --overwrite, and the first one's files stay as they are."""
    from rankalloc.config import ExportConfig
    from rankalloc.errors import RunDirError
    from rankalloc.export import run_export

    run = run_search(tiny_config(tmp_path, ModelConfig(name=tiny_gpt2), budget="2000", steps=4, r_max=4),
                     command="test").out
    out = tmp_path / "export"
    run_export(ExportConfig(run=str(run), budget="1500", out=str(out)))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".rankalloc.lock"}
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from rankalloc import rundir; rundir.hold_writable(Path(sys.argv[1])); "
                               "print('held', flush=True); time.sleep(60)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for overwrite in (False, True):
            with pytest.raises(RunDirError, match=rf"--out .* is in use by a running process \(pid {holder.pid} "):
                run_export(ExportConfig(run=str(run), budget="1800", out=str(out), overwrite=overwrite))
    finally:
        holder.kill()
        holder.wait()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".rankalloc.lock"} == before
    assert not (tmp_path / "export.replaced").exists()
    _, rm = run_export(ExportConfig(run=str(run), budget="1800", out=str(out), overwrite=True))  # free again
    assert rm.budget == 1800 and json.loads((out / "rank_map.json").read_text())["budget"] == 1800


def test_overwrite_keeps_the_previous_run_until_its_replacement_finishes(tmp_path, tiny_gpt2, monkeypatch):
    """--overwrite moves the old run to OUT.replaced; a replacement that dies leaves it there, and only a
    replacement that finishes deletes it.  A failed re-export puts the previous export back."""
    from rankalloc import rank_map
    from rankalloc.config import ExportConfig
    from rankalloc.export import run_export
    from rankalloc.rundir import read_status

    cfg = tiny_config(tmp_path, ModelConfig(name=tiny_gpt2), budget="2000", steps=4, r_max=4)
    run = run_search(cfg, command="test").out
    first = (run / "rank_map.json").read_text()
    aside = tmp_path / "run.replaced"

    class Killed(Exception):
        pass

    def die_at_step_3(row):
        if row["step"] >= 3:
            raise Killed("killed")

    again = copy.deepcopy(cfg)
    again.overwrite = True
    with pytest.raises(Killed):
        run_search(again, command="test", on_step=die_at_step_3)
    assert read_status(run)["state"] == "failed"
    assert (aside / "rank_map.json").read_text() == first and read_status(aside)["state"] == "done"
    with pytest.raises(Killed):  # a second failed try keeps the finished run, not the failed one
        run_search(again, command="test", on_step=die_at_step_3)
    assert (aside / "rank_map.json").read_text() == first
    run_search(again, command="test")
    assert read_status(run)["state"] == "done" and (run / "rank_map.json").is_file() and not aside.exists()

    export = tmp_path / "export"
    run_export(ExportConfig(run=str(run), budget="1500", out=str(export)))
    before = {p.name: p.read_bytes() for p in export.iterdir()}
    export.rename(tmp_path / "export.replaced")  # a re-export killed half-way: the whole one set aside ...
    export.mkdir()
    (export / ".rankalloc_export").touch()  # ... and a partial one in its place (the marker is written first)
    (export / "export.md").write_text("partial")

    def broken_save(self, path):
        raise OSError("disk full")

    monkeypatch.setattr(rank_map.RankMap, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        run_export(ExportConfig(run=str(run), budget="1800", out=str(export), overwrite=True))
    assert {p.name: p.read_bytes() for p in export.iterdir()} == before  # the previous export, whole
    assert not (tmp_path / "export.replaced").exists()


def test_overwrite_refuses_a_symlink_and_keeps_a_backup_it_did_not_make(tmp_path):
    from rankalloc.errors import RunDirError
    from rankalloc.rundir import finish_run, open_run, set_status

    run = tmp_path / "run"
    run.mkdir()
    set_status(run, "done")
    link = tmp_path / "link"
    link.symlink_to(run)
    with pytest.raises(RunDirError, match="is a symbolic link; give the folder it points to"):
        open_run(link, overwrite=True, resume=False)
    assert (run / "status.json").is_file()
    earlier = tmp_path / "run.replaced"  # set aside by an earlier process whose replacement was then resumed
    earlier.mkdir()
    set_status(earlier, "done")
    finish_run(run)
    assert (earlier / "status.json").is_file()


def test_damaged_scores_and_an_out_under_a_file_are_one_line_errors(tmp_path):
    from rankalloc.config import ExportConfig
    from rankalloc.errors import RunDirError
    from rankalloc.export import run_export
    from rankalloc.rundir import open_run

    run = tmp_path / "search"
    run.mkdir()
    module = {"name": "a", "in_features": 4, "out_features": 4, "layer": 0, "kind": "query", "r_max": 2,
              "scores": [0.5, 0.25]}
    good = {"format": "rankalloc.scores", "version": 1, "modules": [module], "base_params": 100,
            "searched_budget": 8, "scale": 2, "base_model": "m"}
    for damaged, fragment in [("[1, 2]", "has format None"), ('{"format": "rankalloc.scores", "version": 1}',
                                                                 "damaged \\(no modules, base_params"),
                              ('{"format": "rankalloc.scores", "version": 1, "modules": [{"name": "a"}], '
                               '"base_params": 1, "searched_budget": 1, "scale": 2, "base_model": "m"}',
                               "damaged \\(KeyError"),
                              ('{"format": "rankalloc.scores", "version": 1, "modules": [], "base_params": 1, '
                               '"searched_budget": 1, "scale": 2, "base_model": "m"}', "modules must be a non-empty"),
                              ('{"format": "rankalloc.scores", "version": 1, "modules": [{"name": "a"}], '
                               '"base_params": 1, "searched_budget": 1, "scale": "2", "base_model": "m"}',
                               "scale must be a number"),
                              ('{"format": "rankalloc.scores", "version": 1, "modules": [{"name": "a"}], '
                               '"base_params": 1, "searched_budget": 1, "scale": 2, "base_model": null}',
                               "base_model must name the model"),
                              (b"\xff\xfe\x00binary", "is not valid JSON")] + [
            (json.dumps(dict(good, **change)), fragment) for change, fragment in [
                ({"scale": -1}, "peft.scale must be a positive finite number, got -1"),
                ({"modules_to_save": "classifier"}, "peft.modules_to_save must be a list"),
                ({"fan_in_fan_out": "no"}, "peft.fan_in_fan_out must be true or false"),
                ({"peft_task_type": 5}, "peft.task_type must be one of SEQ_CLS"),
                ({"search": {"rounding": "foo"}}, "search.rounding must be one of knapsack, probability, got 'foo'"),
                ({"modules": [dict(module, name=5)]}, "every module needs a name, got 5"),
                ({"modules": [module, module]}, "module 'a' appears twice"),
                ({"modules": [dict(module, scores=[0.5, float("nan")])]}, "'a' scores must be a list of r_max = 2 "
                                                                          "finite numbers"),
                ({"modules": [dict(module, scores=[0.5])]}, "'a' scores must be a list of r_max = 2")]]:
        if isinstance(damaged, bytes):
            (run / "scores.json").write_bytes(damaged)
        else:
            (run / "scores.json").write_text(damaged)
        with pytest.raises(RunDirError, match=fragment):
            run_export(ExportConfig(run=str(run), budget="1k"))
    (run / "status.json").write_text("[1]")  # a status file that is not a mapping: read as unknown
    with pytest.raises(RunDirError, match="not empty and holds no resumable run"):
        open_run(run, overwrite=False, resume=False)
    a_file = tmp_path / "data.csv"
    a_file.write_text("text,label\n")
    with pytest.raises(RunDirError, match=r"data.csv is a file, not a folder"):
        open_run(a_file / "run", overwrite=False, resume=False)


class _Killed(BaseException):
    pass


def _killed_at(step: int):
    def on_step(row):
        if row["step"] == step:
            raise _Killed
    return on_step


def test_resume_refuses_another_run_length(tmp_path):
    """The budget ramp and the temperature schedule are fractions of the run's length: resuming a
    --max-steps 6 run as an 8-step one would make the cost target jump back above the budget."""
    from rankalloc.errors import RunDirError

    short = tiny_config(tmp_path, ModelConfig(num_layers=1), budget="5k", steps=8, r_max=4)
    short.max_steps = 6
    with pytest.raises(_Killed):  # after its checkpoint at step 4
        run_search(short, command="test", on_step=_killed_at(5))
    longer = tiny_config(tmp_path, ModelConfig(num_layers=1), budget="5k", steps=8, r_max=4)
    longer.resume = True
    with pytest.raises(RunDirError, match="started for 6 steps, this one asks for 8; give the same --max-steps"):
        run_search(longer, command="test")


def test_resume_refuses_a_run_whose_targets_differ_in_one_line(tmp_path):
    """A run started by a rankalloc whose targeting rules differ (fused expert weights, routers) adapted other
    modules than this one finds: resuming it would mix the two."""
    from rankalloc.errors import RunDirError

    with pytest.raises(_Killed):  # after its checkpoint at step 4
        run_search(tiny_config(tmp_path, ModelConfig(num_layers=1), budget="5k", steps=8, r_max=4), command="test",
                   on_step=_killed_at(5))
    path = tmp_path / "run" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=False)
    older = "bert.encoder.layer.0.output.dense"
    for part in ("lora_A", "lora_B", "log_alpha"):
        del ckpt["adapters"][f"{older}.{part}"]
    torch.save(ckpt, path)
    again = tiny_config(tmp_path, ModelConfig(num_layers=1), budget="5k", steps=8, r_max=4)
    again.resume = True
    with pytest.raises(RunDirError, match=f"adapted other targets than this rankalloc finds on the model "
                                          rf"\(e.g. {older}\); the targeting rules changed"):
        run_search(again, command="test")


def test_resume_compares_budgets_by_value_not_by_spelling(tmp_path):
    from rankalloc.errors import RunDirError

    with pytest.raises(_Killed):  # after its checkpoint at step 4
        run_search(tiny_config(tmp_path, ModelConfig(num_layers=1), budget="5k", steps=8, r_max=4), command="test",
                   on_step=_killed_at(5))
    other = tiny_config(tmp_path, ModelConfig(num_layers=1), budget="6k", steps=8, r_max=4)
    other.resume = True
    with pytest.raises(RunDirError, match="started with --budget 5k, not 6k"):
        run_search(other, command="test")
    same = tiny_config(tmp_path, ModelConfig(num_layers=1), budget="5000", steps=8, r_max=4)
    same.resume = True
    assert run_search(same, command="test").out == tmp_path / "run"  # 5k and 5000: the same run
    with pytest.raises(RunDirError, match="holds a finished run, nothing to resume"):  # and it is finished now
        run_search(same, command="test")


def test_a_short_run_still_moves_its_gates_and_reaches_the_budget(tmp_path):
    """--max-steps 8 of a 30-step search: the warm-up shrinks from 5 to 1 step, so there are gate steps,
    and the cost target reaches the budget (B at step 1 + 3) before the end."""
    cfg = tiny_config(tmp_path, ModelConfig(num_layers=1), budget="5k", steps=30, r_max=4)
    cfg.search.warmup_steps, cfg.max_steps = 5, 8
    assert cfg.warmup_steps() == 1
    history = run_search(cfg, command="test").history
    assert len(history) == 8 and history[-1]["target_ratio"] == pytest.approx(1.0)


@pytest.mark.parametrize("warmup, steps", [(30, 30), (20, 30)])
def test_a_warmup_that_leaves_no_gate_step_at_the_budget_is_refused(warmup, steps):
    from rankalloc.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--search.warmup_steps \d+ plus the budget ramp .* allowed: "
                                          r"warmup_steps 0 to 17"):
        SearchParams(steps=steps, warmup_steps=warmup).validate()


def test_discretisation_gap_compares_the_sampled_objective_with_the_hard_map(minilm_1layer):
    """The relaxed side of the gap is the loss under sampled gates (what the search optimised): with
    every gate open it equals the full-rank hard map; at P(keep) = 0.25 it is neither the adapter
    switched off nor the hard map; and measuring it leaves the search's RNG stream as it was."""
    from types import SimpleNamespace

    from rankalloc.data import Split
    from rankalloc.search import discretisation_gap

    cfg, model = minilm_1layer
    model = copy.deepcopy(model)
    targets = find_targets(model, cfg)
    gated = GatedModel(model, targets, {t.name: 4 for t in targets}, scale=2.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in gated.weight_parameters():  # adapters and head: the adapter moves the loss visibly
            p.normal_(0, 1.0)
    labels = [0, 1, 2, 0, 1, 2, 1, 0]
    task = SimpleNamespace(gate=Split(_batch(labels)))
    full = {t.name: 4 for t in targets}

    def gap(ranks):
        return discretisation_gap(gated, task, ranks, examples=8, batch_size=4, device=torch.device("cpu"))

    with torch.no_grad():
        for p in gated.gate_parameters():
            p.fill_(12.0)  # every gate open: samples are exactly 1
    assert gap(full)["gap"] == pytest.approx(0.0, abs=1e-6)

    with torch.no_grad():
        for layer in gated.layers.values():
            layer.gates.log_alpha.fill_(layer.gates._log_alpha_for(0.25))
    state = torch.get_rng_state()
    g = gap(full)
    assert torch.equal(torch.get_rng_state(), state)
    assert g == gap(full)  # a fixed seed: the same figure every time
    from rankalloc.training import evaluate
    batches = [task.gate.batch(torch.arange(0, 4).numpy()), task.gate.batch(torch.arange(4, 8).numpy())]
    with torch.no_grad():  # the adapter switched off: B = 0 in every layer
        lora_b = [layer.lora_B.detach().clone() for layer in gated.layers.values()]
        for layer in gated.layers.values():
            layer.lora_B.zero_()
        off = evaluate(gated, batches, torch.device("cpu"))["loss"]
        for layer, b in zip(gated.layers.values(), lora_b):
            layer.lora_B.copy_(b)
    with gated.gate_mode("expected"):  # the L0 paper's test-time gates: about 0.007 at P(keep) = 0.25
        l0_estimate = evaluate(gated, batches, torch.device("cpu"))["loss"]
    assert abs(g["continuous_loss"] - off) > 2 * abs(l0_estimate - off)  # not the adapter (nearly) switched off
    assert abs(g["continuous_loss"] - g["hard_loss"]) > 1e-2


# --------------------------------------------------------------------------------------------------
# Run folders: from a review of crash safety and resume
# --------------------------------------------------------------------------------------------------
def test_overwrite_refuses_another_stage_s_run_and_a_status_file_rankalloc_did_not_write(tmp_path, tiny_gpt2):
    from rankalloc.config import ExportConfig
    from rankalloc.errors import RunDirError
    from rankalloc.export import run_export
    from rankalloc.rundir import open_run

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "status.json").write_text('{"build": "ok"}')
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(RunDirError, match="not a rankalloc run folder; it is left as it is"):
        open_run(mine, overwrite=True, resume=False)
    assert (mine / "thesis.tex").read_text() == "precious"
    first = run_search(tiny_config(tmp_path, ModelConfig(name=tiny_gpt2), budget="2000", steps=4, r_max=4),
                       command="test").out
    other = tiny_config(tmp_path, ModelConfig(name=tiny_gpt2), budget="2000", steps=4, r_max=4)
    other.out = str(tmp_path / "other")
    second = run_search(other, command="test").out
    with pytest.raises(RunDirError, match="holds a search or retrain run, not an export"):
        run_export(ExportConfig(run=str(first), budget="1500", out=str(second), overwrite=True))
    assert (second / "scores.json").is_file() and (second / "checkpoint.pt").is_file()


def test_a_damaged_checkpoint_or_changed_data_stop_a_resume_in_one_line(tmp_path):
    import pandas as pd

    from rankalloc.errors import RunDirError

    words = ["awful", "great", "fine", "bad", "superb", "dull", "long", "short"]
    csv = tmp_path / "reviews.csv"
    pd.DataFrame({"text": [f"{words[i % 8]} film {i}" for i in range(200)],
                  "label": [["neg", "pos"][i % 2] for i in range(200)]}).to_csv(csv, index=False)

    def config(**kw):
        cfg = tiny_config(tmp_path, ModelConfig(num_layers=1), budget="5k", steps=8, r_max=4)
        cfg.data.task = str(csv)
        for key, value in kw.items():
            setattr(cfg, key, value)
        return cfg

    with pytest.raises(_Killed):  # after its checkpoint at step 4
        run_search(config(), command="test", on_step=_killed_at(5))
    pd.DataFrame({"text": [f"{words[i % 8]} play {i}" for i in range(200)],
                  "label": [["neg", "pos"][i % 2] for i in range(200)]}).to_csv(csv, index=False)
    with pytest.raises(RunDirError, match="started on other examples"):
        run_search(config(resume=True), command="test")
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(RunDirError, match=r"checkpoint.pt cannot be read \(.*\): it is damaged; pass --overwrite"):
        run_search(config(resume=True), command="test")
    with pytest.raises(RunDirError, match="--resume needs --out"):
        run_search(config(resume=True, out=None), command="test")


def test_a_run_stopped_before_its_first_checkpoint_starts_again_in_place(tmp_path, caplog):
    from rankalloc import rundir

    out = tmp_path / "run"
    out.mkdir()
    rundir.set_status(out, "running")
    (out / "history.json").write_text("[]")
    with caplog.at_level("WARNING", logger="rankalloc.rundir"):
        assert rundir.open_run(out, overwrite=False, resume=False) == (out, False)
    rundir.release(out)
    assert "stopped before its first checkpoint (running); starting it again" in caplog.text


def test_an_out_that_cannot_be_written_is_a_one_line_error(tmp_path, monkeypatch):
    from pathlib import Path

    from rankalloc import rundir
    from rankalloc.errors import RunDirError

    def read_only(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(RunDirError, match=r"--out .*new: cannot write there \(Permission denied\)"):
        rundir.open_run(tmp_path / "new", overwrite=False, resume=False)


def test_a_run_refused_by_the_lock_leaves_the_holder_s_lock_file(tmp_path, monkeypatch):
    """Two runs started together on a new --out: the one that loses the lock must not delete the lock
    file of the one that won (a third run could then take over the live folder)."""

    from rankalloc import rundir
    from rankalloc.errors import RunDirError

    out = tmp_path / "race"
    holder = ("import sys, time; from rankalloc import rundir; rundir.open_run(sys.argv[1], overwrite=False, "
              "resume=False); print('held', flush=True); time.sleep(60)")
    real_hold = rundir.hold
    winner = []

    def another_process_wins_first(folder):  # the winner locks between this run's look and its lock
        if not winner:
            winner.append(subprocess.Popen([sys.executable, "-c", holder, str(out)], stdout=subprocess.PIPE,
                                           text=True))
            assert winner[0].stdout.readline().strip() == "held"
        return real_hold(folder)

    monkeypatch.setattr(rundir, "hold", another_process_wins_first)
    try:
        with pytest.raises(RunDirError, match="is in use by a running process"):
            rundir.open_run(out, overwrite=False, resume=False)
        assert (out / rundir.LOCK).is_file()
    finally:
        winner[0].kill()
        winner[0].wait()


def test_a_write_cut_short_leaves_no_temporary_file_behind_a_rerun(tmp_path):
    from rankalloc import rundir

    out = tmp_path / "run"
    out.mkdir()
    rundir.set_status(out, "running")
    (out / ".checkpoint.pt.rankalloc-k3j2x.tmp.pt").write_bytes(b"half")
    (out / ".rankalloc.lock").write_text("")
    rundir.open_run(out, overwrite=False, resume=False)
    rundir.release(out)
    assert sorted(p.name for p in out.iterdir()) == [".rankalloc.lock", "status.json"]
    # killed by an earlier version while writing its first file (temporary names then had no mark): starts again
    old = tmp_path / "old"
    old.mkdir()
    (old / ".rankalloc.lock").write_text("")
    (old / ".status.json.k2j3h4ab.tmp.json").write_bytes(b"half")
    assert rundir.open_run(old, overwrite=False, resume=False) == (old, False)
    rundir.release(old)
    assert [p.name for p in old.iterdir()] == [".rankalloc.lock"]


def test_a_refused_folder_keeps_every_file_also_those_named_like_temporaries(tmp_path):
    """The clean-up of cut-short writes runs only in a folder accepted as a run, and deletes only rankalloc's
    own temporary names: a user's folder that --out points at by mistake loses nothing."""
    from rankalloc import rundir
    from rankalloc.errors import RunDirError

    out = tmp_path / "mine"
    out.mkdir()
    files = {"notes.txt": "my data", ".draft.v2.tmp": "x", ".config.backup.tmp.json": "important",
             ".a.json.rankalloc-k3j2x.tmp.json": "named like ours, in a folder that is not a run"}
    for name, text in files.items():
        (out / name).write_text(text)
    with pytest.raises(RunDirError, match="holds no resumable run"):
        rundir.open_run(out, overwrite=False, resume=False)
    assert {p.name: p.read_text() for p in out.iterdir()} == files
