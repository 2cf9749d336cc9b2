"""Sweep: a study over budgets on SQLite, resumed without rerunning points; re-exports within budget;
refused storages; a journal's crashed trial retried; two real worker processes on PostgreSQL, one of them
killed mid-trial (RANKALLOC_TEST_PG_URL, set by .ci/postgres.sh)."""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from rankalloc import sweep, sweep_folder, sweep_shared, sweep_study
from rankalloc.config import ExportConfig, RetrainConfig, SearchConfig, SweepConfig, TrainParams
from rankalloc.flags import parse_args, stage_command
from rankalloc.errors import BudgetError

REPO = Path(__file__).resolve().parents[1]
# One block of the real MiniLM-L6 (6,912 parameters per rank over its six projections), 96 tweets,
# 2 steps of search and of retrain: a trial takes a few seconds.
SMALL = ["--model.num_layers", "1", "--data.max_train_examples", "96", "--data.max_eval_examples", "32",
         "--data.batch_size", "16", "--data.max_length", "16", "--device", "cpu", "--max-steps", "2",
         "--search.warmup_steps", "0", "--search.log_every", "1", "--search.gap_batches", "1",
         "--train.log_every", "1", "--poll_interval", "0.5"]
PG_URL = os.environ.get("RANKALLOC_TEST_PG_URL")
PG_DB = sweep_study.postgres_driver_url(PG_URL) if PG_URL else None  # with the installed driver, for optuna here


pytestmark = pytest.mark.usefixtures("one_thread")


def _study(storage: str, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=storage)


def _complete(study) -> dict[tuple[str, int], list[int]]:
    """point -> numbers of its complete trials."""
    from optuna.trial import TrialState

    out: dict[tuple[str, int], list[int]] = {}
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        out.setdefault(sweep_study.point_of(t), []).append(t.number)
    return out


# --------------------------------------------------------------------------------------------------
# Pure parts
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("items, expected", [
    (["41k", "83k", "166k", "332k"], [41000, 83000, 166000, 332000]),
    (["40k:400k:4"], [40000, 86177, 185664, 400000]),
    (["0.1M", "100000", "50k"], [50000, 100000]),
    (["7k:28k:3", "41472"], [7000, 14000, 28000, 41472]),
])
def test_budget_lists_and_log_ranges(items, expected):
    assert sweep_shared.parse_budgets(items) == expected


@pytest.mark.parametrize("items, fragment", [
    (["40k:4"], "give budgets"), (["400k:40k:3"], "LO < HI"), (["1%"], "parameter counts"),
    (["abc"], "--budgets 'abc' is not a budget"), (["40k:400k:x"], "LO:HI:N"),
])
def test_bad_budgets_are_refused(items, fragment):
    with pytest.raises(BudgetError, match=fragment):
        sweep_shared.parse_budgets(items)


@pytest.mark.parametrize("cls, argv", [
    (SearchConfig, ["--budget", "27648", "--out", "runs/s", "--search.r_max", "16", "--model.num_layers", "1",
                    "--model.target_modules", "query,value", "--data.max_train_examples", "null"]),
    (ExportConfig, ["--run", "runs/s", "--budget", "14000", "--out", "runs/e"]),
    (RetrainConfig, ["--baseline", "uniform", "--budget", "7000", "--merge", "--train.lr", "0.001",
                     "--model", "minilm-l6"]),
])
def test_recorded_commands_rebuild_the_same_config(cls, argv):
    """The commands in pareto.md are exact: parsing one gives back the config that ran."""
    import shlex

    cfg, _ = parse_args(cls, argv, "t", "")
    command = stage_command(cls.__name__.replace("Config", "").lower(), cfg)
    again, _ = parse_args(cls, shlex.split(command)[3:], "t", "")
    assert again == cfg


def test_a_worker_joining_a_study_being_created_waits_for_its_settings(tmp_path):
    """Two workers start together with different settings: the one that did not create the study waits for
    the creator's settings and refuses, rather than recording its own beside the creator's trials."""
    import threading

    import optuna

    from rankalloc.errors import ConfigError

    creator, _ = parse_args(SweepConfig, ["--budgets", "7k", "--study-name", "r"], "t", "")
    joiner, _ = parse_args(SweepConfig, ["--budgets", "7k", "--study-name", "r", "--train.lr", "0.0123"], "t", "")
    storage = sweep_study.open_storage(creator, tmp_path)
    study = optuna.create_study(storage=storage, study_name="r", directions=list(sweep_study.DIRECTIONS))
    later = threading.Timer(0.5, lambda: study.set_user_attr("settings", sweep_study._settings(creator)))
    later.start()
    with pytest.raises(ConfigError, match="study 'r' was run with --train.lr"):
        sweep_study.open_study(joiner, storage, tmp_path)
    later.join()


def test_a_retried_trial_runs_its_own_point_whatever_this_workers_grid():
    """A trial killed before its first suggest is retried with the dead worker's grid index; this worker's
    grid has other points in another order, so the index alone would name another point."""
    import optuna
    from optuna.trial import TrialState, create_trial

    from rankalloc.budget import MAX_ABSOLUTE

    sampler = sweep_study.make_grid_sampler([("rankalloc", 14000), ("rankalloc", 28000), ("uniform", 14000)], 0)
    study = optuna.create_study(directions=["minimize", "maximize"], sampler=sampler)
    wrong = next(i for i, g in enumerate(sampler._all_grids) if sampler._point(g) != ("uniform", 14000))
    study.add_trial(create_trial(state=TrialState.WAITING,
                                 system_attrs={"grid_id": wrong, "rankalloc_point": ["uniform", 14000]}))
    trial = study.ask()
    assert (trial.suggest_categorical("method", sweep_study.METHODS),
            trial.suggest_int("budget", 1, MAX_ABSOLUTE, log=True)) == ("uniform", 14000)


def test_a_trial_read_between_its_two_suggests_has_its_sampled_point():
    """Another worker reading a grid trial after its budget was suggested but before its method sees the
    point the sampler recorded, not the budget with rankalloc assumed."""
    import optuna

    from rankalloc.budget import MAX_ABSOLUTE

    sampler = sweep_study.make_grid_sampler([("uniform", 14000)], 0)
    study = optuna.create_study(directions=["minimize", "maximize"], sampler=sampler)
    trial = study.ask()
    trial.suggest_int("budget", 1, MAX_ABSOLUTE, log=True)
    seen = study.get_trials(deepcopy=True)[0]
    assert "method" not in seen.params and sweep_study.point_of(seen) == ("uniform", 14000)


def test_a_tuned_trial_running_elsewhere_is_not_started_again(tmp_path, monkeypatch):
    """--tune asks for one trial and another worker is running it: this worker waits for it instead of
    starting a second (the study would hold more tuned trials than asked), then ends."""
    import optuna

    cfg, _ = parse_args(SweepConfig, ["--budgets", "7k", "--tune", "gate_lr", "--n-trials", "1",
                                      "--poll_interval", "1"], "t", "")
    study = optuna.create_study(directions=["minimize", "maximize"])
    other = study.ask()
    other.suggest_categorical("budget", [7000])
    other.set_user_attr("worker", "elsewhere:1")
    started = []
    def objective(self, trial):
        started.append(trial.suggest_categorical("budget", [7000]))
        return 1.0, 0.5

    monkeypatch.setattr(sweep.Sweep, "objective", objective)
    monkeypatch.setattr(sweep.time, "sleep", lambda seconds: study.tell(other, [1.0, 0.5]))
    work = sweep.Sweep(cfg, tmp_path, [7000], [], None, tune_total=1)
    sweep.run_worker(study, work)
    assert started == [] and len(study.trials) == 1


def test_a_refused_sweep_touches_no_folder_and_no_study(tmp_path, capsys):
    """A sweep writes its study into --out: a search run there is refused and left as it was; a refused
    --resume makes no folder; a mistyped --task is refused before --overwrite deletes a study."""
    import optuna

    run = tmp_path / "search-run"
    run.mkdir()
    (run / "rank_map.json").write_text("{}")
    assert sweep.main(SMALL + ["--budgets", "7k", "--out", str(run)]) == 2
    assert "not a rankalloc sweep folder; it is left as it is" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["rank_map.json"]
    assert sweep.main(SMALL + ["--budgets", "7k", "--resume", "--out", str(tmp_path / "new")]) == 2
    assert "--resume: no study" in capsys.readouterr().err and not (tmp_path / "new").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("j.log", "s.db"):  # a study file of another name: a missing one is not made
        where = f"journal:{elsewhere / name}" if name.endswith(".log") else f"sqlite:///{elsewhere / name}"
        assert sweep.main(SMALL + ["--budgets", "7k", "--resume", "--storage", where, "--out",
                                   str(tmp_path / "new")]) == 2
        assert "--resume: --storage" in capsys.readouterr().err
    optuna.create_study(study_name="another", storage=f"sqlite:///{elsewhere / 's.db'}")
    assert sweep.main(SMALL + ["--budgets", "7k", "--resume", "--storage", f"sqlite:///{elsewhere / 's.db'}",
                               "--out", str(tmp_path / "new")]) == 2  # a study file without this study
    assert "--resume: no study 'rankalloc-sweep'" in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and sorted(p.name for p in elsewhere.iterdir()) == ["s.db"]
    # the file a --resume needs (one reading for every guard): a URL query is not part of its name
    assert sweep_study.storage_file(f"sqlite:///{elsewhere / 's.db'}?timeout=30") == elsewhere / "s.db"
    assert sweep_study.storage_file(f"journal:{elsewhere / 'j.log'}") == elsewhere / "j.log"
    assert sweep_study.storage_file("postgresql://u:p@host/db") is None
    journal = tmp_path / "studies" / "j.log"
    journal.parent.mkdir()
    storage = f"journal:{journal}"
    study = optuna.create_study(study_name="rankalloc-sweep", directions=["minimize", "maximize"],
                                storage=optuna.storages.JournalStorage(
                                    optuna.storages.journal.JournalFileBackend(str(journal))))
    study.enqueue_trial({"budget": 7000})
    assert sweep.main(SMALL + ["--budgets", "7k", "--overwrite", "--storage", storage, "--task",
                               str(tmp_path / "missing.csv"), "--out", str(tmp_path / "sw")]) == 2
    assert "missing.csv: no such file" in capsys.readouterr().err
    assert optuna.get_all_study_names(optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal)))) == ["rankalloc-sweep"]


@pytest.mark.parametrize("extra, fragment", [
    (["--budgets", "500,14k"], "--budgets 500 (500 parameters) is below the smallest non-empty allocation"),
    (["--budgets", "14k", "--shared_budget", "500"], "--shared_budget 500 (500 parameters) is below"),
])
def test_budgets_the_shared_search_cannot_serve_are_refused_before_it_runs(tmp_path, capsys, extra, fragment):
    out = tmp_path / "s"
    assert sweep.main(SMALL + ["--out", str(out)] + extra) == 2
    assert fragment in capsys.readouterr().err
    assert not out.exists()  # refused before the study, the model or the search


def test_study_names_get_folders_of_their_own():
    names = ["a/b", "a_b", "a b", "..", ".", "rankalloc-sweep"]
    folders = [sweep_folder.safe_name(n) for n in names]
    assert len(set(folders)) == len(names) and sweep_folder.safe_name("rankalloc-sweep") == "rankalloc-sweep"
    assert all("/" not in f and f not in (".", "..") for f in folders)


def test_the_sweep_refuses_a_baseline_its_studies_cannot_hold():
    from rankalloc.config import SweepConfig
    from rankalloc.errors import ConfigError

    with pytest.raises(ConfigError, match="must be among uniform, adalora, got 'random'"):
        parse_args(SweepConfig, ["--budgets", "41k", "--baseline", "random"], "t", "")


def test_a_tuned_gate_every_that_a_short_run_cannot_hold_is_refused_before_any_trial():
    from rankalloc.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--tune gate_every \(which tries 1 to 4\): 3 leaves no gate step"):
        parse_args(SweepConfig, ["--budgets", "7k", "--tune", "gate_every", "--max-steps", "2"], "t", "")
    parse_args(SweepConfig, ["--budgets", "7k", "--tune", "gate_every", "--max-steps", "12"], "t", "")


def test_a_baseline_that_cannot_fit_a_budget_is_refused_before_any_trial(tmp_path, capsys):
    """Uniform rank 1 on MiniLM-L6's 36 matrices costs 41,472: at 41k it cannot run, so the sweep says so
    at once, instead of stopping at that point after the others ran (and again on every rerun)."""
    out = tmp_path / "s"
    code = sweep.main(["--budgets", "41k,83k", "--baseline", "uniform", "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert "--baseline uniform cannot run at the sweep's budget 41,000" in err[-1]
    assert "below rank 1 on all 36 targets (41,472)" in err[-1]
    assert not (out / "trials").exists()


# --------------------------------------------------------------------------------------------------
# SQLite: a 3-trial sweep, resumed with more budgets; re-export at 5 budgets from its shared search
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sqlite_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "s"
    argv = SMALL + ["--budgets", "7k,14k,28k", "--out", str(out), "--study-name", "t3"]
    assert sweep.main(argv) == 0
    return out, argv


def test_sweep_writes_reports_and_resumes_without_rerunning(sqlite_sweep):
    out, argv = sqlite_sweep
    storage = f"sqlite:///{out / 'sweep.db'}"
    study = _study(storage, "t3")
    first = {t.number: t.datetime_complete for t in study.trials}
    assert sorted(_complete(study)) == [("rankalloc", 7000), ("rankalloc", 14000), ("rankalloc", 28000)]
    assert len(first) == 3
    for t in study.trials:  # what it takes to retrain or ship any point
        u = t.user_attrs
        assert u["method"] == "rankalloc" and Path(u["rank_map"]).is_file() and Path(u["adapter"]).is_dir()
        assert json.loads(Path(u["metrics"]).read_text())["accuracy"] == pytest.approx(t.values[1])
        assert t.values[0] <= u["budget"] and len(u["commands"]) == 3  # search, export, retrain
    for name in ("pareto.csv", "pareto.md", "pareto.png", "trials.csv", "sweep.json"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "pareto.csv").open()))
    assert rows and all(r["front"] == "True" for r in rows)
    assert all(r["metric"] == "accuracy" and 0 <= float(r["score"]) <= 1 for r in rows)  # the family's metric
    assert "python -m rankalloc.export --run" in (out / "pareto.md").read_text()
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["full_search_estimate_s"] == pytest.approx(3 * summary["shared_search"]["wall_time_s"])

    # the same study with more budgets (a range, too): only the new point runs
    more = [a if a != "7k,14k,28k" else "7k:28k:3,41472" for a in argv]
    assert sweep.main(more) == 0
    study = _study(storage, "t3")
    assert len(study.trials) == 4
    assert {t.number: t.datetime_complete for t in study.trials if t.number in first} == first
    assert all(len(n) == 1 for n in _complete(study).values()) and ("rankalloc", 41472) in _complete(study)
    assert len(list(csv.DictReader((out / "trials.csv").open()))) == 4


def test_reexports_from_one_search_respect_their_budgets(sqlite_sweep):
    out, argv = sqlite_sweep
    budgets = sweep_shared.parse_budgets(["10k", "15k", "20k", "30k", "40k"])
    cfg, _ = parse_args(SweepConfig, SMALL + ["--budgets", "10k,40k", "--out", str(out)], "t", "")
    shared = sweep_shared.run_shared_search(cfg, out, budgets)  # the finished one is reused, not rerun
    assert shared.path == str(out / "search")
    runner = sweep.Sweep(cfg, out, budgets, [], shared)
    for b in budgets:
        path, commands = runner._rank_map(b, out / "export-test" / str(b), cfg.search, {})
        rank_map = json.loads(path.read_text())
        assert 0.99 * b <= rank_map["total_params"] <= b, (b, rank_map["total_params"])
        assert rank_map["search"]["exported_from_budget"] == shared.budget and commands[0] == shared.command


def test_overwrite_refuses_a_folder_that_is_not_a_sweep_and_keeps_the_study(sqlite_sweep, tmp_path, capsys):
    out, argv = sqlite_sweep
    mine = tmp_path / "my-experiments"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    storage = f"sqlite:///{out / 'sweep.db'}"
    code = sweep.main(SMALL + ["--budgets", "7k", "--out", str(mine), "--storage", storage, "--study-name", "t3",
                               "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert "is not a rankalloc sweep folder; it is left as it is (and so is the study)" in err[-1]
    assert (mine / "notes.txt").read_text() == "precious" and len(_study(storage, "t3").trials) >= 3
    before = sorted(p.name for p in out.iterdir())  # a sweep folder, refused for a bad baseline budget
    code = sweep.main(SMALL + ["--budgets", "5k", "--baseline", "uniform", "--out", str(out), "--study-name", "t3",
                               "--overwrite"])
    assert code == 2 and "cannot run at the sweep's budget 5,000" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before and len(_study(storage, "t3").trials) >= 3


def test_overwrite_replaces_a_sweep_once_the_new_one_finishes(tmp_path, capsys):
    from optuna.trial import TrialState

    out = tmp_path / "s"
    argv = SMALL + ["--budgets", "7k", "--out", str(out), "--study-name", "o"]
    assert sweep.main(argv) == 0
    study = _study(f"sqlite:///{out / 'sweep.db'}", "o")
    first = study.trials[0].datetime_complete
    live = study.ask()  # a trial another live worker is running: a second --overwrite must not pull the rug
    live.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    assert sweep.main(argv + ["--overwrite"]) == 2
    assert "has 1 trial(s) running in other workers; start further workers without --overwrite" in \
        capsys.readouterr().err
    study.tell(live, state=TrialState.FAIL)
    assert sweep.main(argv + ["--overwrite"]) == 0
    again = _study(f"sqlite:///{out / 'sweep.db'}", "o").trials
    assert len(again) == 1 and again[0].datetime_complete > first  # run afresh, not resumed
    assert (out / ".rankalloc_sweep").is_file() and not (tmp_path / "s.replaced").exists()


def test_studies_that_share_a_folder_keep_each_other_and_their_search(tmp_path, capsys, monkeypatch):
    out = tmp_path / "s"
    base = SMALL + ["--budgets", "7k", "--out", str(out)]
    assert sweep.main(base + ["--study-name", "a", "--overwrite"]) == 0
    assert "--overwrite" not in json.loads((out / "sweep.json").read_text())["command"]  # rerunning it resumes
    assert json.loads((out / "shared_search.json").read_text())["path"] == "search"  # relative to the folder
    assert sweep.main(base + ["--study-name", "b"]) == 0  # the same search, reused
    capsys.readouterr()
    assert sweep.main(base + ["--study-name", "b", "--overwrite"]) == 2
    assert "also holds the study a, which replacing the folder would delete" in capsys.readouterr().err
    storage = f"sqlite:///{out / 'sweep.db'}"
    assert len(_study(storage, "a").trials) == 1 and (out / "trials" / "a").is_dir()
    assert sweep.main(base + ["--study-name", "c", "--search.r_max", "2"]) == 2  # not silently the search's 4
    assert "ran with --search.r_max 4, not 2" in capsys.readouterr().err
    moved = tmp_path / "mounted-elsewhere"
    out.rename(moved)
    monkeypatch.chdir(tmp_path)
    assert sweep.main(SMALL + ["--budgets", "7k", "--out", moved.name, "--study-name", "a"]) == 0
    assert len(_study(f"sqlite:///{moved / 'sweep.db'}", "a").trials) == 1  # resumed, nothing rerun
    (moved / "shared_search.json").unlink()  # killed after the search finished, before its record
    assert sweep.main(SMALL + ["--budgets", "7k", "--out", moved.name, "--study-name", "a"]) == 0
    assert (moved / "shared_search.json").is_file()


def test_a_storage_file_inside_a_new_out_folder(tmp_path):
    out = tmp_path / "new"
    assert sweep.main(SMALL + ["--budgets", "7k", "--out", str(out), "--storage", f"journal:{out / 'study.log'}",
                               "--study-name", "j"]) == 0
    assert (out / "study.log").is_file() and (out / "pareto.md").is_file()


def test_changed_settings_are_refused_on_resume(sqlite_sweep, capsys):
    out, argv = sqlite_sweep
    code = sweep.main(argv + ["--train.lr", "0.0123"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert f"study 't3' was run with --train.lr {TrainParams().lr!r}, not 0.0123" in err[-1]


def test_a_sweep_the_shared_search_cannot_serve_leaves_no_study_behind(sqlite_sweep, capsys):
    """Refused over the shared search already in the folder (other settings, or a budget it cannot be
    exported at), a new study name must not be left in the storage: it would lock in the refused settings
    and block --overwrite of the folder."""
    import optuna

    out, argv = sqlite_sweep
    for extra, fragment in [(["--study-name", "other", "--max-steps", "3"], "was run with other max_steps settings"),
                            (["--study-name", "third", "--budgets", "7k,14k,900k"], "cannot be exported from the "
                                                                                    "shared search")]:
        assert sweep.main(argv + extra) == 2
        assert fragment in capsys.readouterr().err
    assert optuna.get_all_study_names(f"sqlite:///{out / 'sweep.db'}") == ["t3"]


# --------------------------------------------------------------------------------------------------
# Storages
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("url, fragment", [
    ("sqlite:////nonexistent-folder/sweep.db", "cannot open it"),
    ("redis://localhost:6379/0", "not a storage URL"),
    ("postgresql://someone:s3cret@127.0.0.1:1/db", "cannot open it"),
    ("journal:/nonexistent-folder/sweep.log", "cannot open it"),
    ("journal:", "no file named after journal:"),
    ("sqlite://", "an in-memory database ends with this process"),
    ("sqlite:///:memory:", "an in-memory database ends with this process"),
])
def test_a_storage_that_cannot_be_opened_is_refused_in_one_line(tmp_path, capsys, url, fragment):
    out = tmp_path / "s"
    code = sweep.main(SMALL + ["--budgets", "7k", "--storage", url, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("rankalloc sweep: error: --storage"), err
    assert fragment in err and "allowed: sqlite:///" in err and "s3cret" not in err
    assert not out.exists()


def test_workers_starting_together_on_a_new_sqlite_file_all_open_it(tmp_path):
    """Several workers on one machine may share SQLite; those that lose the race to create optuna's tables
    (SQLite says 'table ... already exists' or 'database is locked') retry instead of dying."""
    script = ("import sys, time; from pathlib import Path; from rankalloc.config import SweepConfig; "
              "from rankalloc.sweep_study import open_storage; "
              "time.sleep(max(0.0, float(sys.argv[1]) - time.time())); "
              "open_storage(SweepConfig(budgets=['7k'], storage=sys.argv[2]), Path(sys.argv[3])); print('opened')")
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.time() + 6  # every process imports optuna first, then all open at the same moment
    procs = [subprocess.Popen([sys.executable, "-c", script, str(start), url, str(tmp_path)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0 and "opened" in out, err[-2000:]


def test_journal_trial_of_a_dead_worker_is_failed_and_retried(tmp_path):
    """A journal file has no heartbeats: a running trial whose process is gone is failed and requeued."""
    import optuna
    from optuna.trial import TrialState

    cfg, _ = parse_args(SweepConfig, ["--budgets", "7k", "--storage", f"journal:{tmp_path / 'j.log'}"], "t", "")
    study = sweep_study.open_study(cfg, sweep_study.open_storage(cfg, tmp_path), tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial = study.ask({"budget": optuna.distributions.IntDistribution(1, 10**13, log=True)})
    trial.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")
    alive = study.ask()
    alive.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    sweep_study.recover_crashed(study, cfg)
    states = {t.number: t.state for t in study.trials}
    assert states[trial.number] == TrialState.FAIL and states[alive.number] == TrialState.RUNNING
    retry = [t for t in study.trials if t.state == TrialState.WAITING]
    assert len(retry) == 1 and retry[0].system_attrs["failed_trial"] == trial.number
    assert retry[0].params == {"budget": trial.params["budget"]}


def test_a_trial_killed_before_its_first_heartbeat_is_failed_and_retried(tmp_path, monkeypatch):
    """optuna's stale-trial check skips a trial that never sent a heartbeat: a worker killed right after
    creating one would hold its point forever.  No worker recorded for longer than --grace_period: dead."""
    import optuna
    from optuna.trial import TrialState

    cfg, _ = parse_args(SweepConfig, ["--budgets", "7k", "--heartbeat_interval", "1", "--grace_period", "2"], "t", "")
    study = sweep_study.open_study(cfg, sweep_study.open_storage(cfg, tmp_path), tmp_path)
    orphan = study.ask({"budget": optuna.distributions.IntDistribution(1, 10**13, log=True)})
    sweep_study.recover_crashed(study, cfg)  # a first look: too young to be dead
    assert study.trials[orphan.number].state == TrialState.RUNNING
    time.sleep(2.5)
    fresh = study.ask()  # just created by a live worker: not yet its first line
    seen_by_another_worker = study.get_trials(deepcopy=True, states=(TrialState.RUNNING,))
    sweep_study.recover_crashed(study, cfg)
    states = {t.number: t.state for t in study.trials}
    assert states[orphan.number] == TrialState.FAIL and states[fresh.number] == TrialState.RUNNING
    retry = [t for t in study.trials if t.state == TrialState.WAITING]
    assert len(retry) == 1 and retry[0].system_attrs["failed_trial"] == orphan.number
    # a second waiting worker that listed the trial as running before the first one failed it
    monkeypatch.setattr(study, "get_trials", lambda deepcopy=False, states=None: seen_by_another_worker)
    sweep_study.recover_crashed(study, cfg)  # does not crash on the already-failed trial
    monkeypatch.undo()
    assert len([t for t in study.trials if t.state == TrialState.WAITING]) == 1


def test_a_worker_killed_right_after_marking_its_trial_is_failed_by_its_heartbeat(tmp_path, monkeypatch):
    """optuna's heartbeat thread may send its first beat after the objective marks the trial with its worker.
    A worker killed between the two left a trial that was neither stale (no heartbeat) nor an orphan (a
    worker recorded), holding its point forever: the objective beats before it marks."""
    from optuna.trial import TrialState

    cfg, _ = parse_args(SweepConfig, ["--budgets", "7k", "--heartbeat_interval", "1", "--grace_period", "2"], "t", "")
    study = sweep_study.open_study(cfg, sweep_study.open_storage(cfg, tmp_path), tmp_path)
    trial = study.ask()  # no heartbeat thread: the worst case, its first beat never came

    class Killed(Exception):
        pass

    def mark_then_die(key, value, mark=trial.set_user_attr):
        mark(key, value)
        if key == "worker":
            raise Killed

    monkeypatch.setattr(trial, "set_user_attr", mark_then_die)
    with pytest.raises(Killed):
        sweep.Sweep(cfg, tmp_path, [7000], [("uniform", 7000)], None).objective(trial)
    assert study.trials[trial.number].user_attrs["worker"]
    time.sleep(3)
    sweep_study.recover_crashed(study, cfg)
    assert study.trials[trial.number].state == TrialState.FAIL


def test_an_orphan_stamped_in_another_time_zone_is_not_failed_at_first_sight(tmp_path, monkeypatch):
    """optuna's SQL storages stamp a trial's start in the creating machine's local time, with no zone.  A
    worker whose clock reads that stamp three hours off must not fail a trial that has just started;
    beyond any time-zone gap (27 hours) the stamp alone says the trial is dead.  A lock held by another
    worker while failing one is not an error: the next look decides."""
    import datetime

    from optuna.exceptions import StorageInternalError
    from optuna.trial import TrialState

    cfg, _ = parse_args(SweepConfig, ["--budgets", "7k", "--heartbeat_interval", "1", "--grace_period", "2"], "t", "")
    study = sweep_study.open_study(cfg, sweep_study.open_storage(cfg, tmp_path), tmp_path)
    young, old = study.ask(), study.ask()
    real_get_trials = study.get_trials

    def stamped(hours_ago):
        def get_trials(deepcopy=False, states=None):
            trials = real_get_trials(deepcopy=True, states=states)
            for t in trials:
                if t.number == old.number:
                    t.datetime_start = datetime.datetime.now() - datetime.timedelta(hours=hours_ago)
                if t.number == young.number:
                    t.datetime_start = datetime.datetime.now() - datetime.timedelta(hours=3)
            return trials
        return get_trials

    monkeypatch.setattr(study, "get_trials", stamped(27))
    real_set = study._storage.set_trial_state_values

    def locked(*args, **kwargs):
        raise StorageInternalError("database is locked")

    monkeypatch.setattr(study._storage, "set_trial_state_values", locked)
    sweep_study.recover_crashed(study, cfg)  # both stay running, no error
    monkeypatch.setattr(study._storage, "set_trial_state_values", real_set)
    sweep_study.recover_crashed(study, cfg)
    monkeypatch.undo()
    states = {t.number: t.state for t in study.trials}
    assert states[old.number] == TrialState.FAIL and states[young.number] == TrialState.RUNNING


# --------------------------------------------------------------------------------------------------
# PostgreSQL: two worker processes on one study; one killed mid-trial
# --------------------------------------------------------------------------------------------------
def _pg_reachable() -> str | None:
    if not PG_URL:
        return "RANKALLOC_TEST_PG_URL is not set (run: eval \"$(bash .ci/postgres.sh)\")"
    try:
        import sqlalchemy

        with sqlalchemy.create_engine(PG_DB, connect_args={"connect_timeout": 5}).connect():
            return None
    except Exception as e:  # driver missing or server down
        return f"PostgreSQL at RANKALLOC_TEST_PG_URL cannot be reached: {str(e).splitlines()[0]}"


pg = pytest.mark.skipif(_pg_reachable() is not None, reason=str(_pg_reachable()))
PG_ARGS = ["--heartbeat_interval", "1", "--grace_period", "15", "--baseline", "uniform"]  # a grace two cores
# under load cannot outlast while a live worker's heartbeat waits for the CPU


def _worker(out: Path, study: str, budgets: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    argv = [sys.executable, "-m", "rankalloc.sweep", *SMALL, *PG_ARGS, "--budgets", budgets, "--storage", PG_URL,
            "--study-name", study, "--out", str(out)]
    return subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO, env=env)


def _finish(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 240) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for p, log in zip(procs, logs):
        try:
            codes.append(p.wait(timeout=max(1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"sweep workers did not finish in {timeout} s; log:\n" + log.read_text()[-3000:])
    return codes


@pytest.fixture(scope="module")
def pg_out(tmp_path_factory):
    """One sweep folder for the PostgreSQL studies: the second one reuses the first one's shared search."""
    return tmp_path_factory.mktemp("pg") / "sweep"


@pg
def test_two_workers_share_one_postgres_study(pg_out, tmp_path):
    import optuna
    from optuna.trial import TrialState

    name = f"two-{uuid.uuid4().hex[:8]}"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_worker(pg_out, name, "7k,14k", log) for log in logs]
    codes = _finish(procs, logs)
    assert codes == [0, 0], "\n".join(log.read_text()[-2000:] for log in logs)
    study = _study(PG_DB, name)
    done = _complete(study)
    assert sorted(done) == [("rankalloc", 7000), ("rankalloc", 14000), ("uniform", 7000), ("uniform", 14000)]
    assert all(len(numbers) == 1 for numbers in done.values()), done  # none twice
    assert not [t for t in study.trials if t.state == TrialState.FAIL]
    assert "shared search at" in "".join(log.read_text() for log in logs)  # run by one worker, reused by the other
    optuna.delete_study(study_name=name, storage=PG_DB)


@pg
def test_a_worker_killed_mid_trial_is_retried_by_the_other(pg_out, tmp_path):
    import optuna
    from optuna.trial import TrialState

    name = f"kill-{uuid.uuid4().hex[:8]}"
    logs = [tmp_path / "victim.log", tmp_path / "survivor.log"]
    # the victim starts alone, so that it surely holds a trial (a survivor started with it could finish all
    # six first on a slow machine); the survivor joins once the victim is dead, its trial still RUNNING
    victim = _worker(pg_out, name, "7k,14k,28k", logs[0])
    killed = None
    deadline = time.time() + 120
    while killed is None and time.time() < deadline and victim.poll() is None:
        time.sleep(0.2)
        victim.send_signal(signal.SIGSTOP)  # frozen: a trial it holds as running now is one it is inside of
        try:
            trials = _study(PG_DB, name).get_trials(states=(TrialState.RUNNING,))
        except KeyError:  # the study is not created yet
            trials = []
        mine = [t for t in trials if t.user_attrs.get("worker", "").endswith(f":{victim.pid}")]
        if mine:
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            killed = mine[0].number
        else:
            victim.send_signal(signal.SIGCONT)
    assert killed is not None, "the victim never ran a trial:\n" + logs[0].read_text()[-2000:]
    survivor = _worker(pg_out, name, "7k,14k,28k", logs[1])
    assert _finish([survivor], logs[1:]) == [0], logs[1].read_text()[-3000:]
    study = _study(PG_DB, name)
    states = {t.number: t.state for t in study.trials}
    assert states[killed] == TrialState.FAIL
    done = _complete(study)
    assert len(done) == 6 and all(len(numbers) == 1 for numbers in done.values()), done
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert [t.state for t in retried] == [TrialState.COMPLETE]
    assert retried[0].user_attrs["worker"].endswith(f":{survivor.pid}")
    optuna.delete_study(study_name=name, storage=PG_DB)
