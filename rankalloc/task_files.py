"""Task data from local files: a .csv/.tsv/.json/.jsonl/.parquet file, or a folder of split files.

:func:`rankalloc.tasks.load_raw_task` is the entry point; this module holds :class:`RawTask` and local-file
reading (:func:`read_table`: encodings, quoting, values as written).  ``datasets`` sources are
:mod:`rankalloc.task_datasets`'; which columns each task family needs is :mod:`rankalloc.task_columns`', and
how class labels are encoded :mod:`rankalloc.task_labels`'.
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
from .task_columns import column_list, encode_targets, resolve_family, select_columns
from .task_labels import drop_unlabelled, numbers_as_written

__all__ = ["EVAL_SPLITS", "LOCAL_EXTENSIONS", "RawTask", "decode_mixed", "read_table"]

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

    Text files are decoded line by line (UTF-8, else Windows-1252: :func:`decode_mixed`), or as UTF-16 after
    its byte-order mark.  In CSV/TSV only an empty cell is missing: "NA", "null" or "None" are text or class
    names, and ``text_columns`` keep their text as written ("007" stays "007", not 7.0).

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
                    df[column] = numbers_as_written(df[column])
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
