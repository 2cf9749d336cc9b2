"""Data-parallel search under torchrun (gloo on CPU): same result as one process with the global batch."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _search_args(model: str, out: Path, batch: int, steps: int = 10) -> list[str]:
    return ["-m", "rankalloc.search", "--model", model, "--budget", "1500", "--out", str(out), "--device", "cpu",
            "--max-steps", str(steps), "--data.max_train_examples", "160", "--data.max_eval_examples", "32",
            "--data.max_length", "24", "--data.batch_size", str(batch), "--search.r_max", "4",
            "--search.warmup_steps", "2", "--search.checkpoint_every", "2", "--search.gap_batches", "1"]


def _torchrun(nproc: int, args: list[str], monitor_interval: float | None = None) -> list[str]:
    monitor = [f"--monitor-interval={monitor_interval}"] if monitor_interval else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *monitor,
            *args]


def _final(out: Path):
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    return json.loads((out / "rank_map.json").read_text())["modules"], ckpt["adapters"], ckpt["history"]


def test_two_processes_match_one_process_with_the_global_batch(tmp_path, tiny_llama):
    # tiny Llama has no dropout, so the only difference is the order of floating-point sums
    single = subprocess.run([sys.executable, *_search_args(tiny_llama, tmp_path / "one", batch=16)],
                            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    double = subprocess.run(_torchrun(2, _search_args(tiny_llama, tmp_path / "two", batch=8)),
                            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert double.returncode == 0, double.stderr[:3000]
    modules_1, adapters_1, history_1 = _final(tmp_path / "one")
    modules_2, adapters_2, history_2 = _final(tmp_path / "two")
    assert modules_1 == modules_2
    for key in adapters_1:
        assert torch.allclose(adapters_1[key], adapters_2[key], atol=1e-4, rtol=1e-3), key
    for a, b in zip(history_1, history_2):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
        assert a["lam"] == pytest.approx(b["lam"], abs=1e-4)


def _children_with_rank(parent: int, rank: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text().split()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and int(stat[3]) == parent:
            found.append(int(pid))
    return found


def test_a_killed_rank_fails_the_job_cleanly(tmp_path, tiny_llama):
    out = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun(2, _search_args(tiny_llama, out, batch=8, steps=400)), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoint.pt").is_file():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    victims = _children_with_rank(proc.pid, "1")
    assert victims, "rank 1 not found"
    os.kill(victims[0], signal.SIGKILL)
    try:
        _, err = proc.communicate(timeout=180)  # no hang: the launcher ends the job
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job hung after a rank was killed")
    assert proc.returncode != 0
    assert "SIGKILL" in err or "Signal 9" in err or "exitcode" in err.lower() or "failed" in err.lower()
    assert not (out / "rank_map.json").exists()


def _retrain_args(model: str, rank_map: Path, out: Path, batch: int) -> list[str]:
    return ["-m", "rankalloc.retrain", "--rank-map", str(rank_map), "--model", model, "--out", str(out),
            "--device", "cpu", "--max-steps", "6", "--data.max_train_examples", "160",
            "--data.max_eval_examples", "32", "--data.max_length", "24", "--data.batch_size", str(batch)]


def test_two_process_retrain_matches_one_process(tmp_path, tiny_llama):
    search = subprocess.run([sys.executable, *_search_args(tiny_llama, tmp_path / "s", batch=16, steps=4)],
                            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert search.returncode == 0, search.stderr[-3000:]
    rank_map = tmp_path / "s" / "rank_map.json"
    one = subprocess.run([sys.executable, *_retrain_args(tiny_llama, rank_map, tmp_path / "r1", 16)],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(_torchrun(2, _retrain_args(tiny_llama, rank_map, tmp_path / "r2", 8)),
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    m1 = json.loads((tmp_path / "r1" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "r2" / "metrics.json").read_text())
    assert m1["steps"] == m2["steps"] == 6
    assert m1["adapter_params"] == m2["adapter_params"]
    assert m1["eval_loss"] == pytest.approx(m2["eval_loss"], abs=1e-4)
    assert m1["final_train_loss"] == pytest.approx(m2["final_train_loss"], abs=1e-4)


def test_a_two_process_causal_lm_retrain_takes_the_global_token_mean(tmp_path, tiny_llama):
    """Answers of unequal length: the loss is a mean over answer tokens, so each rank's share is weighted by
    its token count (a plain mean of the ranks' means weighted a short answer's tokens more)."""
    import pandas as pd

    words = ["good", "bad", "the", "film", "was", "very", "not", "at", "all", "really"]
    rows = [{"prompt": f"{words[i % 10]} {words[(i * 3) % 10]} ?", "answer": " ".join(words[:1 + (i * 7) % 9])}
            for i in range(64)]
    pd.DataFrame(rows).to_csv(tmp_path / "qa.csv", index=False)

    def args(out, batch):
        return ["-m", "rankalloc.retrain", "--baseline", "uniform", "--budget", "2048", "--model", tiny_llama,
                "--task", str(tmp_path / "qa.csv"), "--data.text_column", "prompt", "--data.answer_column", "answer",
                "--out", str(out), "--device", "cpu", "--max-steps", "2", "--train.log_every", "1",
                "--data.max_train_examples", "48", "--data.max_eval_examples", "16", "--data.max_length", "24",
                "--data.batch_size", str(batch)]

    one = subprocess.run([sys.executable, *args(tmp_path / "r1", 16)], cwd=REPO, env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(_torchrun(2, args(tmp_path / "r2", 8)), cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    h1, h2 = (json.loads((tmp_path / r / "history.json").read_text()) for r in ("r1", "r2"))
    assert [r["train_loss"] for r in h2] == pytest.approx([r["train_loss"] for r in h1], abs=1e-5)
    m1, m2 = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("r1", "r2"))
    assert m1["eval_loss"] == pytest.approx(m2["eval_loss"], abs=1e-5)


def test_a_refused_out_stops_every_rank_at_once(tmp_path, tiny_llama):
    """Rank 0 alone opens the run folder; when it refuses (here --overwrite on a folder that is not a
    run), the other rank stops too, instead of waiting for the process-group timeout."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    # the launcher checks its workers every 2 s, not 0.1: once rank 0 has exited it ends rank 1, which must
    # have said why it stopped by then
    proc = subprocess.run(_torchrun(2, _search_args(tiny_llama, mine, batch=8) + ["--overwrite"], monitor_interval=2),
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "not a rankalloc run folder" in proc.stderr
    assert "rank 0 stopped before training" in proc.stderr
    assert (mine / "notes.txt").read_text() == "precious" and not (mine / "checkpoint.pt").exists()


DIE_AT_STEP = """
import os, sys
from rankalloc.config import SearchConfig
from rankalloc.flags import parse_args
from rankalloc.search import run_search

def die(row):  # rank 0 dies after the checkpoint of step 4; the launcher then ends rank 1
    if row["step"] == 5 and os.environ.get("RANK") == "0":
        os._exit(3)

cfg, _ = parse_args(SearchConfig, sys.argv[1:], "rankalloc search", "")
run_search(cfg, command="test", on_step=die)
"""


def test_a_killed_two_process_search_resumes_each_ranks_random_stream(tmp_path):
    """MiniLM has dropout and the two ranks' slices pad to different lengths, so their random streams
    part ways; a checkpoint keeps both, and a killed run resumed on two processes ends with the very
    history of an uninterrupted one. Another process count is refused in one line."""
    def args(out):
        return _search_args("minilm-l6", out, batch=8, steps=6) + ["--model.num_layers", "1",
                                                                   "--data.max_length", "64"]

    whole = subprocess.run(_torchrun(2, args(tmp_path / "whole")), cwd=REPO, env=_env(), capture_output=True,
                           text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    script = tmp_path / "die_at_step.py"
    script.write_text(DIE_AT_STEP)
    killed = subprocess.run(_torchrun(2, [str(script), *args(tmp_path / "killed")[2:]]), cwd=REPO, env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode != 0 and not (tmp_path / "killed" / "rank_map.json").exists()
    ckpt = torch.load(tmp_path / "killed" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == 4 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # the streams did part ways

    one = subprocess.run([sys.executable, *args(tmp_path / "killed")], cwd=REPO, env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 2 and "started on 2 process(es), this one has 1" in one.stderr
    resumed = subprocess.run(_torchrun(2, args(tmp_path / "killed")), cwd=REPO, env=_env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stderr
    _, _, history_whole = _final(tmp_path / "whole")
    _, _, history_resumed = _final(tmp_path / "killed")
    assert [r["train_loss"] for r in history_resumed] == [r["train_loss"] for r in history_whole]
    assert [r["val_loss"] for r in history_resumed] == [r["val_loss"] for r in history_whole]


def test_a_script_chains_stages_on_every_rank_in_its_own_process_group(tmp_path, tiny_llama):
    """A torchrun script that made its own process group: search then retrain on every rank. No rank may
    return before rank 0's files exist, the group stays the script's, and the runs record the launcher."""
    script = tmp_path / "chain.py"
    script.write_text(f"""
import json, os, sys
import torch.distributed as dist

def say(*parts):  # one write per line: two ranks share the unbuffered stdout pipe, and print writes each part
    os.write(1, (" ".join(map(str, parts)) + "\\n").encode())
from rankalloc import RetrainConfig, SearchConfig, run_retrain, run_search
from rankalloc.config import DataConfig, ModelConfig, SearchParams

dist.init_process_group("gloo")
data = dict(task="tweets", max_train_examples=160, max_eval_examples=32, max_length=24, batch_size=8)
run_search(SearchConfig(budget="1500", device="cpu", out={str(tmp_path / "s")!r}, max_steps=4,
                        model=ModelConfig(name={tiny_llama!r}), data=DataConfig(**data),
                        search=SearchParams(r_max=4, warmup_steps=2, gap_batches=1)))
run_retrain(RetrainConfig(rank_map={str(tmp_path / "s" / "rank_map.json")!r}, device="cpu", max_steps=2,
                          out={str(tmp_path / "r")!r}, model=ModelConfig(name={tiny_llama!r}),
                          data=DataConfig(**data)))
dist.barrier()  # the script's group is still there
say("chained", dist.get_rank())
""")
    proc = subprocess.run(_torchrun(2, [str(script)]), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("chained") == 2
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert metrics["world_size"] == summary["world_size"] == 2
    assert metrics["command"].startswith("torchrun --nproc_per_node 2 -m rankalloc.retrain ")


def test_a_sweep_under_torchrun_is_refused_in_one_line(tmp_path):
    proc = subprocess.run(_torchrun(2, ["-m", "rankalloc.sweep", "--budgets", "7k", "--out", str(tmp_path / "sw")]),
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "a sweep does not run under torchrun" in proc.stderr
    assert not (tmp_path / "sw").exists()


def test_stages_chained_without_a_group_of_the_scripts_share_the_first_stages_group(tmp_path, tiny_llama):
    """A torchrun script that made no group: a search, a refused search, then a retrain, on every rank. The
    group the first stage made stays for the next (ending it and starting another on the launcher's store
    races), a refused stage leaves it usable, and rank 1 keeps logging warnings only."""
    script = tmp_path / "chain.py"
    script.write_text(f"""
import logging, os
import torch.distributed as dist

def say(*parts):  # one write per line: two ranks share the unbuffered stdout pipe, and print writes each part
    os.write(1, (" ".join(map(str, parts)) + "\\n").encode())
from rankalloc import RankallocError, RetrainConfig, SearchConfig, run_retrain, run_search
from rankalloc.config import DataConfig, ModelConfig, SearchParams

data = dict(task="tweets", max_train_examples=160, max_eval_examples=32, max_length=24, batch_size=8)
search = dict(device="cpu", max_steps=4, model=ModelConfig(name={tiny_llama!r}), data=DataConfig(**data),
              search=SearchParams(r_max=4, warmup_steps=2, gap_batches=1))
run_search(SearchConfig(budget="1500", out={str(tmp_path / "s")!r}, **search))
say("searched", dist.is_initialized())
group = dist.group.WORLD
try:
    run_search(SearchConfig(budget="50M", out={str(tmp_path / "refused")!r}, **search))
except RankallocError:
    say("refused", dist.is_initialized())
run_retrain(RetrainConfig(rank_map={str(tmp_path / "s" / "rank_map.json")!r}, device="cpu", max_steps=2,
                          out={str(tmp_path / "r")!r}, model=ModelConfig(name={tiny_llama!r}),
                          data=DataConfig(**data)))
say("chained", dist.get_rank(), dist.group.WORLD is group, logging.getLogger("rankalloc").getEffectiveLevel())
""")
    proc = subprocess.run(_torchrun(2, [str(script)]), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("searched True") == 2 and proc.stdout.count("refused True") == 2
    assert "chained 1 True 30" in proc.stdout and "chained 0 True" in proc.stdout
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["world_size"] == 2


def test_the_collective_timeout_is_read_from_the_environment(monkeypatch):
    from rankalloc import distributed
    from rankalloc.errors import ConfigError

    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed._timeout_from_env() == 1800.0
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "7200")
    assert distributed._timeout_from_env() == 7200.0
    for bad in ("soon", "0", "-5", "nan"):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
        with pytest.raises(ConfigError, match=r"\$RANKALLOC_DIST_TIMEOUT_S=.* is not a timeout; allowed: a positive"):
            distributed._timeout_from_env()
