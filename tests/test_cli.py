"""The command line: one-line refusals of bad input (exit 2, no traceback), flags and configs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rankalloc import search
from rankalloc.config import SearchConfig
from rankalloc.flags import load_yaml, parse_args
from rankalloc.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--model.num_layers", "1", "--data.max_train_examples", "96", "--data.max_eval_examples", "32",
         "--data.batch_size", "16", "--data.max_length", "16", "--device", "cpu"]


def run_main(capsys, argv):
    code = search.main(argv)
    captured = capsys.readouterr()
    return code, captured.err.strip()


def assert_one_line_refusal(code, err, fragment):
    """Exit 2; the error is one line, the last on stderr (log lines may precede it); no traceback."""
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    assert fragment in errors[0], err


@pytest.mark.parametrize("argv, fragment", [
    (["--budget", "0"], "must be positive"),
    (["--budget", "-5k"], "must be positive"),
    (["--budget", "abc"], "is not a budget"),
    (["--budget", "0.5Q"], "is not a budget"),
    (["--budget", "1e99"], "beyond any model"),
    (["--budget", "150%"], "(0, 100]"),
    ([], "--budget is required"),
    (["--budget", "1k", "--bogus", "1"], "unrecognized arguments: --bogus"),
    (["--budget", "1k", "--search.bogus", "1"], "unrecognized arguments: --search.bogus"),
    (["--budget", "1k", "--search.gate_lr", "fast"], "--search.gate_lr must be a number, got 'fast'"),
    (["--budget", "1k", "--search.steps", "1.5"], "--search.steps must be an integer"),
    (["--budget", "1k", "--data.max_length", "0"], "--data.max_length must be a positive integer, got 0"),
    (["--budget", "1k", "--data.max_length", "-3"], "--data.max_length must be a positive integer"),
    (["--budget", "1k", "--search.budget_warmup", "1.5"], "--search.budget_warmup must lie in [0, 1)"),
    (["--budget", "1k", "--max-steps", "0"], "--max-steps must be a positive integer"),
    (["--budget", "1k", "--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--budget", "1k", "--overwrite", "--resume"], "exclude each other"),
    (["--budget", "1k", "--config", "/nonexistent/x.yaml"], "no such file"),
    (["--budget", "1k", "--search.penalty", "nan"], "--search.penalty must be a finite number, got 'nan'"),
    (["--budget", "1k", "--search.scale", "inf"], "--search.scale must be a finite number"),
    (["--budget", "1k", "--max-steps", "3", "--search.gate_every", "4"],
     "--search.gate_every 4 leaves no gate step at the budget in this run"),
    (["--budget", "1k", "--search.steps", "12", "--search.warmup_steps", "0", "--search.budget_warmup", "0.75",
      "--search.gate_every", "7"], "gate_every 7 leaves no gate step at the budget in this run"),
    (["--budget", "1k", "--search.steps", "90", "--search.warmup_steps", "27", "--search.budget_warmup", "0.7",
      "--max-steps", "10"], "budget ramp 7 fill all 10"),
    (["--budget", ""], "--budget is required"),
    (["--budget", "1k", "--data.task", " "], "--task is empty"),
    (["--budget", "1k", "--seed", "99999999999999999999"], "--seed must be an integer from 0 to 4294967295"),
    (["--budget", "1k", "--device", "cuda:x"], "--device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    (["--budget", "1k", "--resume"], "--resume needs --out"),
])
def test_refusals_before_any_model_work(capsys, argv, fragment):
    assert_one_line_refusal(*run_main(capsys, argv), fragment)


@pytest.mark.parametrize("extra, fragment", [
    (["--budget", "767"], "below the smallest non-empty allocation"),
    (["--budget", "1M", "--search.r_max", "4"], "exceeds every module at its largest rank"),
    (["--budget", "10M"], "exceeds every module at full rank"),
    (["--budget", "5k", "--model.target_modules", "nope"], "no adapter targets match"),
    (["--budget", "5k", "--model.target_regex", "zzz"], "no adapter targets match"),
    (["--budget", "5k", "--model", "/nonexistent/model"], "no such folder"),
    (["--budget", "5k", "--data.gate_fraction", "0.05"], "--data.gate_fraction"),
    (["--budget", "5k", "--data.max_length", "1024"], "--data.max_length 1024 exceeds the 512 positions"),
])
def test_refusals_that_need_the_model(capsys, tmp_path, extra, fragment):
    code, err = run_main(capsys, SMALL + extra + ["--out", str(tmp_path / "run")])
    assert_one_line_refusal(code, err, fragment)
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_an_out_folder_under_a_file_is_refused_before_any_model_work(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    code, err = run_main(capsys, ["--budget", "5k", "--out", str(tmp_path / "notes.txt" / "run")])
    assert_one_line_refusal(code, err, "notes.txt is a file, not a folder")
    assert len(err.splitlines()) == 1  # refused before the model loaded (nothing logged)


def _table(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("make, fragment", [
    (lambda p: str(p / "missing.csv"), "missing.csv"),
    (lambda p: _table(p, "empty.csv", ""), "empty"),
    (lambda p: _table(p, "cols.csv", "sentence,label\n" + "a,0\nb,1\n" * 60), "text"),
    (lambda p: _table(p, "one.csv", "text,label\n" + "a,0\n" * 120), "one class"),
    (lambda p: _table(p, "float.csv", "text,label\n" + "a,0.5\nb,1.5\n" * 60), "--data.family regression"),
    (lambda p: _table(p, "options.csv", "text,label,options\n" + "a,0,x\n" * 60), "not a list of options"),
])
def test_bad_data_files(capsys, tmp_path, make, fragment):
    family = {"float.csv": ["--data.family", "classification"], "options.csv": ["--data.choice_columns", "options"]}
    task = make(tmp_path)
    code, err = run_main(capsys, SMALL + ["--budget", "5k", "--task", task, *family.get(Path(task).name, [])])
    assert_one_line_refusal(code, err, fragment)


def test_unknown_family_is_refused(capsys):
    code, err = run_main(capsys, SMALL + ["--budget", "5k", "--data.family", "ranking"])
    assert_one_line_refusal(code, err, "--data.family must be auto or one of classification, regression")


def test_finished_run_is_not_overwritten(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "status.json").write_text(json.dumps({"state": "done"}))
    (out / "rank_map.json").write_text("precious")
    code, err = run_main(capsys, SMALL + ["--budget", "5k", "--out", str(out), "--search.r_max", "4"])
    assert_one_line_refusal(code, err, "holds a finished run; pass --overwrite")
    assert (out / "rank_map.json").read_text() == "precious"
    (out / "checkpoint.pt").write_text("a search keeps its checkpoint when it finishes")
    code, err = run_main(capsys, SMALL + ["--budget", "5k", "--out", str(out), "--search.r_max", "4", "--resume"])
    assert_one_line_refusal(code, err, "--resume: " + str(out) + " holds a finished run, nothing to resume")
    assert (out / "rank_map.json").read_text() == "precious"


def test_unknown_yaml_key_is_named(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("search:\n  gate_lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key search.gate_lrr \(in c.yaml\).*gate_lr"):
        load_yaml(SearchConfig, cfg)
    cfg.write_text("search:\n  steps: many\n")
    with pytest.raises(ConfigError, match="search.steps .* must be an integer"):
        load_yaml(SearchConfig, cfg)
    cfg.write_text("search:\n  # steps: 4\n")  # a section whose fields are all commented out: no change
    assert load_yaml(SearchConfig, cfg).search == SearchConfig().search
    cfg.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_yaml(SearchConfig, cfg)
    cfg.write_text("search: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(SearchConfig, cfg)
    cfg.write_bytes(b"search:\n  gate_lr: 0.1 # \xe9t\xe9\n")  # Latin-1, not UTF-8
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_yaml(SearchConfig, cfg)
    cfg.write_text("search:\n  penalty: .nan\n")
    with pytest.raises(ConfigError, match="search.penalty .* must be a finite number"):
        load_yaml(SearchConfig, cfg)


def test_flags_override_config_and_dotted_flags_reach_every_field(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("budget: 100k\nsearch:\n  gate_lr: 0.1\n  steps: 50\ndata:\n  max_length: 32\n")
    cfg, _ = parse_args(SearchConfig, ["--config", str(cfg_file), "--search.gate_lr", "3e-3", "--seed", "7",
                                       "--model.target_modules", "query,value", "--search.r_max", "auto"],
                        "t", "")
    assert cfg.budget == "100k" and cfg.seed == 7
    assert cfg.search.gate_lr == 0.003 and cfg.search.steps == 50 and cfg.data.max_length == 32
    assert cfg.model.target_modules == ["query", "value"] and cfg.search.r_max is None


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_config_loads_and_its_header_is_its_command(path):
    header = path.read_text().splitlines()[0]
    assert header.startswith("# python -m rankalloc."), "the first line must be the exact command"
    stage = header.split()[3].split(".")[1]
    from rankalloc import config as config_module

    classes = {"search": SearchConfig, "export": config_module.ExportConfig,
               "retrain": getattr(config_module, "RetrainConfig", None),
               "sweep": getattr(config_module, "SweepConfig", None)}
    assert classes.get(stage) is not None, f"no config class for stage {stage}"
    assert f"--config {path.relative_to(REPO)}" in header
    load_yaml(classes[stage], path)


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(SearchConfig, ["--help"], "rankalloc search", "")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--budget", "--config", "--model", "--task", "--out", "--seed", "--max-steps", "--device",
                 "--overwrite", "--resume", "--search.gate_lr", "--data.max_length", "--model.num_layers"):
        assert flag in text


@pytest.mark.parametrize("value", ["true", "yes", "1", "On", "off"])
def test_the_recorded_command_drops_a_boolean_flag_with_its_value(value):
    from rankalloc.cli import command_line

    assert command_line("sweep", ["--budgets", "41k", "--overwrite", value, "--out", "x"],
                        without=("--overwrite", "--resume")) == "python -m rankalloc.sweep --budgets 41k --out x"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device, fragment", [("cuda", "CUDA is not available"), ("cuda:1", "CUDA is not available"),
                                              ("mps", "MPS backend is not available")])
def test_a_device_this_machine_lacks_is_refused_before_any_model_work(capsys, monkeypatch, device, fragment):
    import torch

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)

    def no_model(*args, **kwargs):
        raise AssertionError("the device must be refused before the model loads")

    monkeypatch.setattr(search, "load_tokenizer", no_model)
    assert_one_line_refusal(*run_main(capsys, ["--budget", "1k", "--device", device]), fragment)


def test_the_stage_dispatcher_says_what_it_accepts(capsys):
    """`rankalloc` alone is an error (usage on stderr, exit 2, as argparse does); `--help` is not (stdout,
    exit 0); an unknown stage is a one-line error naming the stages."""
    from rankalloc.__main__ import STAGES, main

    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("usage: rankalloc <stage>")
    assert main(["--help"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and all(stage in captured.out for stage in STAGES)
    assert main(["serach"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "rankalloc: error: unknown stage 'serach'; stages: " + ", ".join(STAGES)


def test_ctrl_c_says_how_to_resume_where_a_stage_can(monkeypatch, capsys):
    import rankalloc.export
    import rankalloc.search
    from rankalloc.cli import run_stage

    def interrupted(argv):
        raise KeyboardInterrupt

    for module in (rankalloc.search, rankalloc.export):
        monkeypatch.setattr(module, "cli", interrupted)
    assert run_stage("search", []) == 130
    assert capsys.readouterr().err.strip().endswith("rankalloc search: interrupted; rerun the same command to resume")
    assert run_stage("export", []) == 130
    assert capsys.readouterr().err.strip().endswith("rankalloc export: interrupted")
