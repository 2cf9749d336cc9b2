"""Where a sweep's trials live: the optuna storage (SQLite, PostgreSQL, MySQL or a journal file), the
study and the check that every run of it used the same settings, the grid of ``(method, budget)`` points
with its duplicate guard, and the recovery of trials whose worker died."""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

from .config import SweepConfig
from .flags import to_dict
from .errors import ConfigError

logger = logging.getLogger(__name__)

RANKALLOC = "rankalloc"
METHODS = (RANKALLOC, "uniform", "adalora")  # choices of the "method" parameter; fixed for every study
OBJECTIVES = ("adapter_params", "score")  # score: the task family's metric (accuracy, Pearson, ...)
DIRECTIONS = ("minimize", "maximize")
ALLOWED_STORAGE = ("sqlite:///FILE.db, postgresql://USER:PASSWORD@HOST[:PORT]/DB, mysql://USER:PASSWORD@HOST/DB, "
                   "or journal:FILE (also a path ending in .log or .jsonl) for several processes on one machine")


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
    journal = _journal_path(url)
    shown = _hide_password(url)
    try:
        with quiet_optuna():
            if journal is not None:
                try:
                    from optuna.storages.journal import JournalFileBackend, JournalStorage
                except ImportError:  # optuna < 4.0
                    from optuna.storages import JournalFileStorage as JournalFileBackend, JournalStorage

                if not journal:
                    raise ValueError("no file named after journal:")
                if not Path(journal).parent.is_dir():
                    raise ValueError(f"no folder {Path(journal).parent} for the journal file")
                return JournalStorage(JournalFileBackend(journal))
            url = postgres_driver_url(url)
            scheme = url.split("://", 1)[0].split("+", 1)[0] if "://" in url else ""
            if scheme not in ("sqlite", "postgresql", "mysql"):
                raise ConfigError(f"--storage {shown}: not a storage URL; allowed: {ALLOWED_STORAGE}")
            if scheme == "sqlite" and storage_file(url) is None:
                raise ConfigError(f"--storage {shown}: an in-memory database ends with this process, so a rerun "
                                  "could not resume the study and no other worker could join it; give a file, "
                                  f"sqlite:///PATH; allowed: {ALLOWED_STORAGE}")
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
        reason = first_line(e)
        if isinstance(e, ImportError) or "No module named" in reason:
            reason += (" (the database driver is missing: pip install psycopg2-binary)" if "postgres" in url else
                       " (the database driver is missing: pip install pymysql, with a mysql+pymysql:// URL)"
                       if "mysql" in url else "")
        raise ConfigError(f"--storage {shown}: cannot open it ({reason}); allowed: {ALLOWED_STORAGE}") from None


def _journal_path(url: str) -> str | None:
    """The file of a journal ``--storage`` (``journal:PATH``, or a bare path ending .log/.jsonl), else None."""
    if url.startswith("journal:"):
        return url[len("journal:"):]
    return url if "://" not in url and url.endswith((".log", ".jsonl")) else None


def storage_file(url: str) -> Path | None:
    """The file of a journal or SQLite ``--storage`` (None for a database server, or what is no storage URL):
    the one reading of a storage's file, for the folder guards and the --resume check alike."""
    journal = _journal_path(url)
    if journal is not None:
        return Path(journal) if journal else None
    if not url.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url  # drops a query (?timeout=30) as SQLite itself does

    try:
        database = make_url(url).database
    except Exception:  # an unparsable URL: open_storage names it
        return None
    return Path(database) if database and database != ":memory:" else None


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
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(attempts):
        try:
            return make()
        except (IntegrityError, ProgrammingError, OperationalError) as e:
            # SQLite reports the race as an OperationalError ("table studies already exists", "database is
            # locked"); any other OperationalError (a wrong path, a refused connection) is not a race
            racing = not isinstance(e, OperationalError) or any(s in str(e) for s in ("already exists", "locked"))
            if not racing or attempt == attempts - 1:
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
            # the retry must not inherit the dead worker's name: until the new worker writes its own, another
            # worker's crash recovery would see the dead PID on it and fail the retry as well
            trial = copy.copy(trial)
            trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k != "worker"}
            super().__call__(study, trial)

    return Retry


def first_line(e: BaseException) -> str:
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
def quiet_optuna() -> Iterator[None]:
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


SETTINGS_WAIT_S = 10.0  # how long a joining worker waits for the study's creator to record its settings


def open_study(cfg: SweepConfig, storage: Any, out: Path) -> Any:
    """Create the study, or load it and check that it was run with the same settings.

    Raises:
        ConfigError: ``--resume`` without a study, or other settings than the study's.
    """
    import optuna

    if cfg.resume:
        check_study_exists(cfg, storage, out)
    try:  # creating is atomic: of workers starting together, one creates the study and records its settings
        study = optuna.create_study(storage=storage, study_name=cfg.study_name, directions=list(DIRECTIONS))
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study, created = optuna.load_study(study_name=cfg.study_name, storage=storage), False
    want = _settings(cfg)
    have = study.user_attrs.get("settings")
    deadline = time.time() + SETTINGS_WAIT_S
    while have is None and not created and time.time() < deadline:  # the creator is about to record them
        time.sleep(0.2)
        have = optuna.load_study(study_name=cfg.study_name, storage=storage).user_attrs.get("settings")
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


def check_study_exists(cfg: SweepConfig, storage: Any, out: Path) -> None:
    """Raises: ConfigError (``--resume``) when ``storage`` holds no study of ``--study-name``."""
    import optuna

    if cfg.study_name not in optuna.get_all_study_names(storage):
        raise ConfigError(f"--resume: no study {cfg.study_name!r} in {storage_name(cfg, out)}")


def storage_name(cfg: SweepConfig, out: Path) -> str:
    return _hide_password(cfg.storage) if cfg.storage else str(out / "sweep.db")


def delete_study(cfg: SweepConfig, out: Path) -> None:
    import optuna

    if cfg.storage is None and not (out / "sweep.db").exists():
        return
    storage = open_storage(cfg, out)
    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name=cfg.study_name, storage=storage)
        logger.info("--overwrite: deleted study %r", cfg.study_name)


# --------------------------------------------------------------------------------------------------
# Points, the grid sampler, and the duplicate guard
# --------------------------------------------------------------------------------------------------
def point_of(trial: Any) -> tuple[str, int] | None:
    """``(method, budget)`` of a trial, from its parameters or what its sampler recorded first."""
    recorded = trial.system_attrs.get("rankalloc_point")
    params = {**(trial.system_attrs.get("fixed_params") or {}), **trial.params}  # enqueued: fixed_params
    method = params.get("method", trial.user_attrs.get("method"))
    budget = params.get("budget")
    if recorded and (budget is None or method is None):  # between the trial's two suggests: its sampler knows
        method, budget = recorded
    if budget is None:
        return None
    return str(method or RANKALLOC), int(budget)


def make_grid_sampler(points: list[tuple[str, int]], seed: int) -> Any:
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
                         key=lambda i: point_order(self._point(self._all_grids[i])))  # rankalloc first, small first
            free = [i for i in ids if self._point(self._all_grids[i]) not in taken]
            free = free or [i for i in ids if self._point(self._all_grids[i]) not in done] or ids
            grid_id = free[starting % len(free)]
            method, budget = self._point(self._all_grids[grid_id])
            study._storage.set_trial_system_attr(trial._trial_id, "search_space", self._search_space)
            study._storage.set_trial_system_attr(trial._trial_id, "grid_id", grid_id)
            study._storage.set_trial_system_attr(trial._trial_id, "rankalloc_point", [method, budget])

        def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
            """A retried trial runs the point it was made for: its grid index was another worker's, whose grid
            may list other points, in another order."""
            recorded = trial.system_attrs.get("rankalloc_point")
            if recorded and param_name in ("method", "budget"):
                method, budget = recorded
                return str(method) if param_name == "method" else int(budget)
            return super().sample_independent(study, trial, param_name, param_distribution)

        def _point(self, grid: tuple) -> tuple[str, int]:
            values = dict(zip(self._param_names, grid))
            return str(values["method"]), int(values["budget"])

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            pass

    return PointGrid()


def point_order(point: tuple[str, int]) -> tuple[int, int]:
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
# Crash recovery
# --------------------------------------------------------------------------------------------------
def recover_crashed(study: Any, cfg: SweepConfig) -> None:
    """Fail trials whose worker died, and queue their points again (at most --max_retry times).

    RDB storages: by heartbeat (optuna's ``fail_stale_trials``).  A journal file has no heartbeats:
    there, a running trial counts as dead when its worker process on this machine is gone.  On both, a
    running trial with no worker recorded for more than --grace_period counts as dead: its worker was
    killed between creating it and its first line (optuna never looks at a trial that has sent no
    heartbeat, so without this rule it would hold its point forever).  See ``_orphan_age`` for how that
    age is read without trusting another machine's clock or time zone.
    """
    import optuna
    from optuna.exceptions import StorageInternalError, UpdateFinishedTrialError
    from optuna.storages._heartbeat import is_heartbeat_enabled
    from optuna.trial import TrialState

    with quiet_optuna():
        heartbeats = is_heartbeat_enabled(study._storage)
        if heartbeats:
            optuna.storages.fail_stale_trials(study)
        host = socket.gethostname()
        retry = _retry_callback()(max_retry=cfg.max_retry)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = t.user_attrs.get("worker")
            if worker is None:
                dead = _orphan_age(study, t) > cfg.grace_period
            elif heartbeats:
                continue  # its heartbeats decide
            else:
                where, _, pid = worker.rpartition(":")
                dead = where == host and not _alive(int(pid))
            if not dead:
                continue
            try:
                failed = study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            except UpdateFinishedTrialError:  # another waiting worker failed it first
                continue
            except StorageInternalError:  # SQLite: another worker holds the write lock; the next look decides
                continue
            if failed:
                retry(study, copy.deepcopy(study._storage.get_trial(t._trial_id)))


# Trials this process has seen running with no worker recorded: (study, trial id, start) -> monotonic time
_ORPHANS_SEEN: dict[tuple[str, int, Any], float] = {}
# optuna stamps datetime_start without a zone (its SQL storages in the creating machine's local time):
# read on another machine it may be off by up to the widest gap between two time zones (UTC-12 to UTC+14)
_ZONE_SKEW_S = 26 * 3600


def _orphan_age(study: Any, trial: Any) -> float:
    """Seconds a running trial with no worker recorded has been known to be one: how long this process
    has seen it so, or its stamped age less any time-zone gap, whichever is longer.  A worker in another
    time zone thus cannot fail a trial that has just started, and a day-old orphan is failed at once."""
    now = time.monotonic()
    first_seen = now - _ORPHANS_SEEN.setdefault((study.study_name, trial._trial_id, trial.datetime_start), now)
    if trial.datetime_start is None:
        return first_seen
    return max(time.time() - trial.datetime_start.timestamp() - _ZONE_SKEW_S, first_seen)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
