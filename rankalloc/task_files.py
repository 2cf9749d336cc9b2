"""Task data from local files and ``datasets`` hub names.

:func:`rankalloc.tasks.load_raw_task` is the entry point; this module holds :class:`RawTask`, local-file
reading (:func:`read_table`) and hub loading.  Which columns each task family needs, and how targets
are encoded, is :mod:`rankalloc.task_columns`' job.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from .config import DataConfig
from .errors import DataError, first_line
from .task_columns import (DECIMAL_LITERAL, INTEGER_CODE, column_list, drop_unlabelled, encode_labels, encode_targets,
                           resolve_family, select_columns)

__all__ = ["EVAL_SPLITS", "LOCAL_EXTENSIONS", "RawTask", "decode_mixed", "encode_labels", "read_table"]

EVAL_SPLITS = ("validation", "valid", "val", "dev", "test")  # the first present is the evaluation split

logger = logging.getLogger("rankalloc.tasks")  # one logger for the task modules, as before the split

LOCAL_EXTENSIONS = (".csv", ".tsv", ".json", ".jsonl", ".parquet")


@dataclass
class RawTask:
    """Untokenised task data in the columns of its family (see :mod:`rankalloc.task_columns`)."""

    name: str
    train: pd.DataFrame
    eval: pd.DataFrame | None  # None when the source has no evaluation split
    label_names: list[str]  # classes; ["target"] for regression; option numbers; [] for causal LM
    has_pair: bool
    family: str = "classification"

    def __post_init__(self) -> None:  # rows numbered 0..n-1 (sources keep their own row numbers until here)
        self.train = self.train.reset_index(drop=True)
        if self.eval is not None:
            self.eval = self.eval.reset_index(drop=True)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _frame(texts: Iterable[str], labels: Iterable[int], pairs: Iterable[str] | None = None) -> pd.DataFrame:
    data: dict[str, Any] = {"text": list(texts)}
    if pairs is not None:
        data["text_pair"] = list(pairs)
    data["label"] = np.asarray(list(labels), dtype=np.int64)
    return pd.DataFrame(data)


# --------------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------------
def reject_hub_config(cfg: DataConfig, kind: str) -> None:
    """``--data.hub_config`` names a configuration of a hub dataset: refuse it for any other ``kind`` of task."""
    if cfg.hub_config is not None:
        raise DataError(f"--task {cfg.task} is a {kind}, so --data.hub_config does not apply; drop it")


def _text_columns(cfg: DataConfig) -> list[str]:
    """The columns ``cfg`` reads as text: kept as written in a CSV file ("007", "3.10", "NA" are text).  A
    multiple-choice label too: it may be an option's own text ("16" among the options 14, 15, 16)."""
    answer = cfg.answer_column or ("answer" if cfg.family == "causal_lm" else None)  # as select_columns reads it
    choice_label = cfg.label_column if cfg.choice_columns or cfg.family == "multiple_choice" else None
    named = [cfg.text_column, cfg.text_pair_column, answer, *(cfg.choice_columns or []), choice_label]
    return [c for c in named if c is not None]


def _load_local(cfg: DataConfig, path: Path) -> RawTask:
    reject_hub_config(cfg, "local file")
    table = read_table(path, _text_columns(cfg))
    family = resolve_family(cfg, table)
    train = select_columns(table, cfg, family, str(path))
    evaluation = None
    if cfg.eval_file is not None:
        eval_path = Path(cfg.eval_file).expanduser()
        if eval_path.suffix.lower() not in LOCAL_EXTENSIONS:
            raise DataError(f"--data.eval_file {cfg.eval_file}: unknown file extension {eval_path.suffix!r}; "
                            f"use one of {', '.join(LOCAL_EXTENSIONS)}")
        if not eval_path.exists():
            raise DataError(f"--data.eval_file {cfg.eval_file}: no such file")
        evaluation = select_columns(read_table(eval_path, _text_columns(cfg)), cfg, family, str(eval_path))
    wheres = f"{path} column {cfg.label_column!r}", f"{cfg.eval_file} column {cfg.label_column!r}"
    if family == "classification":
        train, evaluation = drop_unlabelled(train, evaluation, *wheres)
    untyped = (".csv", ".tsv")  # every value is text there
    typed = (path.suffix.lower() not in untyped,
             cfg.eval_file is None or Path(cfg.eval_file).suffix.lower() not in untyped)
    names = encode_targets(family, train, evaluation, *wheres, typed=typed)
    return RawTask(path.stem, train, evaluation, names, "text_pair" in train.columns, family)


def split_file(folder: Path, split: str) -> Path | None:
    """``folder``'s file ``<split>.csv/.tsv/.json/.jsonl/.parquet`` (any case), or None.

    Raises:
        DataError: more than one such file (which one is meant is not clear).
    """
    found = [p for p in sorted(folder.iterdir())
             if p.is_file() and p.stem.lower() == split and p.suffix.lower() in LOCAL_EXTENSIONS]
    if len(found) > 1:
        raise DataError(f"{folder}: {len(found)} files hold the {split} split ({', '.join(p.name for p in found)}); "
                        "keep one")
    return found[0] if found else None


def load_folder(cfg: DataConfig, folder: Path, train: Path) -> RawTask:
    """A folder of split files, each read as a local file: ``train`` and, unless ``--data.eval_file`` is
    given, the first of :data:`EVAL_SPLITS` present as the evaluation split."""
    if cfg.eval_file is None:
        evaluation = next((p for p in (split_file(folder, s) for s in EVAL_SPLITS) if p is not None), None)
        if evaluation is not None:
            logger.info("--task %s: training on %s, evaluating on %s", cfg.task, train.name, evaluation.name)
            cfg = dataclasses.replace(cfg, eval_file=str(evaluation))
    raw = _load_local(cfg, train)
    return dataclasses.replace(raw, name=folder.resolve().name)


def read_table(path: Path, text_columns: Iterable[str] = ()) -> pd.DataFrame:
    """Read a .csv/.tsv/.json/.jsonl/.parquet file into a frame.

    Text files are decoded line by line (UTF-8, else Windows-1252: :func:`decode_mixed`), or as UTF-16 after its mark.  In CSV/TSV only an
    empty cell is missing: "NA", "null" or "None" are text or class names, and ``text_columns`` keep their
    text as written ("007" stays "007", not 7.0).

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
            text = _decoded(path)
            tsv = suffix == ".tsv"
            df = pd.read_csv(io.StringIO(text), sep="\t" if tsv else ",",
                             quoting=_tsv_quoting(text) if tsv else csv.QUOTE_MINIMAL,
                             keep_default_na=False, na_values=[""], dtype=str)
            _refuse_ragged(df, path, "tab" if tsv else "comma")
            text_columns = set(text_columns)
            for column in df.columns:
                if column not in text_columns:
                    df[column] = _numbers_as_written(df[column])
        elif suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            df = _read_json(path)
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty") from None
    except Exception as e:  # parser errors of pandas/pyarrow/json come in many types
        raise DataError(f"{path}: cannot parse it as {suffix[1:]} ({first_line(e)})") from None
    if len(df) == 0:
        raise DataError(f"{path}: the file has no rows")
    return df


def _refuse_ragged(df: pd.DataFrame, path: Path, delimiter: str) -> None:
    """pandas reads rows holding more fields than the header as having an index column, which shifts every
    column by one (text read from the label's place): refuse instead."""
    if not isinstance(df.index, pd.RangeIndex):
        raise DataError(f"{path}: its first rows hold more fields than its header names ({len(df.columns)}: "
                        f"{column_list(df.columns)}); a {delimiter} at the end of each line, or a {delimiter} "
                        "inside an unquoted text? Quote the fields that hold one")


def _numbers_as_written(values: pd.Series) -> pd.Series:
    """A CSV column read as text, as numbers when every value is a number that reads back as written
    (pandas' own inference turns the label codes "007" and "07" into one class, 7)."""
    present = values.dropna().str.strip()  # " 0.5" is a number, as pandas reads it
    if not len(present):
        return values
    if present.str.lower().isin(("true", "false")).all():  # booleans, as pandas reads them
        return values.map(lambda v: v if pd.isna(v) else v.strip().lower() == "true")
    if not present.str.fullmatch(DECIMAL_LITERAL).all() or present.str.fullmatch(INTEGER_CODE).any():
        return values
    return pd.to_numeric(values.str.strip())


def decode_mixed(data: bytes, fallback: str = "cp1252") -> str:
    """Decode bytes line by line: UTF-8 where valid, else ``fallback`` (Windows-1252 by default: Latin-1's
    printable characters plus the quotes, dashes and euro sign Windows editors write in 0x80-0x9f), else
    Latin-1 (never fails, keeps every line)."""
    lines = []
    for line in data.split(b"\n"):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            try:
                lines.append(line.decode(fallback))
            except UnicodeDecodeError:  # cp1252 leaves five bytes undefined
                lines.append(line.decode("latin-1"))
    return "\n".join(lines)


_UTF16_MARKS = (b"\xff\xfe", b"\xfe\xff")


def _decoded(path: Path) -> str:
    """A text file's contents (:func:`decode_mixed`; UTF-16 when it starts with UTF-16's byte-order mark),
    without a byte-order mark, which would otherwise stick to the first column's name or break JSON.

    Raises:
        DataError: a UTF-16 file that does not decode as UTF-16.
    """
    data = path.read_bytes()
    if data.startswith(_UTF16_MARKS):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: starts with UTF-16's byte-order mark but is not valid UTF-16 ({e.reason} at "
                            f"byte {e.start}); save it as UTF-8") from None
    text = decode_mixed(data)
    return text[1:] if text.startswith("\ufeff") else text


def _tsv_quoting(text: str) -> int:
    """How a TSV quotes: not at all (GLUE's convention: a quote character is text), unless the file is
    written with standard quoting (as pandas and datasets write fields holding tabs, newlines or quotes):
    that alone gives every row the same number of fields, or every field that starts with a quote is a
    whole quoted field (in quotes, with the quotes inside doubled)."""
    plain_even, quoted = _rows_even(text, csv.QUOTE_NONE, quoted=True)
    standard_even, _ = _rows_even(text, csv.QUOTE_MINIMAL)
    if not plain_even:
        return csv.QUOTE_MINIMAL if standard_even else csv.QUOTE_NONE  # ragged either way: the parser names
        # the first bad line
    return csv.QUOTE_MINIMAL if standard_even and quoted else csv.QUOTE_NONE


def _rows_even(text: str, quoting: int, quoted: bool = False) -> tuple[bool, bool]:
    """Whether ``text`` parses as tab-separated rows that all hold the same number of fields, and (with
    ``quoted``) whether some field starts with a quote and every such field is a whole quoted field.  Reads
    row by row: the rows are not kept (a large file parsed twice would hold two copies)."""
    widths: set[int] = set()
    some_quoted, all_whole = False, True
    try:
        for row in csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=quoting):
            if not row:
                continue
            widths.add(len(row))
            if len(widths) > 1:
                return False, False
            if quoted:
                starts = [field for field in row if field.startswith('"')]
                some_quoted = some_quoted or bool(starts)
                all_whole = all_whole and all(_is_quoted_field(field) for field in starts)
    except csv.Error:
        return False, False
    return len(widths) == 1, some_quoted and all_whole


def _is_quoted_field(field: str) -> bool:
    """A field as standard quoting writes it: in quotes, every quote inside doubled."""
    return len(field) >= 2 and field.endswith('"') and '"' not in field[1:-1].replace('""', "")


def _read_json(path: Path) -> pd.DataFrame:
    """A JSON list of records, {"data"|"examples"|...: [records]}, a column mapping (of lists, or of
    {row: value} as pandas' to_json writes by default), pandas' "split" and "index" layouts, or JSON lines (always, for
    a .jsonl file: one line is one record)."""
    text = _decoded(path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    if path.suffix.lower() == ".jsonl":
        return _read_json_lines(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_json_lines(path, text)
    if isinstance(data, list):
        return _records_frame(data, path)
    if isinstance(data, dict) and {"columns", "data"} <= set(data) and isinstance(data["data"], list):
        return pd.DataFrame(data["data"], columns=data["columns"])  # to_json(orient="split")
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()) \
            and len({tuple(v) for v in data.values()}) == 1 and not any(isinstance(x, (dict, list)) for v in
                                                                        data.values() for x in v.values()):
        if all(k.lstrip("-").isdigit() for k in data) and not all(str(k).lstrip("-").isdigit()
                                                                     for k in next(iter(data.values()))):
            return pd.DataFrame.from_dict(data, orient="index")  # to_json(orient="index"): {"0": {"text": ...}}
        return pd.DataFrame(data)  # to_json's default: {"text": {"0": ..., "1": ...}, "label": {...}}
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


# --------------------------------------------------------------------------------------------------
# datasets: the hub, and folders written by save_to_disk
# --------------------------------------------------------------------------------------------------
def _load_hub(cfg: DataConfig, builtin_names: Iterable[str]) -> RawTask:
    """Load ``cfg.task`` with ``datasets.load_dataset``; train = "train", eval = "validation" or "test".

    ``builtin_names`` are the built-in tasks, suggested in the message when the hub cannot be reached.

    Raises:
        DataError: the dataset cannot be loaded (e.g. offline), has no train split, or is malformed.
    """
    label = f"--task {cfg.task}" + (f" (--data.hub_config {cfg.hub_config})" if cfg.hub_config else "")
    offline_hint = (f"offline, give a local {'/'.join(LOCAL_EXTENSIONS)} file or a built-in task "
                    f"({', '.join(builtin_names)})")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{label}: not a built-in task or local file, and the 'datasets' package is not "
                        f"installed to load it from the hub; {offline_hint}") from None
    try:
        splits = datasets.load_dataset(cfg.task, cfg.hub_config)
    except Exception as e:  # network, missing dataset, bad config: all user-fixable
        if Path(cfg.task).expanduser().is_dir():
            raise DataError(f"{label}: a folder holding neither a train.{{{','.join(s[1:] for s in LOCAL_EXTENSIONS)}}} "
                            "file nor a dataset written by save_to_disk, and datasets.load_dataset could not read it "
                            f"({first_line(e)})") from None
        raise DataError(f"{label}: could not be loaded as a datasets hub name ({first_line(e)}); "
                        f"{offline_hint}") from None
    name = cfg.task.rstrip("/").split("/")[-1] + (f"-{cfg.hub_config}" if cfg.hub_config else "")
    return _from_splits(splits, cfg, label, name)


def _load_saved(cfg: DataConfig, path: Path) -> RawTask:
    """Load a folder written by ``save_to_disk``: a ``DatasetDict``, or one ``Dataset`` as the training
    split (the evaluation split is then held out of it).

    Raises:
        DataError: hub-only settings given, an unreadable folder, no train split, or malformed data.
    """
    label = f"--task {cfg.task}"
    for flag, value in (("--data.hub_config", cfg.hub_config), ("--data.eval_file", cfg.eval_file)):
        if value is not None:
            raise DataError(f"{label} is a folder written by save_to_disk, so {flag} does not apply; drop it "
                            "(to evaluate on other data, save a DatasetDict with a 'validation' (or 'test') split)")
    import datasets

    try:
        splits = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{label}: a folder written by save_to_disk that could not be read ({first_line(e)})") from None
    if isinstance(splits, datasets.Dataset):
        splits = datasets.DatasetDict({"train": splits})
    return _from_splits(splits, cfg, label, path.resolve().name)


def _from_splits(splits: Any, cfg: DataConfig, label: str, name: str) -> RawTask:
    """A ``datasets`` split dict as a task: train = "train", eval = the first of :data:`EVAL_SPLITS`;
    ``ClassLabel`` names are kept."""
    import datasets

    if not hasattr(splits, "keys") or "train" not in splits:
        found = ", ".join(splits.keys()) if hasattr(splits, "keys") else type(splits).__name__
        raise DataError(f"{label}: has no 'train' split (splits: {found})")
    eval_name = next((s for s in EVAL_SPLITS if s in splits), None)
    if eval_name is None and len(splits) > 1:
        others = ", ".join(repr(s) for s in splits if s != "train")
        logger.warning("%s: no split is named %s, so split(s) %s are not used and part of 'train' is held out "
                       "for evaluation; save the one to evaluate on as 'validation'", label,
                       " or ".join(repr(s) for s in EVAL_SPLITS), others)
    table = splits["train"].to_pandas()
    family = resolve_family(cfg, table)
    train = select_columns(table, cfg, family, f"{label} split 'train'")
    evaluation = None
    if eval_name is not None:
        evaluation = select_columns(splits[eval_name].to_pandas(), cfg, family, f"{label} split {eval_name!r}")
    feature = splits["train"].features.get(cfg.label_column)
    class_names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    wheres = (f"{label} split 'train' column {cfg.label_column!r}",
              f"{label} split {eval_name!r} column {cfg.label_column!r}")
    eval_feature = splits[eval_name].features.get(cfg.label_column) if eval_name is not None else None
    if class_names is not None and evaluation is not None and family == "classification":
        evaluation = _to_train_ids(evaluation, eval_feature, class_names, wheres[1])
    elif (evaluation is not None and family == "classification" and isinstance(eval_feature, datasets.ClassLabel)
          and train["label"].map(lambda v: isinstance(v, str)).all()):
        evaluation = _to_names(evaluation, list(eval_feature.names), wheres[1])
    if family == "classification":  # ClassLabel -1: an unlabelled row; a plain column: see drop_unlabelled
        train, evaluation = drop_unlabelled(train, evaluation, *wheres, class_label=class_names is not None)
    if class_names is not None and family == "classification":
        names = class_names
        _check_class_ids(train, names, f"{label} split 'train'", is_train=True)
        if evaluation is not None:
            _check_class_ids(evaluation, names, f"{label} split {eval_name!r}", is_train=False)
    else:
        names = encode_targets(family, train, evaluation, *wheres)
    if evaluation is not None:
        logger.info("%s: evaluating on the %r split", label, eval_name)
    return RawTask(name, train, evaluation, names, "text_pair" in train.columns, family)


def _to_train_ids(evaluation: pd.DataFrame, feature: Any, names: list[str], where: str) -> pd.DataFrame:
    """The evaluation split's labels as ids of the training split's ``ClassLabel`` ``names``: by name when
    the split has its own ``ClassLabel`` (in another order, or a subset) or plain class names; integer
    ids are kept as they are.  A negative id (unlabelled) stays negative.

    Raises:
        DataError: an evaluation class name the training split does not have.
    """
    import datasets

    labels = evaluation["label"]
    if isinstance(feature, datasets.ClassLabel):
        if list(feature.names) == names:
            return evaluation
        own = list(feature.names)
        labels = labels.map(lambda i: own[i] if 0 <= i < len(own) else i)
    present = labels.map(lambda v: isinstance(v, str))
    if not present.any():
        return evaluation
    unknown = sorted(set(labels[present]) - set(names))
    if unknown:
        raise DataError(f"{where}: class name(s) {', '.join(map(repr, unknown[:5]))} are not among the training "
                        f"split's classes ({', '.join(names)})")
    ids = {name: i for i, name in enumerate(names)}
    mapped = labels.map(lambda v: ids[v] if isinstance(v, str) else v)
    evaluation = evaluation.copy()
    evaluation["label"] = mapped.astype("int64") if mapped.notna().all() else mapped
    return evaluation


def _to_names(evaluation: pd.DataFrame, names: list[str], where: str) -> pd.DataFrame | None:
    """An evaluation split's ``ClassLabel`` ids as its class ``names``, for a training split that holds
    plain class names; rows with a negative id (unlabelled) are dropped, and a split without a labelled
    row is None (part of train is held out instead)."""
    ids = evaluation["label"].astype("int64")
    hidden = (ids < 0).to_numpy()
    if hidden.all():
        logger.warning("%s: no row has a label (negative class ids only); holding out part of the training "
                       "split instead", where)
        return None
    if hidden.any():
        logger.warning("%s: dropping %d row(s) without a label (class id -1)", where, int(hidden.sum()))
    evaluation = evaluation[~hidden].copy()
    evaluation["label"] = [names[i] for i in ids[~hidden]]
    return evaluation


def _is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``datasets``' ``save_to_disk`` (one split or a dict of them)."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def _check_class_ids(df: pd.DataFrame, names: list[str], where: str, is_train: bool) -> None:
    """Raises: DataError when a split is empty, an id has no class name, or training has one class."""
    if len(df) == 0:
        raise DataError(f"{where}: no labelled rows")
    if df["label"].max() >= len(names):
        raise DataError(f"{where}: label id {int(df['label'].max())} outside the {len(names)} class names")
    if is_train and df["label"].nunique() < 2:
        raise DataError(f"{where}: only one class in the labels; a classifier needs at least two")
