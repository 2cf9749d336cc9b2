"""Crash safety: a search killed with SIGKILL and resumed gives exactly the uninterrupted result."""
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
ARGS = ["--config", "configs/search/smoke.yaml", "--budget", "20k", "--max-steps", "16",
        "--search.checkpoint_every", "3", "--search.warmup_steps", "2"]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _start(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rankalloc.search", *ARGS, "--out", str(out), *extra],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _checkpoint_step(out: Path) -> int:
    path = out / "checkpoint.pt"
    if not path.is_file():
        return -1
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["step"])
    except Exception:  # a reader racing the rename sees the old or the new file, never half of one
        return -1


def _kill_after_checkpoint(proc: subprocess.Popen, out: Path, at_least: int, timeout: float = 300) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        step = _checkpoint_step(out)
        if step >= at_least:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return step
        if proc.poll() is not None:
            pytest.fail(f"search ended before it could be killed: {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("no checkpoint appeared in time")


def _final(out: Path):
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    return json.loads((out / "rank_map.json").read_text())["modules"], ckpt["adapters"], ckpt["history"]


@pytest.mark.slow
def test_sigkill_twice_then_resume_matches_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    proc = _start(straight)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]

    crashed = tmp_path / "crashed"
    first = _kill_after_checkpoint(_start(crashed), crashed, at_least=3)
    assert json.loads((crashed / "status.json").read_text())["state"] == "running"
    assert not (crashed / "rank_map.json").exists()  # no half-baked result after a crash
    second = _kill_after_checkpoint(_start(crashed, "--resume"), crashed, at_least=first + 6)
    assert second > first
    earlier = torch.load(crashed / "checkpoint.pt", map_location="cpu", weights_only=False)["clock"]
    proc = _start(crashed)  # re-running into the same --out resumes too
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]
    # the run's wall time and peak memory span its three processes, not the last one alone
    summary = json.loads((crashed / "summary.json").read_text())
    assert summary["resumed_from_step"] == second
    assert json.loads((straight / "summary.json").read_text())["resumed_from_step"] is None
    assert summary["wall_time_s"] > earlier["elapsed_s"] > 0
    assert summary["peak_memory_mb"]["cpu_rss"] >= earlier["peak_memory_mb"]["cpu_rss"]
    report = (crashed / "report.md").read_text()
    assert f"(resumed at step {second}: with the earlier processes" in report
    assert "resumed_from_step" not in report + (straight / "report.md").read_text()  # not again under other settings

    modules_a, adapters_a, history_a = _final(straight)
    modules_b, adapters_b, history_b = _final(crashed)
    assert modules_a == modules_b
    assert adapters_a.keys() == adapters_b.keys()
    for key in adapters_a:
        assert torch.equal(adapters_a[key], adapters_b[key]), key
    assert history_a == history_b


HOLD_RUN = """
import sys, time
from pathlib import Path
from rankalloc import rundir
folder, resume = rundir.open_run(Path(sys.argv[1]), overwrite=False, resume=False)  # held from here on
print("held" if resume else "fresh", flush=True)
time.sleep(120)
"""


def test_a_folder_held_by_a_running_process_is_refused_until_it_ends(tmp_path):
    """A second run in a folder another process has opened (e.g. workers left behind by a killed
    launcher, or a command started twice) is refused in one line, with or without --overwrite, and
    nothing of the folder moves."""
    from rankalloc import rundir
    from rankalloc.errors import RunDirError

    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"the first run's")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_RUN, str(out)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    try:
        assert holder.stdout.readline().strip() == "held"
        for overwrite in (False, True):
            with pytest.raises(RunDirError, match=rf"--out .* is in use by a running process \(pid {holder.pid} on "):
                rundir.open_run(out, overwrite=overwrite, resume=False)
        with pytest.raises(RunDirError, match="is in use by a running process"):
            rundir.start_run(out, command="the second run")
        assert (out / "checkpoint.pt").read_bytes() == b"the first run's"
        assert not (out / "status.json").exists() and not rundir.replaced_folder(out).exists()  # nothing moved
    finally:
        holder.kill()
        holder.wait()
    folder, resume = rundir.open_run(out, overwrite=False, resume=False)  # its process ended: free again
    assert resume
    rundir.start_run(folder, command="the second run")
    rundir.start_run(folder, command="the second run")  # this process holds it already: fine
    rundir.finish_run(folder, command="the second run")
    assert rundir.open_run(out, overwrite=True, resume=False)[0] == out  # released: replaceable
    rundir.release(out)

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(RunDirError, match="not a rankalloc run folder"):
        rundir.open_run(mine, overwrite=True, resume=False)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]  # refused: left as it was found, no lock file


def test_the_folder_lock_is_let_go_when_a_status_write_fails_and_skipped_where_unsupported(tmp_path, monkeypatch,
                                                                                           caplog):
    import errno
    import fcntl

    from rankalloc import rundir

    out = tmp_path / "run"
    out.mkdir()
    rundir.start_run(out, command="x")
    assert rundir._lock_key(out) in rundir._LOCKS

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(rundir, "set_status", disk_full)
        with pytest.raises(OSError, match="No space"):
            rundir.fail_run(out, RuntimeError("boom"))
    assert rundir._lock_key(out) not in rundir._LOCKS  # let go all the same

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)  # e.g. a shared filesystem mounted without lock support
    with caplog.at_level("WARNING", logger="rankalloc"):
        rundir.start_run(out, command="y")
    assert "cannot lock the run folder" in caplog.text
    rundir.finish_run(out, command="y")
    assert json.loads((out / "status.json").read_text())["state"] == "done"


def test_sigterm_marks_the_run_failed_and_lets_the_folder_go(tmp_path):
    """A scheduler or launcher stops a job with SIGTERM: the run unwinds as on Ctrl-C (status failed, lock
    released, exit 143), so the folder's state is true and a rerun may take it."""
    import json
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    argv = [sys.executable, "-m", "rankalloc.search", "--budget", "5k", "--model.num_layers", "1", "--device", "cpu",
            "--out", str(out), "--search.steps", "400", "--search.warmup_steps", "2", "--search.checkpoint_every",
            "2", "--data.max_train_examples", "160", "--data.max_eval_examples", "32", "--data.max_length", "16",
            "--data.batch_size", "8", "--search.gap_batches", "1"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "terminated (SIGTERM); rerun the same command to resume" in err
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and "Terminated" in status["error"]
    resumed = subprocess.run(argv[:argv.index("--search.steps") + 1] + ["6"] + argv[argv.index("--search.steps") + 2:]
                             + ["--overwrite"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]  # the folder was let go: --overwrite may take it
