"""Run folders: created fresh, resumed, or refused; a status file says whether the content is whole.

``status.json`` holds ``{"state": "running" | "done" | "failed", ...}``.  A folder whose state is
not ``done`` holds no result to trust: results are written last, each atomically, and the state flips
to ``done`` only after all of them exist.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from . import io
from .errors import RunDirError

STATUS = "status.json"
CHECKPOINT = "checkpoint.pt"


def default_out(stage: str, label: str, seed: int) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in label)
    return Path("runs") / f"{stage}-{safe}-seed{seed}-{stamp}"


def read_status(out: Path) -> dict[str, Any] | None:
    path = Path(out) / STATUS
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {"state": "unknown"}


def open_run(out: str | Path, *, overwrite: bool, resume: bool) -> tuple[Path, bool]:
    """Prepare ``out``; return (folder, whether to resume from its checkpoint).

    * new or empty folder: start;
    * ``--overwrite``: a previous run's folder (it has ``status.json``) is emptied and the run starts
      afresh; any other non-empty folder is refused, never deleted;
    * a checkpoint and no finished result: the run resumes (``--resume`` or simply re-running);
    * a finished run: refused without ``--overwrite``;
    * ``--resume`` with nothing to resume: refused.

    Raises:
        RunDirError: as above, or ``out`` is a file.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a folder")
    has_content = out.is_dir() and any(out.iterdir())
    status = read_status(out) if has_content else None
    has_ckpt = (out / CHECKPOINT).is_file()
    if overwrite and has_content:
        remove_run(out)
        has_content, status, has_ckpt = False, None, False
    if resume and not has_ckpt:
        raise RunDirError(f"--resume: {out} holds no checkpoint to resume from")
    if has_content and status is not None and status.get("state") == "done" and not resume:
        raise RunDirError(f"--out {out} holds a finished run; pass --overwrite to replace it or choose "
                          "another --out")
    if has_content and not has_ckpt and not overwrite:
        raise RunDirError(f"--out {out} is not empty and holds no resumable run; pass --overwrite or "
                          "choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out, has_ckpt


def remove_run(out: Path, marks: tuple[str, ...] = (STATUS,)) -> None:
    """Delete the run folder ``out`` for ``--overwrite``, but only if it holds one of ``marks`` (files every
    rankalloc run writes first): a mistyped ``--out`` pointing at a folder of one's own is refused, not wiped.

    Raises:
        RunDirError: ``out`` holds none of ``marks``.
    """
    if not any((out / mark).is_file() for mark in marks):
        raise RunDirError(f"--overwrite: {out} is not empty and holds no {' or '.join(marks)}, so it is not a "
                          "rankalloc run folder; it is left as it is: choose a new or empty --out")
    shutil.rmtree(out)


def set_status(out: Path, state: str, **extra: Any) -> None:
    io.write_json(Path(out) / STATUS, {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra})
