"""Run folders: created fresh, resumed, or refused; a status file says whether the content is whole.

``status.json`` holds ``{"state": "running" | "done" | "failed", ...}``.  A folder whose state is
not ``done`` holds no result to trust: results are written last, each atomically, and the state flips
to ``done`` only after all of them exist.

``--overwrite`` never deletes a previous run before its replacement exists: the old folder is moved
aside to ``OUT.replaced`` and deleted only when the new run in ``OUT`` finishes (``finish_run``); a new
run that fails or is killed leaves the old one there.

A run holds an exclusive lock on ``OUT/.rankalloc.lock`` from ``open_run`` to ``finish_run``, ``fail_run``
or ``release`` (or until its process ends), so a second process, such as a rerun while orphaned workers
of a killed launcher still write, is refused instead of writing the same folder.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable

from . import io
from .errors import RunDirError

STATUS = "status.json"
CHECKPOINT = "checkpoint.pt"
REPLACED_SUFFIX = ".replaced"
LOCK = ".rankalloc.lock"

logger = logging.getLogger(__name__)


def default_out(stage: str, label: str, seed: int) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in label)
    return Path("runs") / f"{stage}-{safe}-seed{seed}-{stamp}"


def read_status(out: Path) -> dict[str, Any] | None:
    path = Path(out) / STATUS
    if not path.is_file():
        return None
    try:
        status = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return {"state": "unknown"}
    return status if isinstance(status, dict) else {"state": "unknown"}


def check_out_path(out: str | Path) -> None:
    """Refuse an ``--out`` that is a file or lies under one, or whose nearest existing folder this process
    may not write, before any work (a run folder cannot be made or written there).

    Raises:
        RunDirError: naming the file or folder in the way.
    """
    out = Path(out)
    for folder in (out, *out.parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                raise RunDirError(f"--out {out}: {folder} is a file, not a folder" if folder != out
                                  else f"--out {out} is a file, not a folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise RunDirError(f"--out {out}: {folder} is not writable by this user; choose another --out")
            return


def check_out_outside(out: str | Path, inputs: list[tuple[str, str | Path]]) -> None:
    """Refuse an ``--out`` that is, or holds, a folder this stage reads (``(what, folder)`` pairs): an
    ``--overwrite`` there would set that folder aside and delete it once the run finishes.

    Raises:
        RunDirError: naming the input inside ``--out``.
    """
    here = Path(out).resolve()
    for what, folder in inputs:
        folder = Path(folder).resolve()
        if folder == here or folder.is_relative_to(here):
            raise RunDirError(f"--out {out} holds {what} ({folder}); choose a folder outside it")


def _is_status(path: Path) -> bool:
    """Whether ``path`` is a status file rankalloc wrote (not any file of that name)."""
    try:
        status = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(status, dict) and status.get("state") in ("running", "done", "failed") and "time" in status


def open_run(out: str | Path, *, overwrite: bool, resume: bool) -> tuple[Path, bool]:
    """Prepare ``out``; return (folder, whether to resume from its checkpoint).

    * new or empty folder: start;
    * ``--overwrite``: a previous run's folder (it has ``status.json``) is moved aside to
      ``OUT.replaced`` (see ``set_aside``) and the run starts afresh; any other non-empty folder is
      refused, never touched;
    * a checkpoint and no finished result: the run resumes (``--resume`` or simply re-running);
    * a finished run: refused without ``--overwrite`` (also with ``--resume``: there is nothing left to do);
    * ``--resume`` with nothing to resume: refused.

    Raises:
        RunDirError: as above, or ``out`` is a file.
    """
    out = Path(out)
    check_out_path(out)
    lock_was_there = (out / LOCK).exists()
    held = False  # whether this call came to hold the folder (only then is the lock file its to remove)
    try:
        if out.is_dir():
            hold_writable(out)  # before anything is moved aside or resumed; until the run ends (see start_run)
            held = True
        has_content = out.is_dir() and any(p.name != LOCK and not _is_partial_write(p) for p in out.iterdir())
        status = read_status(out) if has_content else None
        has_ckpt = (out / CHECKPOINT).is_file()
        if overwrite and has_content:
            set_aside(out)  # the held lock file moves with it: hold the new folder instead
            release(out)
            held = False
            has_content, status, has_ckpt = False, None, False
        if resume and has_content and status is not None and status.get("state") == "done":
            raise RunDirError(f"--resume: {out} holds a finished run, nothing to resume; pass --overwrite to run "
                              "it again or choose another --out")
        if resume and not has_ckpt:
            raise RunDirError(f"--resume: {out} holds no checkpoint to resume from")
        if has_content and status is not None and status.get("state") == "done":
            raise RunDirError(f"--out {out} holds a finished run; pass --overwrite to replace it or choose "
                              "another --out")
        if has_content and not has_ckpt and _is_status(out / STATUS):
            # a run stopped before its first checkpoint (and nobody holds it): nothing to resume, no result
            # to lose; it starts again in place, its files overwritten as the new run writes them
            logger.warning("%s holds a run that stopped before its first checkpoint (%s); starting it again",
                           out, status.get("state"))
        elif has_content and not has_ckpt and not overwrite:
            raise RunDirError(f"--out {out} is not empty and holds no resumable run; pass --overwrite or "
                              "choose another --out")
        if out.is_dir():
            _remove_partial_writes(out)  # only now: a refused folder is left as it was found
        hold_writable(out)
        held = True
    except BaseException:
        if held and not lock_was_there and out.is_dir():  # a refused folder is left as it was found
            (out / LOCK).unlink(missing_ok=True)  # while still held: nobody else locks the file it names
        release(out)
        raise
    return out, has_ckpt


# io.atomic_path's temporary names before they carried its mark: .NAME.XXXXXXXX.tmpSUFFIX (mkstemp's 8 characters)
_UNMARKED_PARTIAL = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp(?P<suffix>\.[^.]+)?")


def _is_partial_write(path: Path) -> bool:
    """Whether ``path`` is the temporary file of a rankalloc write (``io.atomic_path``'s
    ``.NAME.rankalloc-XXXX.tmpSUFFIX``, or the same without the mark, as earlier versions named it), not a
    file of the user's."""
    name = path.name
    if not (name.startswith(".") and path.is_file()):
        return False
    if f".{io.PARTIAL_MARK}" in name and ".tmp" in name:
        return True
    old = _UNMARKED_PARTIAL.fullmatch(name)
    return old is not None and (old["suffix"] or "") == Path(old["name"]).suffix


def _remove_partial_writes(out: Path) -> None:
    """Delete the temporary files of writes a killed run left half done: nobody else writes the folder
    while this process holds it."""
    for partial in out.iterdir():
        if _is_partial_write(partial):
            logger.info("removing %s, left by a write that was cut short", partial.name)
            partial.unlink(missing_ok=True)


def hold_writable(out: Path) -> None:
    """Make ``out`` (with its parents) and hold it (``release`` lets go).

    Raises:
        RunDirError: another process holds it, or it cannot be made or written (a read-only place).
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        hold(out)
    except OSError as e:
        raise RunDirError(f"--out {out}: cannot write there ({e.strerror or e}); choose another --out") from None


def replaced_folder(out: str | Path) -> Path:
    """Where ``--overwrite`` keeps the run it replaces: ``OUT.replaced`` next to ``OUT``."""
    here = Path(os.path.abspath(out))
    return here.with_name(here.name + REPLACED_SUFFIX)


def is_run_folder(folder: Path, marks: tuple[str, ...]) -> bool:
    """Whether ``folder`` holds one of ``marks``, files only rankalloc writes there (a ``status.json``
    counts only when it is a rankalloc status, not any file of that name)."""
    return any(_is_status(folder / mark) if mark == STATUS else (folder / mark).exists() for mark in marks)


def status_done(folder: Path) -> bool:
    """A search or retrain run is finished when its status says so."""
    return (read_status(folder) or {}).get("state") == "done"


_SET_ASIDE: set[Path] = set()  # the OUT.replaced folders this process set aside (only those it may delete)


def set_aside(out: str | Path, marks: tuple[str, ...] = (STATUS,),
              finished: Callable[[Path], bool] = status_done) -> Path:
    """Move the previous run in ``out`` to ``OUT.replaced`` for ``--overwrite``; return that folder.

    Only a folder holding one of ``marks`` (files every rankalloc run writes first) is moved: a mistyped
    ``--out`` pointing at a folder of one's own is refused, not touched.  When ``OUT.replaced`` is
    already there (a replacement that never finished), it is kept unless ``out`` holds a ``finished``
    run, which then takes its place.

    Raises:
        RunDirError: ``out`` holds none of ``marks``, is a symbolic link or the working folder, or
            ``OUT.replaced`` is in the way and is not a run folder.
    """
    out = Path(out)
    if out.is_symlink():
        raise RunDirError(f"--overwrite: --out {out} is a symbolic link; give the folder it points to "
                          f"({out.resolve()})")
    if not is_run_folder(out, marks):
        raise RunDirError(f"--overwrite: {out} is not empty and holds no {' or '.join(marks)}, so it is not a "
                          "rankalloc run folder; it is left as it is: choose a new or empty --out")
    here, cwd = Path(os.path.abspath(out)), Path.cwd()
    if cwd == here or cwd.is_relative_to(here):
        raise RunDirError(f"--overwrite: --out {out} is the working folder or holds it; run from outside it")
    aside = replaced_folder(out)
    if aside.exists() or aside.is_symlink():
        if not aside.is_dir() or aside.is_symlink() or not is_run_folder(aside, marks):
            raise RunDirError(f"--overwrite: {aside} (where the replaced run is kept) is in the way and is not a "
                              "rankalloc run folder; move it away")
        if not finished(out):  # a replacement that never finished: the run it was replacing stays
            logger.warning("--overwrite: keeping the run in %s (an earlier --overwrite set it aside); deleting the "
                           "unfinished one in %s", aside, out)
            shutil.rmtree(out)
            _SET_ASIDE.add(aside)
            return aside
        shutil.rmtree(aside)
    os.replace(out, aside)
    _SET_ASIDE.add(aside)
    logger.info("--overwrite: the previous run is kept in %s until the new one finishes", aside)
    return aside


def drop_replaced(out: str | Path) -> None:
    """Delete the run that ``--overwrite`` set aside for ``out`` in this process, now that ``out`` holds its
    replacement.  One set aside by an earlier process (whose replacement was resumed) is kept, and said so."""
    aside = replaced_folder(out)
    if not aside.is_dir() or aside.is_symlink():
        return
    cwd = Path.cwd()
    if aside not in _SET_ASIDE or cwd == aside or cwd.is_relative_to(aside):
        logger.warning("a run that --overwrite replaced is still in %s; delete it when you no longer need it", aside)
        return
    shutil.rmtree(aside)
    _SET_ASIDE.discard(aside)


def restore_replaced(out: str | Path) -> bool:
    """Put the run that ``--overwrite`` set aside in this process back into ``out`` (after a failed
    replacement); say if there was one."""
    aside = replaced_folder(out)
    if aside not in _SET_ASIDE or not aside.is_dir():
        return False
    if Path(out).exists():
        shutil.rmtree(out)
    os.replace(aside, out)
    _SET_ASIDE.discard(aside)
    return True


_LOCKS: dict[Path, int] = {}  # run folders this process holds, and the open lock files that hold them


def _lock_key(out: str | Path) -> Path:
    return Path(os.path.realpath(out))


def _try_lock(fd: int) -> bool:
    """False when another process holds the lock; True when this one now holds it, or when the platform
    or filesystem offers no lock (then there is no protection, as before locks existed)."""
    try:
        import fcntl
    except ImportError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:  # e.g. a shared filesystem mounted without lock support
        logger.warning("cannot lock the run folder (%s); two runs of one folder are not kept apart", e)
    return True


def _open_lock(path: Path, create: bool = False) -> int:
    try:
        return os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o666)
    except PermissionError:  # another user's lock file: a read-only descriptor locks as well
        return os.open(path, os.O_RDONLY)


def _in_use(out: Path, fd: int) -> RunDirError:
    os.lseek(fd, 0, os.SEEK_SET)
    holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
    return RunDirError(f"--out {out} is in use by a running process ({holder}); wait for it or stop it "
                       "(stop a torchrun job by its launcher, and check that no worker is left), or choose "
                       "another --out")


def check_not_running(out: Path) -> None:
    """Raises: RunDirError when another process holds the run in ``out``."""
    lock = out / LOCK
    if _lock_key(out) in _LOCKS or not lock.is_file():
        return
    fd = _open_lock(lock)
    try:
        if not _try_lock(fd):
            raise _in_use(out, fd)
    finally:
        os.close(fd)  # releases the probe's lock


def hold(out: Path) -> None:
    """Hold the run folder ``out`` for this process (again: a no-op) until ``release``, ``finish_run`` or
    ``fail_run``, or until the process ends.

    Raises:
        RunDirError: another process holds it."""
    key = _lock_key(out)
    if key in _LOCKS:
        return
    fd = _open_lock(key / LOCK, create=True)
    if not _try_lock(fd):
        error = _in_use(out, fd)
        os.close(fd)
        raise error
    _LOCKS[key] = fd
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    except OSError:  # a read-only lock file: it locks all the same, without naming its holder
        pass


def start_run(out: Path, **extra: Any) -> None:
    """Hold ``out`` (``open_run`` already does) and mark its run running.

    Raises:
        RunDirError: another process holds it."""
    hold(out)
    try:
        set_status(out, "running", **extra)
    except BaseException:
        release(out)
        raise


def holds(out: Path) -> bool:
    """Whether this process holds ``out``."""
    return _lock_key(out) in _LOCKS


def release(out: Path) -> None:
    """Let go of ``out`` (a run that stops before it started, e.g. a refused resume)."""
    fd = _LOCKS.pop(_lock_key(out), None)
    if fd is not None:
        os.close(fd)


def finish_run(out: Path, drop: tuple[str, ...] = (), **extra: Any) -> None:
    """Mark the run in ``out`` done, then delete its files ``drop`` (such as a checkpoint the result
    replaces) and the run it replaced (if any), and let go of ``out``."""
    try:
        set_status(out, "done", **extra)
        for name in drop:
            (out / name).unlink(missing_ok=True)
        drop_replaced(out)
    finally:
        release(out)


def fail_run(out: Path, error: BaseException, **extra: Any) -> None:
    """Mark the run in ``out`` failed, say where the run it was replacing is kept, and let go of ``out``."""
    try:
        set_status(out, "failed", error=f"{type(error).__name__}: {error}", **extra)
    finally:
        release(out)
    aside = replaced_folder(out)
    if aside.is_dir():
        logger.warning("the run that --overwrite was replacing is kept in %s", aside)


def read_checkpoint(path: Path, needs: tuple[str, ...], what: str,
                    fix: str = "pass --overwrite to start again, or choose another --out") -> dict[str, Any]:
    """The checkpoint file ``path`` of a ``what`` run, holding the keys ``needs``.

    Raises:
        RunDirError: it cannot be read (cut short, damaged) or was written by another stage.
    """
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, garbage, empty file: torch raises many kinds
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunDirError(f"{path} cannot be read ({reason}): it is damaged; {fix}") from None
    if not isinstance(ckpt, dict) or any(key not in ckpt for key in needs):
        raise RunDirError(f"{path} is not a {what} checkpoint (a folder of another stage?); {fix}")
    return ckpt


def set_status(out: Path, state: str, **extra: Any) -> None:
    io.write_json(Path(out) / STATUS, {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra})
