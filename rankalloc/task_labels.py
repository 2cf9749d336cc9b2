"""Class labels as sources write them: integer ids or class names, the rule for numbers written as text,
one shared encoding over a task's splits, and rows without a label."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from .errors import DataError

logger = logging.getLogger("rankalloc.tasks")  # one logger for the task modules

DECIMAL_LITERAL = r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?"  # ASCII digits: what to_numeric reads


def _label_kind(values: pd.Series, where: str) -> str:
    """'int' or 'name' for a column of labels.

    Row numbers in messages are the frame's index: the row in the source, counted from 0.

    Raises:
        DataError: a label is missing, a list (multi-label), or neither an integer nor a class name (e.g. 0.5).
    """
    missing = values.isna().to_numpy()
    if missing.any():
        row = values.index[np.flatnonzero(missing)[0]]
        raise DataError(f"{where}: {int(missing.sum())} missing label(s) (first at row {row}); labels must be "
                        "integer ids or class names")
    listed = np.flatnonzero(values.map(lambda v: isinstance(v, (list, tuple, set, dict, np.ndarray))).to_numpy())
    if len(listed):
        raise DataError(f"{where}: row {values.index[listed[0]]} holds several labels "
                        f"({short(values.iloc[listed[0]])}); one label per row is allowed (multi-label "
                        "classification is not supported)")
    kinds = set()
    for v in pd.unique(values):
        if isinstance(v, (bool, np.bool_)):
            kinds.add("int")
        elif isinstance(v, (int, np.integer)):
            kinds.add("int")
        elif isinstance(v, (float, np.floating)):
            if not float(v).is_integer():
                raise DataError(f"{where}: label {v!r} is neither an integer id nor a class name (for a "
                                "regression target use --data.family regression)")
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


# Integer literals in label text, one rule for every reader: "7" is the id 7, while "007" and "07" are two
# class codes (read as numbers they would merge into 7), and a column holding one code keeps all as names.
INTEGER_AS_WRITTEN = r"[+-]?(0|[1-9][0-9]*)"  # reads back as written: no leading zero
INTEGER_CODE = r"[+-]?0[0-9]+"  # a leading zero: a class code, not a number
INTEGER_LITERAL = f"(?:{INTEGER_AS_WRITTEN})|(?:{INTEGER_CODE})"


def short(value: object, limit: int = 40) -> str:
    text = repr(value.tolist() if isinstance(value, np.ndarray) else value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _normalise_labels(values: pd.Series, where: str) -> pd.Series:
    """Integers as int64; booleans as the class names "False" and "True"; strings stripped, and turned into
    int64 when every one is an integer literal."""
    kind = _label_kind(values, where)
    if len(values) and values.map(lambda v: isinstance(v, (bool, np.bool_))).all():
        return values.map(lambda v: str(bool(v)))
    if kind == "int":
        return values.astype("int64")
    names = values.astype(str).str.strip()
    if names.str.fullmatch(INTEGER_AS_WRITTEN).all():  # "007" and "07" stay two class names, not the id 7
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
    if not all(pd.api.types.is_integer_dtype(s) for s, _ in normalised) and all(
            pd.api.types.is_integer_dtype(s) or s.str.fullmatch(INTEGER_LITERAL).all() for s, _ in normalised):
        # codes such as "007" in one split make every split's integers class names ("120" in another)
        normalised = [(s.astype(str), where) for s, where in normalised]
    kinds = {"int" if pd.api.types.is_integer_dtype(s) else "name" for s, _ in normalised}
    if len(kinds) > 1:
        raise DataError(f"{' and '.join(w for _, w in columns)}: labels are integer ids in one and class names "
                        "in the other; use the same kind in both")
    kind = kinds.pop()
    everything = pd.concat([s for s, _ in normalised], ignore_index=True)
    if label_names is not None:
        mapping = {name: i for i, name in enumerate(label_names)}
        names = list(label_names)
    elif kind == "int" and everything.min() == 0 and everything.max() + 1 <= 2 * everything.nunique():
        # ids 0..K-1 as they are (a class missing from a sample keeps its id); sparse or 1-based ids such
        # as star ratings 1..5 or {0, 100000} fall through to sorted, re-indexed names below
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


def drop_unlabelled(train: pd.DataFrame, evaluation: pd.DataFrame | None, train_where: str,
                    eval_where: str, class_label: bool = False) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Set aside the unlabelled rows of a classification task.

    In a ``datasets`` ``ClassLabel`` column (``class_label``) a negative id marks an unlabelled row (e.g.
    GLUE's test splits): such rows are dropped.  In a plain column -1 can be a real class (-1/0/1
    sentiment), so there only an evaluation split whose every label is negative, while train has no
    negative label, counts as unlabelled.  An unlabelled evaluation split is dropped whole, so that part
    of train is held out instead.

    Raises:
        DataError: no training row of a ``ClassLabel`` column has a label, or a label is malformed (as
            :func:`encode_labels` says).
    """
    hidden = _unlabelled(train["label"], train_where)
    if class_label and hidden.all():  # in a plain column, all-negative ids ({-2, -1}) are classes
        raise DataError(f"{train_where}: no row has a label (class id -1 marks an unlabelled row)")
    if class_label and hidden.any():
        logger.warning("%s: dropping %d row(s) without a label (class id -1)", train_where, int(hidden.sum()))
        train = train[~hidden].copy()
    if evaluation is not None:
        hidden_eval = _unlabelled(evaluation["label"], eval_where)
        if hidden_eval.all() and (class_label or not hidden.any()):
            logger.warning("%s: no row has a label (negative class ids only); holding out part of the training "
                           "split instead", eval_where)
            evaluation = None
        elif class_label and hidden_eval.any():
            logger.warning("%s: dropping %d row(s) without a label (class id -1)", eval_where,
                           int(hidden_eval.sum()))
            evaluation = evaluation[~hidden_eval].copy()
    return train, evaluation


def _unlabelled(values: pd.Series, where: str) -> np.ndarray:
    """Rows whose label is a negative integer id; missing labels are left for the encoding to report."""
    present = values.notna().to_numpy()
    ids = _normalise_labels(values[present], where) if present.any() else values
    hidden = np.zeros(len(values), dtype=bool)
    if pd.api.types.is_integer_dtype(ids):
        hidden[present] = ids.to_numpy() < 0
    return hidden


def encode_in_place(train: pd.DataFrame, evaluation: pd.DataFrame | None, train_where: str,
                     eval_where: str) -> list[str]:
    """Encode the ``label`` column of train (and eval) with one shared mapping; return the class names."""
    columns = [(train["label"], train_where)]
    if evaluation is not None:
        columns.append((evaluation["label"], eval_where))
    encoded, names = encode_labels(columns)
    train["label"] = encoded[0].to_numpy()
    if evaluation is not None:
        evaluation["label"] = encoded[1].to_numpy()
    return names


def numbers_as_written(values: pd.Series) -> pd.Series:
    """A column of texts as numbers when every value is a number that reads back as written (pandas' own
    inference turns the label codes "007" and "07" into one class, 7), as booleans when every value is
    true/false; else as it is."""
    present = values.dropna().str.strip()  # " 0.5" is a number, as pandas reads it
    if not len(present):
        return values
    if present.str.lower().isin(("true", "false")).all():  # booleans, as pandas reads them
        return values.map(lambda v: v if pd.isna(v) else v.strip().lower() == "true")
    if not present.str.fullmatch(DECIMAL_LITERAL).all() or present.str.fullmatch(INTEGER_CODE).any():
        return values
    return pd.to_numeric(values.str.strip())
