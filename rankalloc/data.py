"""Splits, tokenisation and batching of a task.

``prepare_task(cfg, tokenizer, seed)`` turns a raw task (:mod:`rankalloc.tasks`) into padded tensors:

* **train / eval**: the source's evaluation split, or a stratified held-out slice of ``cfg.eval_fraction``;
  both are then capped by seeded random samples.  All of this is seeded by ``cfg.split_seed``, never by
  the run seed, so every run and every seed sees the same training and evaluation examples.
* **weight / gate**: a stratified partition of train (``cfg.gate_fraction`` to gate), seeded by the run
  seed.  The search trains adapter weights on ``weight`` and rank gates on ``gate``; ``eval`` is never
  seen by the search and is only carried for the retrain stage.

:class:`EpochSampler` draws training batches: a fresh permutation per epoch from
``np.random.default_rng([seed, epoch])``, with a two-number state so a resumed run sees the same batches.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from .config import DataConfig, with_data_defaults
from .errors import DataError, ModelError
from .families import Classification, Family, make_family
from .tasks import RawTask, load_raw_task
from .tokenization import MODEL_INPUTS

logger = logging.getLogger(__name__)

# Sub-streams of the split seed / run seed, so that each random choice is independent of the others.
_EVAL_SPLIT, _TRAIN_CAP, _EVAL_CAP, _GATE_SPLIT = 1, 2, 3, 4

Indices = Sequence[int] | np.ndarray | torch.Tensor | slice


# --------------------------------------------------------------------------------------------------
# Tensors of one split
# --------------------------------------------------------------------------------------------------
@dataclass
class Split:
    """Padded tensors of one split: ``input_ids``, ``attention_mask``, optional ``token_type_ids``,
    ``labels``, and whatever else the task family adds (option masks, answer token labels).

    ``sequence_keys`` name the tensors whose last axis is the token axis (trimmed per batch).
    Multiple-choice tensors are ``(examples, options, tokens)``.
    """

    tensors: dict[str, torch.Tensor]
    sequence_keys: tuple[str, ...] = MODEL_INPUTS

    def __post_init__(self) -> None:
        missing = [k for k in ("input_ids", "attention_mask", "labels") if k not in self.tensors]
        if missing:
            raise ValueError(f"Split needs the tensors {missing}")
        sizes = {k: int(v.shape[0]) for k, v in self.tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"Split tensors differ in length: {sizes}")

    def __len__(self) -> int:
        return int(self.tensors["labels"].shape[0])

    @property
    def labels(self) -> torch.Tensor:
        return self.tensors["labels"]

    def batch(self, indices: Indices) -> dict[str, torch.Tensor]:
        """The examples at ``indices``, with padding columns trimmed to the longest sequence in the batch.

        Keys are those a Hugging Face model's ``forward`` takes: ``input_ids``, ``attention_mask``,
        ``token_type_ids`` (if the tokenizer gives them) and ``labels``.  Works for right and left padding.
        """
        index = indices if isinstance(indices, slice) else torch.as_tensor(np.asarray(indices), dtype=torch.long)
        mask = self.tensors["attention_mask"][index]
        used = torch.nonzero(mask.reshape(-1, mask.shape[-1]).any(dim=0)).flatten()
        start, stop = (int(used[0]), int(used[-1]) + 1) if len(used) else (0, 1)
        out = {}
        for key, value in self.tensors.items():
            value = value[index]
            out[key] = value[..., start:stop] if key in self.sequence_keys else value
        return out

    def iter_batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Sequential batches in order (for evaluation); the last one may be smaller."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield self.batch(slice(start, min(start + batch_size, len(self))))

    def subset(self, indices: Indices) -> "Split":
        """A new split holding the examples at ``indices`` (padding kept as it is)."""
        index = indices if isinstance(indices, slice) else torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return Split({k: v[index] for k, v in self.tensors.items()}, self.sequence_keys)


@dataclass
class TaskData:
    """A tokenised task: ``train`` = ``weight`` + ``gate`` (disjoint), and ``eval`` for the retrain stage."""

    name: str
    num_labels: int
    label_names: list[str]
    train: Split
    weight: Split
    gate: Split
    eval: Split
    family: Family = field(default_factory=Classification)
    has_pair: bool = False
    weight_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # rows of train
    gate_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # rows of train

    def describe(self) -> dict[str, Any]:
        """Sizes, classes and per-split label counts (for logs and run records)."""
        splits = {"train": self.train, "weight": self.weight, "gate": self.gate, "eval": self.eval}
        return {
            "task": self.name,
            "num_labels": self.num_labels,
            "label_names": list(self.label_names),
            "family": self.family.describe(),
            "has_pair": self.has_pair,
            "sizes": {k: len(v) for k, v in splits.items()},
            "label_counts": {k: self.family.label_summary(v.labels, self.num_labels) for k, v in splits.items()},
            "max_length": int(self.train.tensors["input_ids"].shape[-1]),
            "fingerprint": self.fingerprint(),
        }

    def fingerprint(self) -> str:
        """A short hash of the train and eval tensors: equal fingerprints mean the same examples."""
        digest = hashlib.sha256()
        for split in (self.train, self.eval):
            for key in sorted(split.tensors):
                digest.update(key.encode())
                digest.update(split.tensors[key].numpy().tobytes())
        return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Building a TaskData
# --------------------------------------------------------------------------------------------------
# Models whose position ids start after the padding index (create_position_ids_from_input_ids): their
# max_position_embeddings counts pad_token_id + 1 positions that a sequence cannot use
_PADDING_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "data2vec-text",
                             "roberta-prelayernorm", "xmod", "ibert", "markuplm", "luke", "esm", "mpnet"}


def absolute_positions(model_config: Any) -> int | None:
    """How many tokens a model with a learned table of absolute positions can read; None when its
    positions are rotary, ALiBi or relative only (no hard limit), unknown, or not positive (XLNet's -1
    means no limit)."""
    positions = getattr(model_config, "max_position_embeddings", None)
    if not isinstance(positions, int) or positions <= 0 or not hasattr(model_config, "to_dict"):
        return None
    settings = model_config.to_dict()
    rotary = any(value for key, value in settings.items() if "rope" in key or "rotary" in key)
    relative = (settings.get("alibi") or settings.get("position_biased_input") is False
                or settings.get("position_embedding_type", "absolute") != "absolute")
    if rotary or relative:
        return None
    if settings.get("model_type") in _PADDING_OFFSET_POSITIONS:
        positions -= (settings.get("pad_token_id") or 0) + 1
    return positions


def prepare_task(cfg: DataConfig, tokenizer: Any, seed: int, model_config: Any = None,
                 gate_split: bool = True) -> TaskData:
    """Load, split, cap and tokenise ``cfg.task``; partition train into weight/gate with ``seed``.

    ``model_config`` (the base model's transformers config) decides how a multiple-choice task is
    tokenised: question/option pairs for an encoder's choice head, prompt + option for a decoder.
    ``gate_split=False`` (the retrain, which trains on all of train) only needs train to hold one batch.

    Raises:
        DataError: the task cannot be loaded, or a split is too small for ``cfg.batch_size``.
        ModelError: the tokenizer gives token ids beyond the model's input embeddings.
    """
    cfg = with_data_defaults(cfg)
    _check_seed(seed, "--seed")
    _check_seed(cfg.split_seed, "--data.split_seed")
    positions = absolute_positions(model_config)
    if positions is not None and cfg.max_length > positions:
        raise DataError(f"--data.max_length {cfg.max_length} exceeds the {positions} positions the model has "
                        f"(max_position_embeddings); allowed: 1 to {positions}")
    raw = load_raw_task(cfg)
    family = make_family(raw.family, model_config)
    train_df, eval_df = train_eval_frames(raw, cfg, family)
    weight_idx, gate_idx = stratified_split(family.strata(train_df), cfg.gate_fraction,
                                            np.random.default_rng([seed, _GATE_SPLIT]))
    limit = cfg.max_train_examples  # capped: the cap left rows out, so that raising it gives more
    capped = limit is not None and len(train_df) >= limit and len(raw.train) > limit
    _check_batch_fits(len(weight_idx), len(gate_idx), len(train_df), cfg, capped, gate_split)
    train = Split(family.tokenize(train_df, tokenizer, cfg.max_length), family.sequence_keys)
    evaluation = Split(family.tokenize(eval_df, tokenizer, cfg.max_length), family.sequence_keys)
    _check_token_ids((train, evaluation), tokenizer, model_config)
    data = TaskData(name=raw.name, num_labels=raw.num_labels, label_names=list(raw.label_names), train=train,
                    weight=train.subset(weight_idx), gate=train.subset(gate_idx), eval=evaluation,
                    family=family, has_pair=raw.has_pair, weight_index=weight_idx, gate_index=gate_idx)
    logger.info("task %s: %s, %d labels; train %d (weight %d, gate %d), eval %d; max length %d", data.name,
                family.describe(), data.num_labels, len(train), len(weight_idx), len(gate_idx), len(evaluation),
                cfg.max_length)
    return data


def train_eval_frames(raw: RawTask, cfg: DataConfig, family: Family | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and eval frames after the held-out split (if the source has none) and the caps.

    Depends only on the data and ``cfg`` (``split_seed``, ``eval_fraction``, caps), never on the run seed.

    Raises:
        DataError: too few examples to hold out an evaluation slice.
    """
    cfg = with_data_defaults(cfg)
    train_df = raw.train.reset_index(drop=True)
    eval_df = raw.eval.reset_index(drop=True) if raw.eval is not None else None
    if eval_df is None:
        strata = (family or make_family(raw.family)).strata(train_df)
        rest, held = stratified_split(strata, cfg.eval_fraction,
                                      np.random.default_rng([cfg.split_seed, _EVAL_SPLIT]),
                                      what="--data.eval_fraction")
        train_df, eval_df = train_df.iloc[rest], train_df.iloc[held]
    uncapped, uncapped_eval = len(train_df), len(eval_df)
    train_df = _cap(train_df, cfg.max_train_examples, np.random.default_rng([cfg.split_seed, _TRAIN_CAP]))
    eval_df = _cap(eval_df, cfg.max_eval_examples, np.random.default_rng([cfg.split_seed, _EVAL_CAP]))
    if len(eval_df) == 0:
        raise DataError(f"task {raw.name}: the evaluation split is empty")
    if len(eval_df) < uncapped_eval:
        logger.info("task %s: evaluating on a seeded sample of %d of the %d evaluation examples "
                    "(--data.max_eval_examples; null = all)", raw.name, len(eval_df), uncapped_eval)
    _warn_shared_texts(train_df, eval_df, raw.name)
    if raw.family == "classification" and train_df["label"].nunique() < 2:
        cause = (f"the {len(train_df)} training examples sampled by --data.max_train_examples"
                 if len(train_df) < uncapped else "the training split after the held-out evaluation slice")
        only = raw.label_names[int(train_df["label"].iloc[0])]
        raise DataError(f"task {raw.name}: {cause} hold one class ({only!r}); "
                        "a classifier needs at least two (raise --data.max_train_examples, or give more examples "
                        "of the other classes)")
    return train_df.reset_index(drop=True), eval_df.reset_index(drop=True)


def _warn_shared_texts(train_df: pd.DataFrame, eval_df: pd.DataFrame, name: str) -> None:
    """Warn when evaluation examples repeat a training example's input (duplicate rows in the data, or an
    evaluation file that overlaps the training file): on those the metric is not a held-out measure."""
    def inputs(df: pd.DataFrame) -> pd.Series:
        return df["text"] if "text_pair" not in df.columns else df["text"] + "\x1f" + df["text_pair"]

    shared = int(inputs(eval_df).isin(set(inputs(train_df))).sum())
    if shared:
        logger.warning("task %s: %d of the %d evaluation examples have the same input text as a training example "
                       "(duplicate rows in the data?); on those the metric is not a held-out measure",
                       name, shared, len(eval_df))


def _cap(df: pd.DataFrame, limit: int | None, rng: np.random.Generator) -> pd.DataFrame:
    """A seeded random sample of ``limit`` rows (kept in their original order); all rows if fewer."""
    if limit is None or len(df) <= limit:
        return df
    keep = np.sort(rng.choice(len(df), size=limit, replace=False))
    return df.iloc[keep]


def stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator,
                     what: str = "--data.gate_fraction") -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``0..n-1`` into (kept, held out), holding out ``round(n * fraction)`` of them.

    Each class gives its proportional share (largest remainders settle the rounding), so both parts keep
    the class balance.  Both index arrays come back sorted.

    Raises:
        DataError: either part would be empty.
    """
    n = len(labels)
    n_held = int(round(n * fraction))
    if n_held == 0 or n_held == n:
        raise DataError(f"{what} {fraction} of {n} examples leaves an empty split; use more examples or a "
                        "fraction further from 0 and 1")
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (n_held / n)
    quota = np.floor(exact).astype(int)
    short = n_held - int(quota.sum())
    if short:
        order = np.lexsort((classes, -(exact - quota)))  # largest remainder first, ties by class id
        quota[order[:short]] += 1
    held = []
    for cls, q in zip(classes, quota):
        members = np.flatnonzero(labels == cls)
        held.append(rng.permutation(members)[:q])
    held_idx = np.sort(np.concatenate(held)).astype(np.int64)
    kept_mask = np.ones(n, dtype=bool)
    kept_mask[held_idx] = False
    return np.flatnonzero(kept_mask).astype(np.int64), held_idx


def _check_batch_fits(n_weight: int, n_gate: int, n_train: int, cfg: DataConfig, capped: bool,
                      gate_split: bool = True) -> None:
    """Raises: DataError when a split that is trained on (weight and gate; all of train without a gate
    split) holds fewer examples than one batch.  ``capped``: ``--data.max_train_examples`` left rows out;
    if not, raising it cannot help, and the message says that these are all the examples there are."""
    if not gate_split:
        if n_train < cfg.batch_size:
            raise DataError(f"the training split has {n_train} examples" + ("" if capped else " (all the task has)")
                            + f", fewer than one batch of --data.batch_size {cfg.batch_size}; "
                            + ("raise --data.max_train_examples or lower --data.batch_size" if capped else
                               f"lower --data.batch_size to at most {n_train}"))
        return
    for name, size, fraction in (("gate", n_gate, "raise"), ("weight", n_weight, "lower")):
        if size < cfg.batch_size:
            raise DataError(
                f"the {name} split has {size} examples ({n_train} training examples"
                + ("" if capped else ", all the task has") + f", --data.gate_fraction {cfg.gate_fraction}), "
                f"fewer than one batch of --data.batch_size {cfg.batch_size}; {fraction} --data.gate_fraction"
                + (" or raise --data.max_train_examples, or lower --data.batch_size" if capped else
                   f", or lower --data.batch_size to at most {min(n_weight, n_gate)}"))


def _check_token_ids(splits: Sequence[Split], tokenizer: Any, model_config: Any) -> None:
    """Raises: ModelError when a token id lies beyond the model's input embeddings (``vocab_size``), as
    with a tokenizer that adds tokens the model lacks; the model would fail on it with an IndexError."""
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    size = getattr(text_config, "vocab_size", None)
    if not isinstance(size, int) or size <= 0:
        return
    largest = max(int(split.tensors["input_ids"].max()) for split in splits)
    if largest >= size:
        raise ModelError(f"the tokenizer gives token id {largest}, beyond the model's {size} input embeddings "
                         f"(its vocab_size; the tokenizer has {len(tokenizer)} tokens); use a tokenizer whose ids "
                         f"fit the model, such as the one saved with it")


def _check_seed(seed: int, flag: str) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise DataError(f"{flag} must be a non-negative integer, got {seed!r}")


# --------------------------------------------------------------------------------------------------
# Training batches
# --------------------------------------------------------------------------------------------------
class EpochSampler:
    """Endless, deterministic batches of indices into ``n`` examples.

    Epoch ``e`` visits ``np.random.default_rng([seed, e]).permutation(n)`` in steps of ``batch_size`` and
    drops its last partial batch.  ``state_dict()``/``load_state_dict()`` hold ``epoch`` and ``position``
    (examples consumed in the epoch), so a resumed sampler continues with the very same batches.
    """

    def __init__(self, n: int, batch_size: int, seed: int, processes: int = 1) -> None:
        """``batch_size``: the global batch of all ``processes`` together.

        Raises: DataError when ``n < batch_size`` or an argument is out of range."""
        if batch_size <= 0:
            raise DataError(f"--data.batch_size must be a positive integer, got {batch_size}")
        if n < batch_size:
            what = (f"--data.batch_size {batch_size}" if processes == 1 else
                    f"{batch_size} (--data.batch_size {batch_size // processes} on each of {processes} processes)")
            raise DataError(f"{n} examples are fewer than one batch of {what}")
        _check_seed(seed, "--seed")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.epoch, self.position = 0, 0
        self._perm: np.ndarray | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        return self._perm

    def next(self) -> np.ndarray:
        """The next ``batch_size`` indices (int64)."""
        if self.position + self.batch_size > self.n:
            self.epoch += 1
            self.position = 0
            self._perm = None
        out = self._permutation()[self.position:self.position + self.batch_size].copy()
        self.position += self.batch_size
        return out

    def __iter__(self) -> "EpochSampler":
        return self

    def __next__(self) -> np.ndarray:
        return self.next()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Raises: DataError when the state does not fit this sampler (e.g. another dataset size)."""
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"sampler state must hold integer 'epoch' and 'position', got {state!r}") from None
        if epoch < 0 or not 0 <= position <= self.n:
            raise DataError(f"sampler state {state!r} does not fit {self.n} examples")
        self.epoch, self.position, self._perm = epoch, position, None
