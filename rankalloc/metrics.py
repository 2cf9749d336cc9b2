"""The metric each task family is known by, computed from a model's per-example outputs.

* classification: accuracy, macro-F1, mean cross-entropy, and MCC for two classes;
* regression (STS-B style): Pearson and Spearman correlation, mean squared error;
* multiple choice: accuracy over the options, mean cross-entropy over the options;
* causal LM: mean token loss and perplexity on the answer tokens, and exact-match accuracy of the
  answer (greedy decoding reproduces the answer and its end-of-text token; see
  :func:`causal_lm_metrics`).

Every function takes numpy arrays and returns plain floats, so results travel as JSON.
"""
from __future__ import annotations

import math
import warnings

import numpy as np


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def classification_metrics(logits: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    """accuracy, macro F1 (over the classes in ``labels``, whatever the model predicts, so that two models are
    averaged over the same classes; sklearn's default also averages over predicted classes the labels lack),
    eval loss (mean cross-entropy); MCC for two classes."""
    from sklearn.metrics import f1_score, matthews_corrcoef

    labels = labels.astype(np.int64)
    preds = logits.argmax(-1)
    out = {"accuracy": float((preds == labels).mean()),
           "macro_f1": float(f1_score(labels, preds, labels=np.unique(labels), average="macro", zero_division=0)),
           "eval_loss": float(-_log_softmax(logits.astype(np.float64))[np.arange(len(labels)), labels].mean())}
    if num_labels == 2:
        with warnings.catch_warnings():  # one class in labels and predictions: MCC is 0, sklearn also warns
            warnings.simplefilter("ignore")
            out["mcc"] = float(matthews_corrcoef(labels, preds))
    return out


def regression_metrics(predictions: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlation, their mean, and the mean squared error (= eval loss).

    A constant prediction has no correlation: it is reported as 0 rather than NaN, so that an
    untrained model scores lowest instead of breaking the comparison.
    """
    from scipy.stats import pearsonr, spearmanr

    pred = np.asarray(predictions, dtype=np.float64).reshape(-1)
    gold = np.asarray(targets, dtype=np.float64).reshape(-1)
    constant = np.ptp(pred) == 0 or np.ptp(gold) == 0
    pearson = 0.0 if constant else float(pearsonr(pred, gold)[0])
    spearman = 0.0 if constant else float(spearmanr(pred, gold)[0])
    mse = float(np.mean((pred - gold) ** 2))
    return {"pearson": pearson, "spearman": spearman, "pearson_spearman_mean": (pearson + spearman) / 2,
            "mse": mse, "eval_loss": mse}


def multiple_choice_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """accuracy of the best-scoring option and mean cross-entropy over the options.

    ``scores`` is (examples, options); missing options (fewer than the most any example has) carry a
    very low score and never win.
    """
    labels = labels.astype(np.int64)
    preds = scores.argmax(-1)
    log_probs = _log_softmax(scores.astype(np.float64))
    return {"accuracy": float((preds == labels).mean()),
            "eval_loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
            "options": int(scores.shape[1])}


def causal_lm_metrics(stats: np.ndarray) -> dict[str, float]:
    """Token loss, perplexity and exact match from per-example ``(nll_sum, answer_tokens, all_correct)``.

    ``eval_loss`` is the mean negative log-likelihood per answer token over the whole split (every token
    weighs the same, as in the training loss) and ``perplexity = exp(eval_loss)``.  ``exact_match`` is
    the share of examples whose every answer token is the model's top prediction given the true prefix:
    that is exactly when greedy decoding from the prompt reproduces the answer (and, as the answer ends
    with the end-of-text token, stops there).
    """
    stats = np.asarray(stats, dtype=np.float64)
    nll, tokens, correct = stats[:, 0], stats[:, 1], stats[:, 2]
    loss = float(nll.sum() / max(tokens.sum(), 1.0))
    return {"exact_match": float(correct.mean()), "eval_loss": loss,
            "perplexity": float(math.exp(min(loss, 700.0))), "answer_tokens": int(tokens.sum())}
