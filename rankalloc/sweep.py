"""Budget-versus-accuracy studies: ``python -m rankalloc.sweep --budgets 41k,83k,166k,332k``.

A sweep is an optuna study with two objectives, adapter parameters (down) and evaluation accuracy
(up).  Each trial is one point ``(method, budget)``:

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
and retried.  A worker ends when every point is complete, waiting meanwhile for points that other
workers are running.

Outputs in ``--out``: ``pareto.csv``/``pareto.md`` (the non-dominated trials of each method, with the
commands that reproduce each point), ``trials.csv``, ``pareto.png``, ``sweep.json`` (timings),
``optuna_*.html`` when plotly is installed, and ``trials/<study>/<number>-<method>-<budget>/``.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import fcntl
import io as _io
import json
import logging
import math
import os
import shlex
import shutil
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from . import io
from .budget import MAX_ABSOLUTE, auto_r_max, check_budget, parse_budget
from .config import (SHORT_FLAGS, ExportConfig, RetrainConfig, SearchConfig, SweepConfig, _walk_fields,
                     to_dict)
from .errors import BudgetError, ConfigError, RunDirError

logger = logging.getLogger(__name__)

RANKALLOC = "rankalloc"
METHODS = (RANKALLOC, "uniform", "adalora")  # choices of the "method" parameter; fixed for every study
OBJECTIVES = ("adapter_params", "accuracy")
DIRECTIONS = ("minimize", "maximize")
ALLOWED_STORAGE = ("sqlite:///FILE.db, postgresql://USER:PASSWORD@HOST[:PORT]/DB, mysql://USER:PASSWORD@HOST/DB, "
                   "or journal:FILE (also a path ending in .log or .jsonl) for several processes on one machine")
SHARED_SEARCH_FILE = "shared_search.json"
# --tune: the search hyperparameters and the ranges a trial samples them from
TUNE_SPACE = {
    "weight_lr": ("float", 3e-4, 3e-3),    # default 1e-3
    "gate_lr": ("float", 0.01, 0.2),       # default 0.05
    "r_max": ("int", 4, 64),               # default: automatic from the budget
    "gate_every": ("int", 1, 4),           # default 1
    "temperature": ("float", 0.25, 1.0),   # hard-concrete beta, default 0.5
}


@dataclass
class SweepResult:
    out: Path
    rows: list[dict[str, Any]]        # every complete trial, with front flags
    summary: dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Budgets and commands
# --------------------------------------------------------------------------------------------------
def parse_budgets(items: list[str]) -> list[int]:
    """``["41k", "83k"]`` or ``["40k:400k:4"]`` (N log-spaced budgets from LO to HI) -> sorted parameter counts.

    Raises:
        BudgetError: an unparsable budget or range, or a percentage (a sweep's axis is parameter counts).
    """
    out: set[int] = set()
    for item in items:
        parts = str(item).split(":")
        if len(parts) == 3:
            lo, hi, n = _absolute(parts[0], item), _absolute(parts[1], item), parts[2].strip()
            if not n.isdigit() or int(n) < 1 or lo >= hi and int(n) > 1:
                raise BudgetError(f"--budgets {item}: a range is LO:HI:N with LO < HI and N >= 1 budgets, "
                                  "e.g. 40k:400k:4")
            n = int(n)
            out.update(lo if n == 1 else round(lo * (hi / lo) ** (i / (n - 1))) for i in range(n))
        elif len(parts) == 1:
            out.add(_absolute(parts[0], item))
        else:
            raise BudgetError(f"--budgets {item!r}: give budgets (41k,83k) or a range LO:HI:N (40k:400k:4)")
    return sorted(out)


def _absolute(text: str, item: str) -> int:
    spec = parse_budget(text)
    if spec.percent:
        raise BudgetError(f"--budgets {item}: give parameter counts (500k, 0.5M), not a share of the model")
    return int(spec.value)


def stage_command(stage: str, cfg: Any) -> str:
    """The command line that runs ``stage`` with exactly ``cfg``: every field that differs from the
    stage's defaults, as a flag (``--overwrite``/``--resume`` left out)."""
    default = type(cfg)()
    short = {v: k for k, v in SHORT_FLAGS.items()}
    args = []
    for dotted, _tp, _f in _walk_fields(type(cfg)):
        value, base = _get(cfg, dotted), _get(default, dotted)
        if value == base or dotted in ("overwrite", "resume"):
            continue
        if isinstance(value, list):
            text = ",".join(str(v) for v in value)
        elif value is None:
            text = "null"
        else:
            text = str(value).lower() if isinstance(value, bool) else str(value)
        args += [short.get(dotted, f"--{dotted}"), text]
    return f"python -m rankalloc.{stage} " + " ".join(shlex.quote(a) for a in args)


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------------------------------
# Storages and the study
# --------------------------------------------------------------------------------------------------
def open_storage(cfg: SweepConfig, out: Path) -> Any:
    """The optuna storage named by ``--storage`` (default: SQLite in the sweep folder).

    Raises:
        ConfigError: naming the URL (password hidden) and what is allowed, when it cannot be opened.
    """
    import optuna

    url = cfg.storage or f"sqlite:///{(out / 'sweep.db').resolve()}"
    journal = url[len("journal:"):] if url.startswith("journal:") else (
        url if "://" not in url and url.endswith((".log", ".jsonl")) else None)
    shown = _hide_password(url)
    try:
        with _quiet_optuna():
            if journal is not None:
                try:
                    from optuna.storages.journal import JournalFileBackend, JournalStorage
                except ImportError:  # optuna < 4.0
                    from optuna.storages import JournalFileStorage as JournalFileBackend, JournalStorage

                if not journal or not Path(journal).parent.is_dir():
                    raise ValueError(f"no folder {Path(journal).parent} for the journal file")
                return JournalStorage(JournalFileBackend(journal))
            url = postgres_driver_url(url)
            scheme = url.split("://", 1)[0].split("+", 1)[0] if "://" in url else ""
            if scheme not in ("sqlite", "postgresql", "mysql"):
                raise ConfigError(f"--storage {shown}: not a storage URL; allowed: {ALLOWED_STORAGE}")
            engine: dict[str, Any] = {"pool_pre_ping": True}
            if scheme == "sqlite":
                engine["connect_args"] = {"timeout": 60}  # several local workers wait for the write lock
            elif scheme == "postgresql":
                engine["connect_args"] = {"connect_timeout": 10}
            new_api = hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")  # optuna >= 4.9
            retry = _retry_callback()(max_retry=cfg.max_retry)
            callback = {"heartbeat_stale_trial_callback" if new_api else "failed_trial_callback": retry}
            return _with_retries(lambda: optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=cfg.heartbeat_interval,
                grace_period=cfg.grace_period, **callback))
    except ConfigError:
        raise
    except Exception as e:  # driver missing, server unreachable, bad file: one line for the user
        reason = _first_line(e)
        if isinstance(e, ImportError) or "No module named" in reason:
            reason += (" (the database driver is missing: pip install psycopg2-binary)" if "postgres" in url else
                       " (the database driver is missing: pip install pymysql, with a mysql+pymysql:// URL)"
                       if "mysql" in url else "")
        raise ConfigError(f"--storage {shown}: cannot open it ({reason}); allowed: {ALLOWED_STORAGE}") from None


def postgres_driver_url(url: str) -> str:
    """``postgres://`` and ``postgresql://`` with whichever driver is installed: SQLAlchemy 2.1 defaults to
    psycopg 3, older ones to psycopg2 (``pip install psycopg2-binary`` or ``psycopg[binary]``)."""
    import importlib.util

    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            rest = url[len(prefix):]
            if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
                return "postgresql+psycopg2://" + rest
            return "postgresql://" + rest
    return url


def _with_retries(make: Any, attempts: int = 5) -> Any:
    """Workers that start together on a fresh database race to create optuna's tables; the losers see
    'already exists' / 'duplicate key' errors.  Once the winner is done the tables are there: try again."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(attempts):
        try:
            return make()
        except (IntegrityError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 + attempt)


def _retry_callback() -> type:
    """optuna's callback that queues a crashed trial's parameters again, and says so in the log."""
    import optuna

    base = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback

    class Retry(base):
        def __call__(self, study: Any, trial: Any) -> None:
            logger.warning("trial %d (%s at %s, worker %s) crashed: failed, and its point queued again", trial.number,
                           trial.params.get("method", trial.user_attrs.get("method", "?")),
                           trial.params.get("budget", "?"), trial.user_attrs.get("worker", "?"))
            super().__call__(study, trial)

    return Retry


def _first_line(e: BaseException) -> str:
    cause = e.__cause__ or e
    text = str(cause).strip().splitlines()
    return text[0] if text else type(cause).__name__


def _hide_password(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True) if "://" in url else url
    except Exception:
        return url


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Heartbeats and retries are 'experimental' in optuna; their warnings say nothing to a user."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _settings(cfg: SweepConfig) -> dict[str, Any]:
    """What every trial of a study must share to be comparable."""
    d = to_dict(cfg)
    return {k: d[k] for k in ("seed", "max_steps", "model", "data", "search", "train", "shared_search",
                              "shared_budget")}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def open_study(cfg: SweepConfig, storage: Any, out: Path) -> Any:
    """Create the study, or load it and check that it was run with the same settings.

    Raises:
        ConfigError: ``--resume`` without a study, or other settings than the study's.
    """
    import optuna

    exists = cfg.study_name in optuna.get_all_study_names(storage)
    if cfg.resume and not exists:
        raise ConfigError(f"--resume: no study {cfg.study_name!r} in {_storage_name(cfg, out)}")
    study = optuna.create_study(storage=storage, study_name=cfg.study_name, directions=list(DIRECTIONS),
                                load_if_exists=True)
    want = _settings(cfg)
    have = study.user_attrs.get("settings")
    if have is None:
        study.set_user_attr("settings", want)
        study.set_user_attr("objectives", list(OBJECTIVES))
    else:
        old, new = _flatten(have), _flatten(want)
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                raise ConfigError(f"study {cfg.study_name!r} was run with --{key} {old.get(key)!r}, not "
                                  f"{new.get(key)!r}; use the same settings, another --study-name, or --overwrite")
    return study


def _storage_name(cfg: SweepConfig, out: Path) -> str:
    return _hide_password(cfg.storage) if cfg.storage else str(out / "sweep.db")


# --------------------------------------------------------------------------------------------------
# Points, the grid sampler, and the duplicate guard
# --------------------------------------------------------------------------------------------------
def point_of(trial: Any) -> tuple[str, int] | None:
    """``(method, budget)`` of a trial, from its parameters or what its sampler recorded first."""
    recorded = trial.system_attrs.get("rankalloc_point")
    params = {**(trial.system_attrs.get("fixed_params") or {}), **trial.params}  # enqueued: fixed_params
    method = params.get("method", trial.user_attrs.get("method"))
    budget = params.get("budget")
    if budget is None and recorded:
        method, budget = recorded
    if budget is None:
        return None
    return str(method or RANKALLOC), int(budget)


def _make_grid_sampler(points: list[tuple[str, int]], seed: int) -> Any:
    from optuna.samplers import GridSampler
    from optuna.trial import TrialState

    class PointGrid(GridSampler):
        """GridSampler over (budget, method) whose 'visited' means: some trial of the study - from any
        worker, any earlier sweep of it, whatever budget list that one had - completed this point or is
        running it.  Free points go in order (rankalloc first, small budgets first); a trial that starts while
        k earlier trials have no point yet takes the k-th free point, so workers starting together pick
        different points.  The worker loop, not the sampler, decides when the sweep is over."""

        def __init__(self) -> None:
            budgets = sorted({b for _, b in points})
            methods = [m for m in METHODS if any(pm == m for pm, _ in points)]
            super().__init__({"budget": budgets, "method": methods}, seed=seed)
            self._wanted = set(points)

        def before_trial(self, study: Any, trial: Any) -> None:
            if "grid_id" in trial.system_attrs or "fixed_params" in trial.system_attrs:
                return  # a retried (or enqueued) trial keeps its point
            taken, done, starting = set(), set(), 0
            for t in study._storage.get_all_trials(study._study_id, deepcopy=False):
                p = point_of(t)
                if p is not None and t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING):
                    taken.add(p)
                    if t.state == TrialState.COMPLETE:
                        done.add(p)
                elif p is None and t.state == TrialState.RUNNING and t.number < trial.number:
                    starting += 1  # another worker's trial, between creation and its point
            ids = sorted((i for i, g in enumerate(self._all_grids) if self._point(g) in self._wanted),
                         key=lambda i: _order(self._point(self._all_grids[i])))  # rankalloc first, small first
            free = [i for i in ids if self._point(self._all_grids[i]) not in taken]
            free = free or [i for i in ids if self._point(self._all_grids[i]) not in done] or ids
            grid_id = free[starting % len(free)]
            method, budget = self._point(self._all_grids[grid_id])
            study._storage.set_trial_system_attr(trial._trial_id, "search_space", self._search_space)
            study._storage.set_trial_system_attr(trial._trial_id, "grid_id", grid_id)
            study._storage.set_trial_system_attr(trial._trial_id, "rankalloc_point", [method, budget])

        def _point(self, grid: tuple) -> tuple[str, int]:
            values = dict(zip(self._param_names, grid))
            return str(values["method"]), int(values["budget"])

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            pass

    return PointGrid()


def _order(point: tuple[str, int]) -> tuple[int, int]:
    return (METHODS.index(point[0]) if point[0] in METHODS else len(METHODS), point[1])


def duplicate_of(study: Any, number: int, point: tuple[str, int]) -> int | None:
    """The trial that already holds ``point``: complete, or running and started before trial ``number``."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False):
        if t.number == number or point_of(t) != point:
            continue
        if t.state == TrialState.COMPLETE or (t.state == TrialState.RUNNING and t.number < number):
            return t.number
    return None


# --------------------------------------------------------------------------------------------------
# The shared search
# --------------------------------------------------------------------------------------------------
@dataclass
class SharedSearch:
    path: str
    budget: int
    r_max: int
    wall_time_s: float
    command: str


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` held by this process (released by the kernel if it dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for the shared search that another worker is running (%s)", path.parent)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _target_costs(cfg: SweepConfig) -> list[int]:
    from .models import find_targets, load_model

    return [t.cost_per_rank for t in find_targets(load_model(cfg.model, num_labels=2), cfg.model)]


def shared_budget(cfg: SweepConfig, budgets: list[int]) -> int:
    """The budget of the shared search.  Re-exports are trustworthy near the searched budget and the
    trust falls with the log-ratio either way (export.TRUSTED_RATIO is symmetric), so the geometric
    middle of the budgets minimises the largest ratio: every budget lies within sqrt(max/min) of it."""
    if cfg.shared_budget == "geomean":
        return int(round(math.sqrt(budgets[0] * budgets[-1])))
    if cfg.shared_budget == "max":
        return budgets[-1]
    try:
        return _absolute(cfg.shared_budget, cfg.shared_budget)
    except BudgetError as e:
        raise ConfigError(f"--shared_budget must be geomean, max or a budget such as 100k; {e}") from None


def run_shared_search(cfg: SweepConfig, out: Path, budgets: list[int]) -> SharedSearch:
    """Run the search every budget is re-exported from, once per sweep folder: a file lock makes
    concurrent workers wait for it, and a finished one (same settings) is reused.  Its largest rank
    is set from the *largest* budget, so that every budget can be exported from it.

    Raises:
        ConfigError: the folder holds a shared search run with other settings.
        BudgetError: a budget cannot be exported from it.
    """
    from .export import Scores
    from .search import run_search

    record = out / SHARED_SEARCH_FILE
    with _file_lock(out / ".shared_search.lock"):
        if record.is_file():
            shared = SharedSearch(**json.loads(record.read_text()))
            scores = Scores.load(shared.path)
            cfg_dict, saved = to_dict(cfg), scores.data["config"]
            for key in ("seed", "max_steps", "model", "data", "search"):
                old, new = saved[key], cfg_dict[key]
                if key == "search":  # r_max is the sweep's choice (from the largest budget) unless given
                    old, new = {**old, "r_max": None}, {**new, "r_max": None}
                if old != new:
                    raise ConfigError(f"the shared search in {shared.path} was run with other {key} settings; "
                                      "use the same settings, another --out, or --overwrite")
            logger.info("reusing the shared search in %s (budget %d, r_max %d)", shared.path, shared.budget,
                        shared.r_max)
        else:
            budget = shared_budget(cfg, budgets)
            costs = _target_costs(cfg)
            r_max = cfg.search.r_max or auto_r_max(budgets[-1], costs)
            search_cfg = SearchConfig(budget=str(budget), seed=cfg.seed, device=cfg.device,
                                      out=str(out / "search"), max_steps=cfg.max_steps,
                                      model=copy.deepcopy(cfg.model), data=copy.deepcopy(cfg.data),
                                      search=dataclasses.replace(cfg.search, r_max=r_max))
            from . import rundir

            folder = Path(search_cfg.out)
            if folder.is_dir() and any(folder.iterdir()) and not (folder / rundir.CHECKPOINT).is_file():
                search_cfg.overwrite = True  # a crashed start without a checkpoint holds nothing to keep
            command = stage_command("search", search_cfg)
            logger.info("shared search at %d parameters (r_max %d) for budgets %s -> %s", budget, r_max,
                        ", ".join(f"{b:,}" for b in budgets), folder)
            t0 = time.time()
            run_search(search_cfg, command)
            shared = SharedSearch(str(folder), budget, r_max, time.time() - t0, command)
            io.write_json(record, dataclasses.asdict(shared))
            scores = Scores.load(shared.path)
    caps = [scores.r_max[t.name] for t in scores.targets]
    for b in budgets:
        try:
            check_budget(b, [t.cost_per_rank for t in scores.targets], caps)
        except BudgetError as e:
            raise BudgetError(f"--budgets {b:,}: cannot be exported from the shared search in {shared.path} "
                              f"(r_max {shared.r_max}): {str(e).split(' is ', 1)[-1]}") from None
    return shared


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
        folder = self.out / "trials" / _safe(cfg.study_name) / f"{trial.number:04d}-{method}-{budget}"
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
        attrs = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "eval_loss": m["eval_loss"],
                 "adapter_params": m["adapter_params"], "budget_used": m["budget_used"],
                 "rank_map": str(rank_map) if method == RANKALLOC else str(result.out / "rank_map.json"),
                 "adapter": str(result.out / "adapter"), "metrics": str(result.out / "metrics.json"),
                 "commands": commands + [command], "wall_time_s": timings}
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        logger.info("trial %d: %s at %s: %s adapter parameters, accuracy %.4f (%.0f s)", trial.number, method,
                    f"{budget:,}", f"{m['adapter_params']:,}", m["accuracy"], timings["trial_s"])
        return float(m["adapter_params"]), float(m["accuracy"])

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
        _recover_crashed(study, cfg)
        trials = study.get_trials(deepcopy=False)
        complete = {point_of(t) for t in trials if t.state == TrialState.COMPLETE}
        todo = [p for p in sweep.points if p not in complete]
        tuned = sum(1 for t in trials if t.state == TrialState.COMPLETE and point_of(t) and
                    point_of(t)[0] == RANKALLOC) if cfg.tune else 0
        tune_left = sweep.tune_total - tuned if cfg.tune else 0
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
        if not free and not queued and tune_left <= 0:
            running = {t.number for t in held.values()}
            if running != waiting_for:
                logger.info("waiting for %d trial(s) running in other workers: %s", len(running),
                            ", ".join(f"#{t.number} {p[0]}@{p[1]:,} ({t.user_attrs.get('worker', '?')})"
                                      for p, t in held.items()))
                waiting_for = running
            time.sleep(cfg.poll_interval)
            continue
        if cfg.tune:
            for method, budget in free:
                if method != RANKALLOC:
                    study.enqueue_trial({"budget": budget}, user_attrs={"method": method})
        with _quiet_optuna():
            study.optimize(sweep.objective, n_trials=1, gc_after_trial=True)


def _recover_crashed(study: Any, cfg: SweepConfig) -> None:
    """Fail trials whose worker died, and queue their points again (at most --max_retry times).

    RDB storages: by heartbeat (optuna's ``fail_stale_trials``).  A journal file has no heartbeats:
    there, a running trial counts as dead when its worker process on this machine is gone, or when it
    has no worker recorded and started more than --grace_period ago.
    """
    import optuna
    from optuna.storages._heartbeat import is_heartbeat_enabled
    from optuna.trial import TrialState

    with _quiet_optuna():
        if is_heartbeat_enabled(study._storage):
            optuna.storages.fail_stale_trials(study)
            return
        host = socket.gethostname()
        retry = _retry_callback()(max_retry=cfg.max_retry)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = t.user_attrs.get("worker")
            if worker is None:
                started = t.datetime_start.timestamp() if t.datetime_start else time.time()
                dead = time.time() - started > cfg.grace_period
            else:
                where, _, pid = worker.rpartition(":")
                dead = where == host and not _alive(int(pid))
            if dead and study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                retry(study, copy.deepcopy(study._storage.get_trial(t._trial_id)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------
def trial_rows(study: Any) -> list[dict[str, Any]]:
    """Every complete trial as a row, with ``front`` (non-dominated among its method's trials) and
    ``global_front`` (non-dominated among all trials)."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        u = t.user_attrs
        method, budget = point_of(t) or (u.get("method", RANKALLOC), u.get("budget"))
        params = {k: v for k, v in t.params.items() if k not in ("budget", "method")}
        rows.append({"trial": t.number, "method": method, "budget": budget, "adapter_params": int(t.values[0]),
                     "accuracy": t.values[1], "macro_f1": u.get("macro_f1"), "budget_used": u.get("budget_used"),
                     "trial_s": (u.get("wall_time_s") or {}).get("trial_s"), "params": params,
                     "rank_map": u.get("rank_map"), "adapter": u.get("adapter"), "metrics": u.get("metrics"),
                     "commands": u.get("commands", [])})
    for row in rows:
        row["front"] = not any(_dominates(o, row) for o in rows if o["method"] == row["method"])
        row["global_front"] = not any(_dominates(o, row) for o in rows)
    return sorted(rows, key=lambda r: (*_order((r["method"], r["adapter_params"])), r["trial"]))


def _dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
    no_worse = a["adapter_params"] <= b["adapter_params"] and a["accuracy"] >= b["accuracy"]
    return no_worse and (a["adapter_params"] < b["adapter_params"] or a["accuracy"] > b["accuracy"])


CSV_COLUMNS = ["trial", "method", "budget", "adapter_params", "accuracy", "macro_f1", "budget_used", "front",
               "global_front", "trial_s", "params", "rank_map", "adapter", "metrics", "commands"]


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, "params": json.dumps(r["params"]) if r["params"] else "",
                         "commands": " && ".join(r["commands"])})
    return buf.getvalue()


def write_reports(study: Any, sweep: Sweep, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """pareto.csv, trials.csv, pareto.md, pareto.png, sweep.json and optuna's HTML plots (with plotly)."""
    from .report import human_params, plot_pareto

    out = sweep.out
    rows = trial_rows(study)
    front = [r for r in rows if r["front"]]
    io.write_text(out / "pareto.csv", _csv(front))
    io.write_text(out / "trials.csv", _csv(rows))
    plot_pareto(out / "pareto.png", [{"method": r["method"], "params": r["adapter_params"],
                                      "accuracy": r["accuracy"]} for r in rows],
                title=f"{sweep.cfg.model.name} on {sweep.cfg.data.task}: accuracy vs adapter parameters")
    summary = {**summary, "trials_complete": len(rows), "front": [r["trial"] for r in front]}
    io.write_json(out / "sweep.json", summary)

    def table(rs: list[dict[str, Any]]) -> list[str]:
        lines = ["| trial | method | budget | adapter params | accuracy | macro F1 | front | params |",
                 "|---:|---|---:|---:|---:|---:|:---:|---|"]
        for r in rs:
            mark = "**all**" if r["global_front"] else ("method" if r["front"] else "")
            hp = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items())
            lines.append(f"| {r['trial']} | {r['method']} | {r['budget']:,} | {r['adapter_params']:,} "
                         f"({human_params(r['adapter_params'])}) | {r['accuracy']:.4f} | "
                         f"{_num(r['macro_f1'])} | {mark} | {hp} |")
        return lines

    shared = summary.get("shared_search")
    lines = [f"# Sweep {sweep.cfg.study_name!r}: accuracy vs adapter parameters", "",
             f"{sweep.cfg.model.name} on {sweep.cfg.data.task}; storage {summary['storage']}; "
             f"{len(rows)} complete trial(s). Objectives: adapter parameters (down), accuracy on the "
             "evaluation split (up).", "",
             "## Pareto front", "",
             "Non-dominated within each method (front = `method`); **all** = also non-dominated across methods.",
             "", *table(front), "", "![pareto](pareto.png)", "", "## Time", "",
             f"- this worker: {summary['wall_time_s']:.0f} s wall; all complete trials together: "
             f"{summary['trial_time_s']:.0f} s"]
    if shared:
        lines.append(f"- shared search at {shared['budget']:,} parameters (r_max {shared['r_max']}): "
                     f"{shared['wall_time_s']:.0f} s, reused by {summary['rankalloc_budgets']} budget(s); one full "
                     f"search per budget would have cost about {summary['full_search_estimate_s']:.0f} s "
                     f"({summary['rankalloc_budgets']} x the shared search)")
    lines += ["", "## Commands that reproduce each point of the front", "",
              "Run from the folder the sweep ran in; they write into the sweep's own folders (change `--out`, "
              "or add `--overwrite`, to run them again).", ""]
    for r in front:
        lines += [f"### trial {r['trial']}: {r['method']} at {r['budget']:,}", "", "```bash", *r["commands"],
                  "```", ""]
    lines += ["## Every complete trial", "", *table(rows), ""]
    io.write_text(out / "pareto.md", "\n".join(lines))
    _optuna_plots(study, out, bool(sweep.cfg.tune))
    return rows


def _num(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _optuna_plots(study: Any, out: Path, tuned: bool) -> None:
    """optuna's interactive HTML plots, when plotly is installed (skipped silently otherwise)."""
    try:
        import plotly  # noqa: F401
    except ImportError:
        return
    import optuna.visualization as vis

    plots = {"optuna_pareto_front.html": lambda: vis.plot_pareto_front(study, target_names=list(OBJECTIVES))}
    if tuned:
        plots["optuna_parallel_accuracy.html"] = lambda: vis.plot_parallel_coordinate(
            study, target=lambda t: t.values[1], target_name="accuracy")
    for name, make in plots.items():
        try:
            with _quiet_optuna():
                fig = make()
            io.write_text(out / name, fig.to_html(include_plotlyjs="cdn"))
        except Exception as e:  # a plot is a bonus; never fail a finished sweep on it
            logger.warning("skipped %s: %s", name, _first_line(e))


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------
def run_sweep(cfg: SweepConfig, command: str | None = None) -> SweepResult:
    """Join (or create) the study, run trials until every point is complete, write the reports.

    Raises:
        RankallocError: bad budgets, storage, settings or data (one-line messages).
    """
    t0 = time.time()
    budgets = parse_budgets(cfg.budgets or [])
    out = Path(cfg.out) if cfg.out else Path("runs") / f"sweep-{_safe(cfg.study_name)}"
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a folder")
    if cfg.overwrite:
        _delete_study(cfg, out)
        shutil.rmtree(out, ignore_errors=True)
    if cfg.storage is None:
        out.mkdir(parents=True, exist_ok=True)  # the default SQLite file lives in it
    storage = open_storage(cfg, out)  # a storage that cannot be opened is refused before anything is made
    out.mkdir(parents=True, exist_ok=True)
    study = open_study(cfg, storage, out)
    methods = ([] if cfg.tune else [RANKALLOC]) + list(cfg.baseline or [])
    points = [(m, b) for m in methods for b in budgets]
    shared = None
    if cfg.tune:
        logger.info("tuning %s: one search per trial", ", ".join(cfg.tune))
    elif cfg.shared_search:
        shared = run_shared_search(cfg, out, budgets)
    sweep = Sweep(cfg, out, budgets, points, shared,
                  tune_total=(cfg.n_trials or 4 * len(budgets)) if cfg.tune else 0)
    _check_budget_distribution(study, cfg, budgets)
    if cfg.tune:
        from optuna.samplers import TPESampler

        study.sampler = TPESampler(seed=(cfg.seed * 100_003 + os.getpid()) % 2**32, constant_liar=True,
                                   n_startup_trials=min(10, max(2, sweep.tune_total // 3)))
    else:
        study.sampler = _make_grid_sampler(points, cfg.seed)
    logger.info("sweep %r in %s: %d point(s) (%s) at budgets %s; worker %s; out %s", cfg.study_name,
                _storage_name(cfg, out), len(points), ", ".join(methods) or "tuned only",
                ", ".join(f"{b:,}" for b in budgets), sweep.worker, out)
    run_worker(study, sweep)
    summary = _summary(study, sweep, cfg, out, t0, command)
    rows = write_reports(study, sweep, summary)
    logger.info("pareto front: %s (plot %s)", out / "pareto.md", out / "pareto.png")
    return SweepResult(out, rows, summary)


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


def _summary(study: Any, sweep: Sweep, cfg: SweepConfig, out: Path, t0: float, command: str | None) -> dict[str, Any]:
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    trial_time = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done
                     if t.datetime_complete and t.datetime_start)
    n_rankalloc = len({b for m, b in sweep.points if m == RANKALLOC})
    summary: dict[str, Any] = {"study": cfg.study_name, "storage": _storage_name(cfg, out), "command": command,
                               "budgets": sweep.budgets, "wall_time_s": time.time() - t0, "trial_time_s": trial_time,
                               "rankalloc_budgets": n_rankalloc}
    if sweep.shared is not None:
        summary["shared_search"] = dataclasses.asdict(sweep.shared)
        summary["full_search_estimate_s"] = sweep.shared.wall_time_s * n_rankalloc
    return summary


def _delete_study(cfg: SweepConfig, out: Path) -> None:
    import optuna

    if cfg.storage is None and not (out / "sweep.db").exists():
        return
    storage = open_storage(cfg, out)
    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name=cfg.study_name, storage=storage)
        logger.info("--overwrite: deleted study %r", cfg.study_name)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)


DESCRIPTION = """An optuna study of adapter parameters versus accuracy over budgets (and baselines).

Every process started with the same --storage and --study-name joins the study as a worker; a
finished point is never rerun, and a rerun of the same command resumes the study.

examples:
  python -m rankalloc.sweep --config configs/sweep/default.yaml
  python -m rankalloc.sweep --budgets 40k:400k:4 --baseline uniform --out runs/sweep
  python -m rankalloc.sweep --budgets 41k,166k --storage postgresql://user:pw@db/rankalloc --study-name s1
"""


def cli(argv: list[str] | None = None) -> int:
    from .cli import command_line
    from .config import parse_args

    cfg, _ = parse_args(SweepConfig, argv, "rankalloc sweep", DESCRIPTION)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own log lines say what each trial did
    result = run_sweep(cfg, command_line("sweep", argv))
    front = [r for r in result.rows if r["front"]]
    print(f"pareto front: {len(front)} of {len(result.rows)} trial(s) -> {result.out / 'pareto.md'} "
          f"(plot {result.out / 'pareto.png'}, table {result.out / 'pareto.csv'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .cli import run_stage

    return run_stage("sweep", argv)


if __name__ == "__main__":
    sys.exit(main())
