"""Task families: how examples are tokenised, which model head runs them, the loss, and the metrics.

The search, the retrain and the benchmark share one interface, :class:`Family`:

* ``classification`` - text (+ text_pair) -> class id; ``AutoModelForSequenceClassification``;
  accuracy, macro-F1, MCC.
* ``regression`` - text (+ text_pair) -> float target (STS-B style); the same model with one output
  and a mean-squared-error loss; Pearson and Spearman correlation.
* ``multiple_choice`` - a question and N options -> the index of the right one; encoders use
  ``AutoModelForMultipleChoice``, decoders ``AutoModelForCausalLM`` with each option scored by its
  log-likelihood after the question; accuracy.
* ``causal_lm`` - prompt -> answer text, the loss on the answer tokens only; ``AutoModelForCausalLM``;
  loss, perplexity and exact-match accuracy of the answer.

Every family computes its own loss from the model's outputs (labels never go into the model), so the
loss is the same whatever wraps the model (rankalloc's gated LoRA, peft LoRA or AdaLoRA).  A family's
``forward`` returns :class:`Output`: ``loss`` (when the batch has labels) and ``logits``, the
per-example values its metrics read (class logits, a regression value, option scores, or for causal
LM the per-example ``(answer NLL, answer tokens, exact match)``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import metrics
from .errors import DataError, ModelError
from .tokenization import IGNORE, MODEL_INPUTS, tokenize_prompt_answer, tokenize_texts

logger = logging.getLogger(__name__)

FAMILIES = ("classification", "regression", "multiple_choice", "causal_lm")
MISSING_OPTION = -1e9  # score of an option an example does not have
_REGRESSION_STRATA = 5  # quantile bins that stratify the splits of a regression task


@dataclass
class Output:
    loss: torch.Tensor | None
    logits: torch.Tensor
    weight: float | None = None  # what the loss averages over, if not the examples (answer tokens)


def _without(batch: dict[str, torch.Tensor], *keys: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k not in keys}


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (LoRA layers in place), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# --------------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------------
class Family:
    """One task family.  ``sequence_keys`` name the tensors whose last axis is the token axis."""

    name = ""
    primary_metric = ""
    sequence_keys: tuple[str, ...] = MODEL_INPUTS
    peft_task_type: str | None = "SEQ_CLS"  # peft's task type for this family's model class

    def strata(self, df: pd.DataFrame) -> np.ndarray:
        """Groups that train/eval/gate splits keep in proportion (classes, or target quantiles)."""
        return df["label"].to_numpy()

    def tokenize(self, df: pd.DataFrame, tokenizer: Any, max_length: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def model_class(self) -> Any:
        raise NotImplementedError

    def config_kwargs(self, num_labels: int, label_names: list[str] | None = None) -> dict[str, Any]:
        """Settings of the model config for this family's head (``label_names``: the classes, in id order)."""
        return {}

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Output:
        raise NotImplementedError

    def metrics(self, logits: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
        raise NotImplementedError

    def eval_labels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the metrics compare ``logits`` with, one row per example."""
        return batch["labels"]

    def label_summary(self, labels: torch.Tensor, num_labels: int) -> Any:
        return torch.bincount(labels, minlength=num_labels).tolist()

    def describe(self) -> str:
        return self.name


class Classification(Family):
    name, primary_metric = "classification", "accuracy"

    def tokenize(self, df, tokenizer, max_length):
        tensors = tokenize_texts(df, tokenizer, max_length)
        tensors["labels"] = torch.tensor(df["label"].to_numpy(dtype=np.int64, copy=True))
        return tensors

    def model_class(self):
        from transformers import AutoModelForSequenceClassification
        return AutoModelForSequenceClassification

    def config_kwargs(self, num_labels, label_names=None):
        kwargs = {"num_labels": num_labels, "problem_type": "single_label_classification"}
        if label_names is not None and len(label_names) == num_labels:  # saved models name their classes
            kwargs["id2label"] = {i: str(name) for i, name in enumerate(label_names)}
            kwargs["label2id"] = {str(name): i for i, name in enumerate(label_names)}
        return kwargs

    def forward(self, model, batch):
        logits = model(**_without(batch, "labels")).logits
        loss = F.cross_entropy(logits.float(), batch["labels"]) if "labels" in batch else None
        return Output(loss, logits)

    def metrics(self, logits, labels, num_labels):
        return metrics.classification_metrics(logits, labels, num_labels)


class Regression(Classification):
    name, primary_metric = "regression", "pearson"

    def strata(self, df):
        values = df["label"].to_numpy(dtype=np.float64)
        edges = np.unique(np.quantile(values, np.linspace(0, 1, _REGRESSION_STRATA + 1)[1:-1]))
        return np.digitize(values, edges)

    def tokenize(self, df, tokenizer, max_length):
        tensors = tokenize_texts(df, tokenizer, max_length)
        tensors["labels"] = torch.tensor(df["label"].to_numpy(dtype=np.float32, copy=True))
        return tensors

    def config_kwargs(self, num_labels, label_names=None):
        return {"num_labels": 1, "problem_type": "regression"}

    def forward(self, model, batch):
        logits = model(**_without(batch, "labels")).logits
        loss = F.mse_loss(logits.float().squeeze(-1), batch["labels"].float()) if "labels" in batch else None
        return Output(loss, logits)

    def metrics(self, logits, labels, num_labels):
        return metrics.regression_metrics(logits.reshape(-1), labels)

    def label_summary(self, labels, num_labels):
        values = labels.double()
        std = float(values.std()) if len(values) > 1 else 0.0
        return {"mean": round(float(values.mean()), 4), "std": round(std, 4),
                "min": float(values.min()), "max": float(values.max())}


class MultipleChoice(Family):
    """A question with N options.  ``scoring`` is ``"head"`` for encoders (a classifier over the
    options' [CLS] states) or ``"loglik"`` for decoders (the summed log-likelihood of the option's
    tokens after the question, as BIG-bench's multiple_choice_grade scores it)."""

    name, primary_metric = "multiple_choice", "accuracy"

    def __init__(self, scoring: str = "head") -> None:
        if scoring not in ("head", "loglik"):
            raise ValueError(f"scoring must be 'head' or 'loglik', got {scoring!r}")
        self.scoring = scoring
        self.peft_task_type = None if scoring == "head" else "CAUSAL_LM"
        if scoring == "loglik":
            self.sequence_keys = MODEL_INPUTS + ("option_labels",)

    def tokenize(self, df, tokenizer, max_length):
        n_options = int(df["choices"].map(len).max())
        padded = [list(c) + [""] * (n_options - len(c)) for c in df["choices"]]
        present = torch.tensor([[i < len(c) for i in range(n_options)] for c in df["choices"]], dtype=torch.bool)
        questions = [q for q in df["text"] for _ in range(n_options)]
        options = [o for row in padded for o in row]
        if self.scoring == "head":
            flat = tokenize_texts(pd.DataFrame({"text": questions, "text_pair": options}), tokenizer, max_length)
        else:
            flat = tokenize_prompt_answer(questions, options, tokenizer, max_length, add_eos=False,
                                           label_key="option_labels")
        tensors = {k: v.view(len(df), n_options, -1) for k, v in flat.items()}
        tensors["choice_mask"] = present
        tensors["labels"] = torch.tensor(df["label"].to_numpy(dtype=np.int64, copy=True))
        return tensors

    def model_class(self):
        from transformers import AutoModelForCausalLM, AutoModelForMultipleChoice
        return AutoModelForMultipleChoice if self.scoring == "head" else AutoModelForCausalLM

    def forward(self, model, batch):
        present = batch["choice_mask"]
        if self.scoring == "head":
            scores = model(**_without(batch, "labels", "choice_mask")).logits.float()
        else:
            b, n, length = batch["input_ids"].shape
            rows = present.reshape(-1)
            flat = {k: batch[k].reshape(b * n, length)[rows] for k in ("input_ids", "attention_mask", "option_labels")}
            nll, count, _ = answer_log_likelihood(unwrap(model), flat["input_ids"], flat["attention_mask"],
                                                  flat["option_labels"])
            scored = torch.where(count > 0, -nll, torch.full_like(nll, MISSING_OPTION))  # no tokens: never wins
            scores = torch.zeros(b * n, device=nll.device, dtype=nll.dtype)
            scores = scores.masked_scatter(rows, scored).view(b, n)
        scores = scores.masked_fill(~present, MISSING_OPTION)
        loss = F.cross_entropy(scores, batch["labels"]) if "labels" in batch else None
        return Output(loss, scores)

    def metrics(self, logits, labels, num_labels):
        return metrics.multiple_choice_metrics(logits, labels)

    def describe(self):
        return f"{self.name} ({'classifier head' if self.scoring == 'head' else 'option log-likelihood'})"


class CausalLM(Family):
    """Prompt -> answer text; the loss is the mean NLL of the answer tokens (and its end-of-text)."""

    name, primary_metric = "causal_lm", "exact_match"
    sequence_keys = MODEL_INPUTS + ("labels",)
    peft_task_type = "CAUSAL_LM"

    def strata(self, df):
        return np.zeros(len(df), dtype=np.int64)

    def tokenize(self, df, tokenizer, max_length):
        return tokenize_prompt_answer(df["text"].tolist(), df["answer"].tolist(), tokenizer, max_length,
                                       add_eos=True, label_key="labels")

    def model_class(self):
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM

    def forward(self, model, batch):
        nll, count, exact = answer_log_likelihood(unwrap(model), batch["input_ids"], batch["attention_mask"],
                                                  batch["labels"])
        tokens = count.sum().clamp(min=1.0)
        return Output(nll.sum() / tokens, torch.stack([nll, count, exact.to(nll.dtype)], dim=-1), float(tokens))

    def metrics(self, logits, labels, num_labels):
        return metrics.causal_lm_metrics(logits)

    def eval_labels(self, batch):
        return torch.zeros(batch["input_ids"].shape[0], dtype=torch.long)

    def label_summary(self, labels, num_labels):
        return {"answer_tokens": int((labels != IGNORE).sum())}


def make_family(name: str, model_config: Any = None) -> Family:
    """The family ``name`` for a model with ``model_config`` (which decides how options are scored).

    Raises:
        ModelError: causal LM asked of a model that is not a decoder, or multiple choice of a model with
            neither a multiple-choice head nor a causal-LM head.
    """
    if name == "classification":
        return Classification()
    if name == "regression":
        return Regression()
    if name == "causal_lm":
        if model_config is not None and not is_decoder(model_config):
            raise ModelError(f"--data.family causal_lm needs a decoder (causal language model); model type "
                             f"{getattr(model_config, 'model_type', None)!r} is "
                             + ("an encoder-decoder, whose decoder this family does not train"
                                if getattr(model_config, "is_encoder_decoder", False) else
                                "a bidirectional encoder, whose attention sees the answer it should predict")
                             + "; use a decoder-only model (GPT-2, Llama, ...) or another --data.family")
        return CausalLM()
    if name == "multiple_choice":
        return MultipleChoice(_option_scoring(model_config))
    raise DataError(f"unknown task family {name!r}; allowed: {', '.join(FAMILIES)}")


def is_decoder(model_config: Any) -> bool:
    """A causal language model: it has a causal-LM class and is neither a masked-LM encoder (BERT and
    RoBERTa have causal-LM classes too, but their checkpoints attend in both directions) nor an
    encoder-decoder (Pegasus' and Marian's causal-LM classes drop the encoder and start a fresh head,
    and their cross-attention never runs)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    kind = getattr(model_config, "model_type", None)
    if getattr(model_config, "is_encoder_decoder", False):
        return False
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or bool(getattr(model_config, "is_decoder", False)))


def _option_scoring(model_config: Any) -> str:
    if model_config is None:
        return "head"
    from transformers.models.auto.modeling_auto import MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES

    kind = getattr(model_config, "model_type", None)
    if kind in MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES and not getattr(model_config, "is_decoder", False):
        return "head"
    if is_decoder(model_config):
        return "loglik"
    raise ModelError(f"model type {kind!r} has neither a multiple-choice head nor a causal-LM head, so it cannot "
                     "answer multiple-choice tasks")


# --------------------------------------------------------------------------------------------------
# Log-likelihood of answer tokens (decoder models)
# --------------------------------------------------------------------------------------------------
def _model_logit_transform(config: Any, logits: torch.Tensor) -> torch.Tensor:
    """What some causal-LM classes do to the output layer's logits: Cohere multiplies by ``logit_scale``,
    Granite divides by ``logits_scaling``, Gemma 2 soft-caps at ``final_logit_softcapping``."""
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    divisor = getattr(config, "logits_scaling", None)
    if isinstance(divisor, (int, float)) and divisor != 1:
        logits = logits / divisor
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def answer_log_likelihood(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          token_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: summed NLL of the labelled tokens, their count, and whether each is the top prediction.

    Runs the model's base (``model.<base_model_prefix>``) for the hidden states and applies the output
    layer only at the positions that predict a labelled token, so a large vocabulary never yields a
    full ``(rows, length, vocab)`` logit tensor.

    Raises:
        ModelError: the model has no output embeddings (it is not a language model).
    """
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or head is None:
        raise ModelError(f"{type(model).__name__} has no language-model head to score answer tokens with")
    hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = token_labels[:, 1:]
    rows, positions = torch.nonzero(targets != IGNORE, as_tuple=True)
    logits = head(hidden[:, :-1][rows, positions]).float()
    logits = _model_logit_transform(model.config, logits)
    wanted = targets[rows, positions]
    nll = -logits.log_softmax(-1).gather(1, wanted[:, None]).squeeze(1)
    wrong = (logits.argmax(-1) != wanted).to(nll.dtype)
    n = input_ids.shape[0]
    zeros = torch.zeros(n, device=nll.device, dtype=nll.dtype)
    nll_sum = zeros.index_add(0, rows, nll)
    count = zeros.index_add(0, rows, torch.ones_like(nll))
    exact = (zeros.index_add(0, rows, wrong) == 0) & (count > 0)
    return nll_sum, count, exact
