"""From a source's columns to a family's frame, and each family's targets (class labels are encoded by
:mod:`rankalloc.task_labels`).

Every source (built-in task, local file, ``datasets`` hub name) ends as frames with the columns its
task family needs (:mod:`rankalloc.families`):

* classification - ``text``, optional ``text_pair``, ``label`` (int64 class ids ``0..K-1``);
* regression     - ``text``, optional ``text_pair``, ``label`` (float64 targets);
* multiple_choice - ``text`` (the question), ``choices`` (a list of option texts), ``label`` (the index
  of the right option);
* causal_lm      - ``text`` (the prompt) and ``answer``.

A multiple-choice task can also be trained as causal LM on its right answers (:func:`convert_family`).
"""
from __future__ import annotations

import ast
import json
import logging
import math
import re

import numpy as np
import pandas as pd

from .config import DataConfig
from .errors import DataError
from .task_labels import encode_in_place, numbers_as_written, short

logger = logging.getLogger("rankalloc.tasks")  # one logger for the task modules


# --------------------------------------------------------------------------------------------------
# Families: which one a source is, and its columns
# --------------------------------------------------------------------------------------------------
_SHOWN_COLUMNS = 20


def column_list(columns) -> str:
    """Column names for a message: quoted (so that ' y' shows its space), at most 20 of them."""
    names = [repr(str(c)) for c in columns]
    more = f", ... ({len(names)} in all)" if len(names) > _SHOWN_COLUMNS else ""
    return ", ".join(names[:_SHOWN_COLUMNS]) + more


def resolve_family(cfg: DataConfig, df: pd.DataFrame) -> str:
    """``cfg.family``, or when it is ``auto``: multiple_choice with choice columns, causal_lm with an
    answer column, regression when the label column holds non-integer floats, else classification."""
    if cfg.family != "auto":
        return cfg.family
    if cfg.choice_columns:
        return "multiple_choice"
    if cfg.answer_column:
        return "causal_lm"
    column = df[cfg.label_column] if cfg.label_column in df.columns else None
    if column is not None and column.dropna().map(lambda v: isinstance(v, str)).all():
        column = numbers_as_written(column)  # targets stored as text (JSON, parquet, CSV): "0.25", "3.8"
    if column is not None and pd.api.types.is_float_dtype(column):
        values = column.dropna().to_numpy()
        if len(values) and not np.all(np.mod(values, 1) == 0):
            logger.info("column %r holds non-integer numbers: a regression task (set --data.family to "
                        "override)", cfg.label_column)
            return "regression"
    return "classification"


def select_columns(df: pd.DataFrame, cfg: DataConfig, family: str, where: str) -> pd.DataFrame:
    """Pick the columns ``family`` needs; drop rows whose text (or options, or answer) is missing.  The
    rows keep their index (their row in ``df``), so that messages about them name the source's row.

    Raises:
        DataError: a named column is missing (the message lists the available ones), options are malformed.
    """
    unused = {"classification": ("choice_columns", "answer_column"), "regression": ("choice_columns", "answer_column"),
              "multiple_choice": ("text_pair_column", "answer_column"),
              "causal_lm": ("text_pair_column", "choice_columns")}.get(family, ())
    for name in unused:  # a flag that does nothing here is a mistake about the family or the flag
        if getattr(cfg, name):
            raise DataError(f"{where}: --data.{name} does not apply to a {family} task; drop it, or set "
                            "--data.family to the family it belongs to")
    wanted = [("--data.text_column", cfg.text_column)]
    if family in ("classification", "regression"):
        if cfg.text_pair_column is not None:
            wanted.append(("--data.text_pair_column", cfg.text_pair_column))
        wanted.append(("--data.label_column", cfg.label_column))
    elif family == "multiple_choice":
        if not cfg.choice_columns:
            raise DataError(f"{where}: a multiple-choice task needs --data.choice_columns (one column holding a "
                            "list of options, or one column per option)")
        wanted += [("--data.choice_columns", c) for c in cfg.choice_columns]
        wanted.append(("--data.label_column", cfg.label_column))
    else:
        wanted.append(("--data.answer_column", cfg.answer_column or "answer"))
    available = [str(c) for c in df.columns]
    for flag, column in wanted:
        if column not in df.columns:
            raise DataError(f"{where}: no column {column!r} (set by {flag}); available columns: "
                            f"{column_list(available)}")
    out = pd.DataFrame({"text": df[cfg.text_column]})
    if family == "multiple_choice":
        out["choices"] = _options(df, list(cfg.choice_columns), where)
    elif family == "causal_lm":
        out["answer"] = df[cfg.answer_column or "answer"]
    elif cfg.text_pair_column is not None:
        out["text_pair"] = df[cfg.text_pair_column]
    if family != "causal_lm":
        out["label"] = df[cfg.label_column]
    for column in ("text", "text_pair", "answer"):
        if column in out:
            _refuse_structured_text(out[column], {"text": cfg.text_column, "text_pair": cfg.text_pair_column,
                                                  "answer": cfg.answer_column or "answer"}[column], where)
            blank = out[column].map(lambda v: isinstance(v, str) and not v.strip())
            if blank.any():  # empty or whitespace-only text: missing, in every format alike
                out[column] = out[column].astype(object).where(~blank, None)
    required = [c for c in ("text", "text_pair", "answer", "choices") if c in out]
    missing = out[required].isna().any(axis=1)
    if missing.all():
        empty = next((c for c in required if out[c].isna().all()), "text")
        source = {"text": cfg.text_column, "text_pair": cfg.text_pair_column, "answer": cfg.answer_column or "answer",
                  "choices": ",".join(cfg.choice_columns or [])}[empty]
        raise DataError(f"{where}: column {source!r} holds no text (every value is missing)")
    if missing.any():
        source = {"text": cfg.text_column, "text_pair": cfg.text_pair_column, "answer": cfg.answer_column or "answer",
                  "choices": "options"}
        counts = ", ".join(f"{source[c]!r}: {int(out[c].isna().sum())}" for c in required if out[c].isna().any())
        logger.warning("%s: dropping %d row(s) with a missing value (%s)", where, int(missing.sum()), counts)
        out = out[~missing].copy()
    for c in ("text", "text_pair", "answer"):
        if c in out:
            out[c] = out[c].astype(str)
    return out


def _refuse_structured_text(values: pd.Series, column: str, where: str) -> None:
    """A text column must hold texts: a list or mapping would be trained on as its printed form."""
    structured = np.flatnonzero(values.map(lambda v: isinstance(v, (list, tuple, dict, np.ndarray))).to_numpy())
    if len(structured):
        first, row = values.iloc[structured[0]], values.index[structured[0]]
        raise DataError(f"{where}: column {column!r} holds a {type(first).__name__} in row {row} "
                        f"({short(first)}); a text column needs one text per row (join the parts into one text, "
                        "or give them as --data.text_pair_column)")


def _parsed_list(text: str) -> object:
    """A list written into a CSV cell: as JSON, or as Python's repr (what pandas' and datasets' to_csv
    write); the text itself when it is neither."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text  # refused by the caller, as any other non-list


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _options(df: pd.DataFrame, columns: list[str], where: str) -> pd.Series:
    """Each row's options: from one list-valued column (a list written as JSON or Python in CSV files) or
    from several single-option columns.  Missing options (None, NaN) at the end are skipped; a row missing
    an option before a present one is dropped (with a warning), since its label counts the options."""
    rows = []
    gaps = 0
    for i in range(len(df)):
        if len(columns) == 1:
            value = df[columns[0]].iloc[i]
            if isinstance(value, str):
                value = _parsed_list(value)
            if _is_missing(value):
                rows.append(None)
                continue
            if not isinstance(value, (list, tuple, np.ndarray)):
                raise DataError(f"{where}: row {i} of column {columns[0]!r} is not a list of options (give a list, "
                                "or one column per option in --data.choice_columns)")
            values = list(value)
        else:
            values = [df[c].iloc[i] for c in columns]
        present = [not _is_missing(v) for v in values]
        last = max((j for j, kept in enumerate(present) if kept), default=-1)
        if not all(present[:last + 1]):
            gaps += 1
            rows.append(None)
            continue
        options = [str(v) for v, kept in zip(values, present) if kept]
        if len(options) < 2 or any(not o.strip() for o in options):
            raise DataError(f"{where}: row {i} has {len(options)} option(s) or an empty one; a multiple-choice "
                            "question needs at least two non-empty options")
        rows.append(options)
    if gaps:
        logger.warning("%s: dropping %d row(s) missing an option before a present one (the label counts the "
                       "options of %s)", where, gaps, ", ".join(columns))
    return pd.Series(rows, index=df.index, dtype=object)


def encode_targets(family: str, train: pd.DataFrame, evaluation: pd.DataFrame | None, train_where: str,
                   eval_where: str, typed: tuple[bool, bool] = (True, True)) -> list[str]:
    """Encode the ``label`` column of train (and eval) in place for ``family``; return the label names
    (classes; ``["target"]`` for regression; option numbers for multiple choice; none for causal LM).
    ``typed``, for train and eval: False where the labels come from CSV or TSV text (see :func:`_option_index`)."""
    if family == "classification":
        return encode_in_place(train, evaluation, train_where, eval_where)
    frames = [(train, train_where)] + ([(evaluation, eval_where)] if evaluation is not None else [])
    if family == "regression":
        for k, (frame, where) in enumerate(frames):
            frame["label"] = _float_targets(frame["label"], where, must_vary=k == 0)
        return ["target"]
    if family == "multiple_choice":
        for (frame, where), typed_labels in zip(frames, typed):
            frame["label"] = _option_index(frame, where, typed_labels)
        return [str(i) for i in range(max(int(f["choices"].map(len).max()) for f, _ in frames))]
    return []


def _float_targets(values: pd.Series, where: str, must_vary: bool = True) -> np.ndarray:
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(numbers)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DataError(f"{where}: {int(bad.sum())} target(s) are missing or not finite numbers (first at row "
                        f"{values.index[first]}: {values.iloc[first]!r}); a regression task needs a number in "
                        "every row")
    if must_vary and np.ptp(numbers) == 0:
        raise DataError(f"{where}: every target is {numbers[0]}; a regression task needs targets that vary")
    return numbers


_WHOLE_NUMBER = r"[+-]?[0-9]+(\.0*)?"  # an index as written: "2", or "2.0" from a float column


def _option_index(frame: pd.DataFrame, where: str, typed: bool = True) -> np.ndarray:
    """The right option's index: an integer in [0, options), a letter, or the option's own text.

    From a source that types its values (JSON, parquet, datasets) a string that is an option's text is that
    option, and a number is an index.  In a CSV or TSV file (``typed`` False) every label is text, so a
    column whose every label reads as an index in range is read as indices ("0"-"3" with the options 1, 2,
    3, 4), unless every label is also an option's text and the two readings differ: then which is meant
    cannot be told, and the column is refused.  Otherwise an option's text wins ("16" among 14, 15, 16).

    Raises:
        DataError: a label that is none of these, or an untyped column that reads both ways.
    """
    labels, choices = frame["label"].tolist(), frame["choices"].tolist()
    if not typed:
        texts = [str(label).strip() for label in labels]
        as_index = [int(float(t)) if re.fullmatch(_WHOLE_NUMBER, t) and 0 <= int(float(t)) < len(options) else None
                    for t, options in zip(texts, choices)]
        if None not in as_index:
            differ = [i for i, (t, k, options) in enumerate(zip(texts, as_index, choices))
                      if t in options and options.index(t) != k]
            if differ and all(t in options for t, options in zip(texts, choices)):
                i = differ[0]
                raise DataError(f"{where}: every label is both an option index and the text of one of its row's "
                                f"options, and the two readings differ in {len(differ)} row(s) (first: row "
                                f"{frame.index[i]}, label {texts[i]!r}); a CSV or TSV file cannot say which is "
                                "meant: write the labels as letters A, B, ..., or give the file as JSON, JSONL or "
                                "parquet (an integer is an index there, a string an option's text)")
            return np.array(as_index, dtype=np.int64)
        labels = texts
    out = np.empty(len(frame), dtype=np.int64)
    for i, (row, label, options) in enumerate(zip(frame.index, labels, choices)):
        text = str(label).strip()
        if isinstance(label, str) and text in options:  # the option's own text wins over a number-like text
            out[i] = options.index(text)
        elif re.fullmatch(_WHOLE_NUMBER, text) and 0 <= int(float(text)) < len(options):
            out[i] = int(float(text))
        elif isinstance(label, float) and label.is_integer() and 0 <= int(label) < len(options):
            out[i] = int(label)
        elif len(text) == 1 and text.isalpha() and 0 <= ord(text.upper()) - ord("A") < len(options):
            out[i] = ord(text.upper()) - ord("A")  # answer keys A, B, C, ... (ARC, CommonsenseQA)
        else:
            raise DataError(f"{where}: row {row} has label {label!r}, which is neither an option index in 0.."
                            f"{len(options) - 1}, a letter A.., nor the text of one of its options")
    return out


def convert_family(train: pd.DataFrame, evaluation: pd.DataFrame | None, source: str, target: str,
                   name: str) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Frames of family ``source`` as frames of ``target``: only multiple choice -> causal LM (prompt =
    question, answer = the right option) is defined.

    Raises:
        DataError: any other pair of families.
    """
    if source == target:
        return train, evaluation
    if (source, target) != ("multiple_choice", "causal_lm"):
        raise DataError(f"task {name} is a {source} task and cannot be read as {target}; allowed: --data.family "
                        f"{source}" + (" or causal_lm" if source == "multiple_choice" else "") + " (or auto)")

    def answers(frame: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"text": frame["text"].to_numpy(),
                             "answer": [c[int(k)] for c, k in zip(frame["choices"], frame["label"])]})

    return answers(train), (answers(evaluation) if evaluation is not None else None)
