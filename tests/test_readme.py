"""The README is the front door: its install line matches CI, and its pipeline commands run.

Each `python -m rankalloc.<stage>` line of the README's bash blocks is run as written, in order, in a
scratch folder, with flags appended that shrink the work (fewer blocks, examples and steps; later
flags override earlier ones), so the test checks the commands themselves, not a paraphrase.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
DATA = ["--data.max_train_examples", "96", "--data.max_eval_examples", "32", "--data.batch_size", "16",
        "--data.max_length", "16", "--device", "cpu"]
SHRINK = {
    "search": ["--model.num_layers", "2", "--max-steps", "2", "--search.gap_batches", "1", *DATA],
    "export": [],
    "retrain": ["--max-steps", "2", *DATA],
    "sweep": ["--model.num_layers", "2", "--max-steps", "2", *DATA],
}


def bash_lines() -> list[str]:
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        joined = block.replace("\\\n", " ")
        lines += [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()]
    return lines


def pipeline_commands() -> list[list[str]]:
    return [shlex.split(line) for line in bash_lines() if line.startswith("python -m rankalloc.")]


def test_setup_line_and_test_command_match_ci():
    ci = (REPO / ".ci" / "run").read_text()
    setup = next(line for line in bash_lines() if "pip install" in line)
    assert "pip install torch==2.13.0" in setup and 'pip install -e ".[test]"' in setup
    assert setup.endswith("python -m rankalloc.search --budget 0.5M")  # sets up and runs the default
    assert '"torch==2.13.0"' in ci and '-e ".[test]"' in ci
    test_command = next(line for line in bash_lines() if line.startswith("python -m pytest"))
    assert test_command in ci


@pytest.mark.slow
def test_readme_pipeline_commands_run(tmp_path):
    commands = pipeline_commands()
    stages = [cmd[2].split(".")[1] for cmd in commands]
    assert stages[:2] == ["search", "export"] and "retrain" in stages
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for cmd, stage in zip(commands, stages):
        extra = list(SHRINK[stage])
        if stage == "retrain" and "--baseline" in cmd:
            extra += ["--model.num_layers", "2"]
        proc = subprocess.run([sys.executable, *cmd[1:], *extra], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-3000:]}"
    assert (tmp_path / "runs" / "s" / "rank_map.json").is_file()
    assert (tmp_path / "runs" / "r" / "adapter" / "adapter_config.json").is_file()
    _the_peft_snippets_build_the_searched_ranks(tmp_path)


def _the_peft_snippets_build_the_searched_ranks(run_folder: Path) -> None:
    """The README's peft snippet and its one-line Python route, run as written on the pipeline's search,
    build adapters of exactly the rank map's size."""
    from peft import LoraConfig, get_peft_model

    from rankalloc.rank_map import RankMap

    snippet = next(block for block in re.findall(r"```python\n(.*?)```", README, flags=re.S)
                   if 'LoraConfig.from_pretrained("runs/s")' in block)
    one_line = re.search(r"`(LoraConfig\(\*\*RankMap\.load\(\"runs/s/rank_map.json\"\)\.lora_config\(\)\))`", README)
    assert one_line, "the README's Python route to a LoraConfig"
    before = os.getcwd()
    os.chdir(run_folder)
    try:
        scope: dict = {}
        exec(snippet, scope)
        config = eval(one_line.group(1), {"LoraConfig": LoraConfig, "RankMap": RankMap})
        from_map = get_peft_model(scope["base_model"].__class__.from_pretrained(scope["base_model"].name_or_path,
                                                                                num_labels=3), config)
        want = RankMap.load("runs/s/rank_map.json").total_params
    finally:
        os.chdir(before)
    for model in (scope["model"], from_map):
        assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == want
        assert any(p.requires_grad for n, p in model.named_parameters() if "classifier" in n)  # the head trains
