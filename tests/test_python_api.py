"""The stages called from Python: the same config objects as the command line, the same checks, and a
recorded command that rebuilds the config."""
from __future__ import annotations

import json
import random
import re
import shlex
import sys

import numpy as np
import pytest
import torch

import rankalloc
from rankalloc.errors import ConfigError
from rankalloc.flags import parse_args

pytestmark = [pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match"),
              pytest.mark.usefixtures("one_thread")]
DATA = dict(task="tweets", max_length=24, max_train_examples=96, max_eval_examples=32, batch_size=16,
            eval_batch_size=32)


def test_import_is_light_and_names_every_stage():
    import subprocess

    probe = "import sys, rankalloc; print(sorted(m for m in ('transformers', 'peft', 'optuna') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"  # the stages load them on first use
    for name in ("SearchConfig", "ExportConfig", "RetrainConfig", "SweepConfig",
                 "run_search", "run_export", "run_retrain", "run_sweep"):
        assert name in rankalloc.__all__ and name in dir(rankalloc) and getattr(rankalloc, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'run_everything'"):
        rankalloc.run_everything


def test_python_values_get_the_command_lines_types_on_a_copy(tmp_path):
    from pathlib import Path

    from rankalloc.flags import checked_copy

    cfg = rankalloc.SearchConfig(budget="10k", out=Path(tmp_path), seed="3",
                                 search=rankalloc.config.SearchParams(gate_lr=1, r_max=None))
    checked = checked_copy(cfg)
    assert checked.out == str(tmp_path) and checked.seed == 3 and checked.search.gate_lr == 1.0
    assert isinstance(checked.search.gate_lr, float)
    assert cfg.out == Path(tmp_path) and cfg.seed == "3"  # the caller's object is untouched
    for bad, flag in [(dict(seed=1.5), "--seed"), (dict(overwrite="maybe"), "--overwrite"),
                      (dict(data={"task": "tweets"}), "--data")]:
        with pytest.raises(ConfigError, match=flag):
            checked_copy(rankalloc.SearchConfig(budget="10k", **bad))


@pytest.mark.parametrize("stage, cfg, message", [
    ("run_search", lambda: rankalloc.SearchConfig(), "--budget is required"),
    ("run_search", lambda: rankalloc.SearchConfig(budget="10k", overwrite=True, resume=True), "exclude each other"),
    ("run_retrain", lambda: rankalloc.RetrainConfig(), "exactly one of --rank-map"),
    ("run_sweep", lambda: rankalloc.SweepConfig(), "--budgets is required"),
    ("run_retrain", lambda: rankalloc.SearchConfig(budget="20k"), "this stage takes a RetrainConfig, got SearchConfig"),
    ("run_search", lambda: rankalloc.RetrainConfig(baseline="uniform", budget="20k"), "takes a SearchConfig"),
    ("run_export", lambda: {"run": "x"}, "takes an ExportConfig, got dict"),
])
def test_a_config_built_in_python_gets_the_command_line_checks(tmp_path, monkeypatch, stage, cfg, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        getattr(rankalloc, stage)(cfg())
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_search_then_retrain_from_python(tmp_path, monkeypatch):
    import peft

    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "kernel.json"])  # as in a notebook
    model = rankalloc.config.ModelConfig(num_layers=1)
    cfg = rankalloc.SearchConfig(budget="6912", seed=0, device="cpu", out=str(tmp_path / "search"), model=model,
                                 data=rankalloc.config.DataConfig(**DATA),
                                 search=rankalloc.config.SearchParams(steps=4, warmup_steps=1, gap_batches=1))
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    caller_rng = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    result = rankalloc.run_search(cfg)
    assert result.rank_map.total_params <= 6912
    # the stage seeds itself from its config, and leaves the caller's random streams as they were
    assert random.getstate() == caller_rng[0] and (np.random.get_state()[1] == caller_rng[1]).all()
    assert torch.equal(torch.get_rng_state(), caller_rng[2])

    # the recorded command is the config's, not the notebook's argv, and it rebuilds the same config
    command = json.loads((result.out / "summary.json").read_text())["command"]
    assert command.startswith("python -m rankalloc.search ") and "ipykernel" not in command
    again, _ = parse_args(rankalloc.SearchConfig, shlex.split(command)[3:], "rankalloc search", "")
    assert again == cfg

    retrain_cfg = rankalloc.RetrainConfig(rank_map=result.out / "rank_map.json", seed=0, device="cpu",
                                          out=tmp_path / "retrain", max_steps=2)
    retrain_cfg.data.max_train_examples, retrain_cfg.data.max_length = 96, 24
    trained = rankalloc.run_retrain(retrain_cfg)  # model and task come from the rank map
    assert trained.metrics["task"] == "tweets" and trained.metrics["base_model"] == "minilm-l6"
    assert retrain_cfg.model.name == "auto" and retrain_cfg.data.task == "auto"  # filled in on a copy only
    assert trained.metrics["adapter_params"] == result.rank_map.total_params
    assert trained.metrics["command"].startswith("python -m rankalloc.retrain --rank-map ")
    loaded = peft.PeftConfig.from_pretrained(str(trained.out / "adapter"))
    mapped = {n for n, r in result.rank_map.ranks.items() if r > 0}
    assert set(loaded.rank_pattern) == {f"^{re.escape(n)}$" for n in mapped}
