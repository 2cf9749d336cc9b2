"""Tasks from ``datasets``: a hub name (where a network exists) or a folder written by ``save_to_disk``, as
a :class:`~rankalloc.task_files.RawTask`; ``ClassLabel`` names are kept."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from .config import DataConfig
from .errors import DataError, first_line
from .task_columns import encode_targets, resolve_family, select_columns
from .task_files import EVAL_SPLITS, LOCAL_EXTENSIONS, RawTask
from .task_labels import drop_unlabelled

logger = logging.getLogger("rankalloc.tasks")  # one logger for the task modules


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
            kinds = ",".join(s[1:] for s in LOCAL_EXTENSIONS)
            raise DataError(f"{label}: a folder holding neither a train.{{{kinds}}} "
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
