"""A sweep's ``--out``: what counts as a sweep folder, and what ``--overwrite`` may set aside or delete.

A sweep writes its study (the default SQLite file), its shared search and its trials into ``--out``; these
guards keep it from writing into a folder of another kind, and keep ``--overwrite`` from replacing a folder
that other workers or other studies still use.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from . import rundir
from .config import SweepConfig
from .errors import RunDirError
from .sweep_shared import SHARED_SEARCH_FILE
from .sweep_study import delete_study, open_storage, quiet_optuna, recover_crashed, storage_file


def file_storage_inside(storage: str, out: Path) -> bool:
    """Whether ``--storage`` is a SQLite or journal file inside ``out`` (which a first run has yet to make)."""
    path = storage_file(storage)
    return path is not None and path.resolve().parent == out.resolve()


SWEEP_MARKER = ".rankalloc_sweep"  # written into every sweep folder when the sweep starts
SWEEP_MARKS = (SWEEP_MARKER, "sweep.db", "sweep.json", SHARED_SEARCH_FILE)


def refuse_a_folder_of_another_kind(cfg: SweepConfig, out: Path) -> None:
    """A sweep writes its study and files into --out: a non-empty folder must be a sweep's (or hold
    nothing but the --storage file given), never a search run or a folder of one's own."""
    if not out.is_dir() or rundir.is_run_folder(out, SWEEP_MARKS):
        return
    own = {p.name for p in out.iterdir()}
    if cfg.storage is not None and file_storage_inside(cfg.storage, out):
        own -= {storage_file(cfg.storage).name}
        own = {name for name in own if not name.endswith(".lock")}  # the journal's lock file
    if own:
        raise RunDirError(f"--out {out} is not empty and holds no {', '.join(SWEEP_MARKS)}, so it is not a "
                          "rankalloc sweep folder; it is left as it is: choose a new or empty --out")


def overwrite_sweep_folder(cfg: SweepConfig, out: Path) -> None:
    """``--overwrite``: the old sweep folder (its SQLite study with it) waits in ``OUT.replaced`` until this
    sweep finishes; a study in a storage of its own (--storage) is deleted, as it cannot be set aside."""
    has_content = out.is_dir() and any(out.iterdir())
    if has_content and not rundir.is_run_folder(out, SWEEP_MARKS):
        raise RunDirError(f"--overwrite: {out} is not empty and holds no {', '.join(SWEEP_MARKS)}, so it is "
                          "not a rankalloc sweep folder; it is left as it is (and so is the study): choose a "
                          "new or empty --out")
    _refuse_overwrite_while_running(cfg, out)
    _refuse_overwrite_of_other_studies(cfg, out)
    rundir.check_not_running(out / "search")  # a worker's shared search runs before any trial exists
    if has_content:
        rundir.set_aside(out, marks=SWEEP_MARKS, finished=lambda f: (f / "sweep.json").is_file())
    if cfg.storage is not None:
        out.mkdir(parents=True, exist_ok=True)  # the storage may live in it
        delete_study(cfg, out)


def _refuse_overwrite_while_running(cfg: SweepConfig, out: Path) -> None:
    """A second worker started with the same --overwrite would set aside the first one's live sweep."""
    import optuna

    if cfg.storage is None and not (out / "sweep.db").is_file():
        return
    try:
        with quiet_optuna():
            study = optuna.load_study(study_name=cfg.study_name, storage=open_storage(cfg, out))
    except KeyError:  # no such study: nothing runs
        return
    recover_crashed(study, cfg)  # trials of dead workers do not count
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if running:
        raise RunDirError(f"--overwrite: study {cfg.study_name!r} has {len(running)} trial(s) running in other "
                          "workers; start further workers without --overwrite (only the first one may pass it), or "
                          "stop them first")


def _refuse_overwrite_of_other_studies(cfg: SweepConfig, out: Path) -> None:
    """Several studies may share one folder (its SQLite file, its shared search, ``trials/<study>``); setting
    the folder aside for one of them would delete the others with it."""
    others = {p.name for p in (out / "trials").iterdir() if p.is_dir()} if (out / "trials").is_dir() else set()
    others.discard(safe_name(cfg.study_name))
    if cfg.storage is None and (out / "sweep.db").is_file():
        import optuna

        with quiet_optuna():
            others |= set(optuna.get_all_study_names(storage=open_storage(cfg, out))) - {cfg.study_name}
    if others:
        raise RunDirError(f"--overwrite: {out} also holds the stud{'y' if len(others) == 1 else 'ies'} "
                          f"{', '.join(sorted(others))}, which replacing the folder would delete; give study "
                          f"{cfg.study_name!r} its own --out, or delete the folder yourself")


def safe_name(name: str) -> str:
    """A folder name for a study name; a name that had to change gets a hash of the original, so that two
    studies ("a/b", "a_b") never share trial folders."""
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)
    if safe != name or safe in ("", ".", ".."):
        safe = f"{safe}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return safe
