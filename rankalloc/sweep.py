"""Budget-versus-accuracy studies: ``python -m rankalloc.sweep --budgets 41k,83k,166k,332k``.

A sweep is an optuna study with two objectives, adapter parameters (down) and the task family's metric
on the evaluation split (up: accuracy for classification, Pearson for regression, ...).  Each trial is one point ``(method, budget)``:

* ``rankalloc`` - by default every budget is *re-exported* from one shared search (run once, before
  the trials, under a file lock so that concurrent workers wait for it instead of repeating it), then
  retrained; with ``--shared_search false`` or ``--tune`` each trial runs its own search;
* baselines (``--baseline uniform``) - retrained at the same budgets with the same recipe.

Without ``--tune`` the points form a grid, sampled by :class:`PointGrid` (optuna's GridSampler that
counts a point as taken when any trial of the study holds it, so resumed studies and concurrent
workers never rerun a point; a trial that still lands on a taken point is skipped before any work and
marked pruned, with ``duplicate_of``).  With ``--tune`` a multi-objective TPE sampler also picks
search hyperparameters, one search per trial.

Workers: every process started with the same ``--storage`` and ``--study-name`` joins the study.  In an
RDB storage (SQLite, PostgreSQL, MySQL) a running trial sends heartbeats; one that stays silent past
``--grace_period`` is failed and retried by another worker (``RetryHeartbeatStaleTrialCallback``).  A
journal file has no heartbeats: there a trial whose worker process on this machine is gone is failed
and retried.  On both, a trial whose worker died before its first line (no worker recorded) is failed
and retried once a waiting worker has seen it so for ``--grace_period`` (optuna stamps starts without a
time zone, so a stamp is trusted only when it is over a day old).  A worker ends when every point is
complete, waiting meanwhile for points that other workers are running.

Outputs in ``--out``: ``pareto.csv``/``pareto.md`` (the non-dominated trials of each method, with the
commands that reproduce each point), ``trials.csv``, ``pareto.png``, ``sweep.json`` (timings),
``optuna_*.html`` when plotly is installed, and ``trials/<study>/<number>-<method>-<budget>/``.

This module is the stage and its worker loop; storages, the study, the grid and crash recovery are in
:mod:`rankalloc.sweep_study`, budgets, commands and the shared search in :mod:`rankalloc.sweep_shared`,
the reports in :mod:`rankalloc.sweep_report`, and the guards of ``--out``/``--overwrite`` in
:mod:`rankalloc.sweep_folder`.
"""
from __future__ import annotations

import copy
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import rundir
from .budget import MAX_ABSOLUTE
from .config import GATE_EVERY_TUNE_MAX, ExportConfig, RetrainConfig, SearchConfig, SweepConfig, with_data_defaults
from .errors import BudgetError, ConfigError, RankallocError
from .flags import checked_copy, stage_command
from .sweep_report import sweep_summary, write_reports
from .sweep_folder import (SWEEP_MARKER, file_storage_inside, overwrite_sweep_folder,
                           refuse_a_folder_of_another_kind, safe_name)
from .sweep_shared import SharedSearch, check_shared_budgets, check_shared_search, parse_budgets, run_shared_search
from .sweep_study import (METHODS, RANKALLOC, check_study_exists, duplicate_of, make_grid_sampler, open_storage,
                          open_study, point_of, quiet_optuna, recover_crashed, storage_file, storage_name)
from .tasks import check_task_source

logger = logging.getLogger(__name__)

# --tune: the search hyperparameters and the ranges a trial samples them from
TUNE_SPACE = {
    "weight_lr": ("float", 3e-4, 3e-3),    # default 1e-3
    "gate_lr": ("float", 0.01, 0.2),       # default 0.05
    "r_max": ("int", 4, 64),               # default: automatic from the budget
    "gate_every": ("int", 1, GATE_EVERY_TUNE_MAX),  # default 1
    "temperature": ("float", 0.25, 1.0),   # gate temperature, default 0.5
}


@dataclass
class SweepResult:
    out: Path
    rows: list[dict[str, Any]]        # every complete trial, with front flags
    summary: dict[str, Any]


# --------------------------------------------------------------------------------------------------
# One trial
# --------------------------------------------------------------------------------------------------
@dataclass
class Sweep:
    """What a worker needs to run trials."""

    cfg: SweepConfig
    out: Path
    budgets: list[int]
    points: list[tuple[str, int]]       # the grid: every (method, budget) that must end up complete
    shared: SharedSearch | None
    tune_total: int = 0                 # --tune: tuned trials the study should hold
    ran: int = 0                        # trials this worker ran (duplicates skipped not counted)
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    def objective(self, trial: Any) -> tuple[float, float]:
        import optuna

        cfg = self.cfg
        if cfg.tune:
            budget = int(trial.suggest_categorical("budget", self.budgets))
            method = trial.user_attrs.get("method", RANKALLOC)
        else:
            budget = trial.suggest_int("budget", 1, MAX_ABSOLUTE, log=True)
            method = trial.suggest_categorical("method", METHODS)
        trial.set_user_attr("method", method)
        trial.set_user_attr("budget", budget)
        storage = trial.study._storage
        if getattr(storage, "get_heartbeat_interval", lambda: None)():  # beat before the worker mark: optuna's
            # heartbeat thread may write its first beat after it, and a trial with a worker but no heartbeat
            # is neither stale to optuna nor an orphan to recover_crashed, so a worker killed between them
            # would hold its point forever
            storage.record_heartbeat(trial._trial_id)
        trial.set_user_attr("worker", self.worker)
        if not cfg.tune or method != RANKALLOC:  # a grid point: run once in the whole study
            dup = duplicate_of(trial.study, trial.number, (method, budget))
            if dup is not None:
                trial.set_user_attr("duplicate_of", dup)
                logger.info("trial %d: %s at %s is held by trial %d; skipped", trial.number, method,
                            f"{budget:,}", dup)
                raise optuna.TrialPruned(f"duplicate of trial {dup}")
        self.ran += 1
        # trial numbers count per study, and several studies may share one folder (and its shared search)
        folder = self.out / "trials" / safe_name(cfg.study_name) / f"{trial.number:04d}-{method}-{budget}"
        logger.info("trial %d: %s at %s parameters -> %s", trial.number, method, f"{budget:,}", folder)
        t0 = time.time()
        commands, timings = [], {}
        if method == RANKALLOC:
            search_params = copy.deepcopy(cfg.search)
            for name in cfg.tune or []:
                kind, lo, hi = TUNE_SPACE[name]
                value = (trial.suggest_float(name, lo, hi, log=True) if kind == "float"
                         else trial.suggest_int(name, lo, hi, log=name == "r_max"))
                setattr(search_params, name, value)
            try:
                rank_map, commands = self._rank_map(budget, folder, search_params, timings)
            except BudgetError as e:
                if not cfg.tune:
                    raise
                trial.set_user_attr("pruned_reason", str(e))  # a tuned r_max too small for the budget
                raise optuna.TrialPruned(str(e)) from None
            retrain_cfg = self._retrain_config(folder, rank_map=str(rank_map))
        else:
            retrain_cfg = self._retrain_config(folder, baseline=method, budget=str(budget))
        from .retrain import run_retrain

        command = stage_command("retrain", retrain_cfg)
        t = time.time()
        result = run_retrain(retrain_cfg, command)
        timings["retrain_s"] = time.time() - t
        timings["trial_s"] = time.time() - t0
        m = result.metrics
        attrs = {"metric": m["metric"], "score": m["score"], "accuracy": m.get("accuracy"),
                 "macro_f1": m.get("macro_f1"), "eval_loss": m["eval_loss"],
                 "adapter_params": m["adapter_params"], "budget_used": m["budget_used"],
                 "rank_map": str(rank_map) if method == RANKALLOC else str(result.out / "rank_map.json"),
                 "adapter": str(result.out / "adapter"), "metrics": str(result.out / "metrics.json"),
                 "commands": commands + [command], "wall_time_s": timings}
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        logger.info("trial %d: %s at %s: %s adapter parameters, %s %.4f (%.0f s)", trial.number, method,
                    f"{budget:,}", f"{m['adapter_params']:,}", m["metric"], m["score"], timings["trial_s"])
        return float(m["adapter_params"]), float(m["score"])  # the task family's metric (accuracy, ...)

    def _rank_map(self, budget: int, folder: Path, params: Any, timings: dict[str, float]) -> tuple[Path, list[str]]:
        """Re-export from the shared search, or run a search of this trial's own."""
        cfg = self.cfg
        t = time.time()
        if self.shared is not None:
            from .export import run_export

            export_cfg = ExportConfig(run=self.shared.path, budget=str(budget), out=str(folder / "export"),
                                      overwrite=True)
            out, _ = run_export(export_cfg)
            timings["export_s"] = time.time() - t
            return out / "rank_map.json", [self.shared.command, stage_command("export", export_cfg)]
        from .search import run_search

        search_cfg = SearchConfig(budget=str(budget), seed=cfg.seed, device=cfg.device, out=str(folder / "search"),
                                  max_steps=cfg.max_steps, overwrite=True, model=copy.deepcopy(cfg.model),
                                  data=copy.deepcopy(cfg.data), search=params)
        command = stage_command("search", search_cfg)
        result = run_search(search_cfg, command)
        timings["search_s"] = time.time() - t
        return result.out / "rank_map.json", [command]

    def _retrain_config(self, folder: Path, **what: Any) -> RetrainConfig:
        cfg = self.cfg
        return RetrainConfig(seed=cfg.seed, device=cfg.device, out=str(folder / "retrain"), max_steps=cfg.max_steps,
                             overwrite=True, model=copy.deepcopy(cfg.model), data=copy.deepcopy(cfg.data),
                             train=copy.deepcopy(cfg.train), **what)


# --------------------------------------------------------------------------------------------------
# The worker loop
# --------------------------------------------------------------------------------------------------
def run_worker(study: Any, sweep: Sweep) -> None:
    """Run trials until every point is complete (and, with --tune, enough tuned trials are), waiting
    for points that other workers hold; crashed trials of other workers are failed and retried."""
    from optuna.trial import TrialState

    cfg = sweep.cfg
    waiting_for: set[int] = set()
    while True:
        recover_crashed(study, cfg)
        trials = study.get_trials(deepcopy=False)
        complete = {point_of(t) for t in trials if t.state == TrialState.COMPLETE}
        todo = [p for p in sweep.points if p not in complete]
        tuned = _tuned(trials, (TrialState.COMPLETE,)) if cfg.tune else 0
        tune_left = sweep.tune_total - tuned if cfg.tune else 0  # the sweep ends when none is left
        # a tuned trial running (or queued for retry) elsewhere is not started again here: no overshoot
        tune_free = tune_left - _tuned(trials, (TrialState.RUNNING, TrialState.WAITING)) if cfg.tune else 0
        if not todo and tune_left <= 0:
            logger.info("sweep complete: %d point(s)%s", len(sweep.points),
                        f" and {tuned} tuned trial(s)" if cfg.tune else "")
            return
        if cfg.n_trials is not None and not cfg.tune and sweep.ran >= cfg.n_trials:
            logger.info("--n-trials %d reached; %d point(s) left to other runs", cfg.n_trials, len(todo))
            return
        held = {point_of(t): t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)}
        free = [p for p in todo if p not in held]
        queued = any(t.state == TrialState.WAITING for t in trials)
        if not free and not queued and tune_free <= 0:
            running = {t.number for t in held.values()}
            if running != waiting_for:
                logger.info("waiting for %d trial(s) running in other workers: %s", len(running),
                            ", ".join(f"#{t.number} " + (f"{p[0]}@{p[1]:,}" if p else "(no point yet)")
                                      + f" ({t.user_attrs.get('worker', '?')})" for p, t in held.items()))
                waiting_for = running
            time.sleep(cfg.poll_interval)
            continue
        if cfg.tune:
            for method, budget in free:
                if method != RANKALLOC:
                    study.enqueue_trial({"budget": budget}, user_attrs={"method": method})
        with quiet_optuna():
            study.optimize(sweep.objective, n_trials=1, gc_after_trial=True)


def _tuned(trials: list[Any], states: tuple[Any, ...]) -> int:
    """How many of ``trials`` in ``states`` are tuned rankalloc trials (not baseline points)."""
    return sum(1 for t in trials if t.state in states and (point_of(t) or (RANKALLOC,))[0] == RANKALLOC)


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------
def run_sweep(cfg: SweepConfig, command: str | None = None) -> SweepResult:
    """Join (or create) the study, run trials until every point is complete, write the reports.

    Raises:
        RankallocError: bad budgets, storage, settings or data (one-line messages).
    """
    t0 = time.time()
    cfg = checked_copy(cfg, SweepConfig)  # built in Python: the command line's types and checks, on a copy
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("a sweep does not run under torchrun: its workers are separate processes that share "
                          "--storage (start one per GPU, e.g. CUDA_VISIBLE_DEVICES=N python -m rankalloc.sweep ...)")
    command = command or stage_command("sweep", cfg)
    cfg.data = with_data_defaults(cfg.data)  # after the command, which says what was asked
    budgets = parse_budgets(cfg.budgets or [])
    out = Path(cfg.out) if cfg.out else Path("runs") / f"sweep-{safe_name(cfg.study_name)}"
    rundir.check_out_path(out)
    _check_baseline_points(cfg, budgets)  # every check that needs no study comes before --overwrite acts
    if cfg.shared_search and not cfg.tune:
        check_shared_budgets(cfg, budgets)
    check_task_source(cfg.data)  # a mistyped --task is refused before anything is made or replaced
    if not cfg.overwrite:
        refuse_a_folder_of_another_kind(cfg, out)
    if cfg.resume and cfg.storage is None and not (out / "sweep.db").is_file():
        raise ConfigError(f"--resume: no study {cfg.study_name!r} in {out} (it holds no sweep.db)")
    if cfg.resume and cfg.storage is not None and storage_file(cfg.storage) and not storage_file(cfg.storage).is_file():
        raise ConfigError(f"--resume: --storage {cfg.storage} does not exist, so it holds no study to join")
    if cfg.overwrite:
        overwrite_sweep_folder(cfg, out)
    new_folder = not out.exists()
    try:
        if cfg.storage is None or file_storage_inside(cfg.storage, out):
            out.mkdir(parents=True, exist_ok=True)  # the SQLite or journal file lives in it
        storage = open_storage(cfg, out)  # a storage that cannot be opened is refused before anything is made
        if cfg.resume:
            check_study_exists(cfg, storage, out)
    except RankallocError:
        if new_folder and out.is_dir() and not any(out.iterdir()):  # a refused sweep leaves no folder behind
            out.rmdir()  # (only an empty one: a worker started alongside may already use it)
        raise
    if cfg.shared_search and not cfg.tune:
        check_shared_search(cfg, out, budgets)  # before the study is made: a refused sweep leaves none behind
    out.mkdir(parents=True, exist_ok=True)
    (out / SWEEP_MARKER).touch()
    study = open_study(cfg, storage, out)
    methods = ([] if cfg.tune else [RANKALLOC]) + list(cfg.baseline or [])
    points = [(m, b) for m in methods for b in budgets]
    _check_budget_distribution(study, cfg, budgets)
    shared = None
    if cfg.tune:
        logger.info("tuning %s: one search per trial", ", ".join(cfg.tune))
    elif cfg.shared_search:
        shared = run_shared_search(cfg, out, budgets)
    sweep = Sweep(cfg, out, budgets, points, shared,
                  tune_total=(cfg.n_trials or 4 * len(budgets)) if cfg.tune else 0)
    if cfg.tune:
        from optuna.samplers import TPESampler

        study.sampler = TPESampler(seed=(cfg.seed * 100_003 + os.getpid()) % 2**32, constant_liar=True,
                                   n_startup_trials=min(10, max(2, sweep.tune_total // 3)))
    else:
        study.sampler = make_grid_sampler(points, cfg.seed)
    logger.info("sweep %r in %s: %d point(s) (%s) at budgets %s; worker %s; out %s", cfg.study_name,
                storage_name(cfg, out), len(points), ", ".join(methods) or "tuned only",
                ", ".join(f"{b:,}" for b in budgets), sweep.worker, out)
    run_worker(study, sweep)
    summary = sweep_summary(study, sweep, cfg, out, t0, command)
    rows = write_reports(study, sweep, summary)
    rundir.drop_replaced(out)  # the sweep --overwrite replaced, kept until now
    logger.info("pareto front: %s (plot %s)", out / "pareto.md", out / "pareto.png")
    return SweepResult(out, rows, summary)


def _check_baseline_points(cfg: SweepConfig, budgets: list[int]) -> None:
    """Every baseline must fit every budget (uniform needs rank 1 everywhere): refuse before any trial, or a
    sweep would stop at its first unfit point after the others ran, and stop there again on every rerun."""
    if not cfg.baseline:
        return
    from .baselines import check_baseline_budget
    from .models import skeleton_targets

    targets = skeleton_targets(cfg.model)
    for method in cfg.baseline:
        for budget in budgets:
            try:
                check_baseline_budget(method, targets, budget, cfg.train)
            except BudgetError as e:
                raise BudgetError(f"--baseline {method} cannot run at the sweep's budget {budget:,}: {e}") from None


def _check_budget_distribution(study: Any, cfg: SweepConfig, budgets: list[int]) -> None:
    """A grid study keeps budgets as integers, a tuned one as a fixed list: refuse mixing them."""
    from optuna.distributions import CategoricalDistribution, IntDistribution, check_distribution_compatibility

    mine = (CategoricalDistribution(budgets) if cfg.tune else IntDistribution(1, MAX_ABSOLUTE, log=True))
    for t in study.get_trials(deepcopy=False):
        if "budget" in t.distributions:
            try:
                check_distribution_compatibility(t.distributions["budget"], mine)
            except ValueError:
                kind = "a fixed budget list (--tune)" if isinstance(t.distributions["budget"],
                                                                    CategoricalDistribution) else "a budget grid"
                raise ConfigError(f"study {cfg.study_name!r} holds {kind} of other budgets; a tuned study keeps "
                                  "its --budgets list: use another --study-name") from None
            return


DESCRIPTION = """An optuna study of adapter parameters versus accuracy over budgets (and baselines).

Every process started with the same --storage and --study-name joins the study as a worker; a
finished point is never rerun, and a rerun of the same command resumes the study.

examples:
  python -m rankalloc.sweep --config configs/sweep/default.yaml
  python -m rankalloc.sweep --budgets 42k:400k:4 --baseline uniform --out runs/sweep   # uniform needs >= 41,472
  python -m rankalloc.sweep --budgets 41k,166k --storage postgresql://user:pw@db/rankalloc --study-name s1
"""


def cli(argv: list[str] | None = None) -> int:
    from .cli import command_line
    from .flags import parse_args

    cfg, _ = parse_args(SweepConfig, argv, "rankalloc sweep", DESCRIPTION)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own log lines say what each trial did
    # rerunning the recorded command resumes the study; with --overwrite it would replace it
    result = run_sweep(cfg, command_line("sweep", argv, without=("--overwrite", "--resume")))
    front = [r for r in result.rows if r["front"]]
    print(f"pareto front: {len(front)} of {len(result.rows)} trial(s) -> {result.out / 'pareto.md'} "
          f"(plot {result.out / 'pareto.png'}, table {result.out / 'pareto.csv'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .cli import run_stage

    return run_stage("sweep", argv)


if __name__ == "__main__":
    sys.exit(main())
