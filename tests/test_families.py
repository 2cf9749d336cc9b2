"""Task families: metrics against scipy/sklearn, answer log-likelihoods against transformers' own loss,
tokenisation, and a tiny search + retrain per family on encoders and decoders."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rankalloc.config import DataConfig, ModelConfig, RetrainConfig, SearchConfig, SearchParams, TrainParams
from rankalloc.families import IGNORE, MISSING_OPTION, CausalLM, MultipleChoice, answer_log_likelihood, make_family
from rankalloc.metrics import causal_lm_metrics, classification_metrics, multiple_choice_metrics, regression_metrics

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match")]
SENTIMENTS = ["negative", "neutral", "positive"]


# --------------------------------------------------------------------------------------------------
# Metrics on fixed inputs, against scipy / sklearn
# --------------------------------------------------------------------------------------------------
def test_classification_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, f1_score, log_loss, matthews_corrcoef

    logits = np.array([[2.0, 0.1], [0.3, 0.2], [-1.0, 1.5], [0.0, 0.4], [1.2, -0.3], [0.2, 0.9]])
    labels = np.array([0, 1, 1, 1, 1, 0])
    m = classification_metrics(logits, labels, 2)
    preds = logits.argmax(1)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    assert m["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro"))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(labels, preds))
    assert m["eval_loss"] == pytest.approx(log_loss(labels, probs))


def test_macro_f1_averages_over_the_true_classes_whatever_is_predicted():
    """One error each, on labels of classes 0 and 1 out of 3: predicting the absent class 2 must not change
    the set of classes averaged over (F1 over {0, 1} in both cases)."""
    labels = np.array([0, 0, 1, 1])
    wrong_into_absent = np.eye(3)[[0, 0, 1, 2]]
    wrong_into_present = np.eye(3)[[0, 0, 1, 0]]
    f1_a = classification_metrics(wrong_into_absent, labels, 3)["macro_f1"]
    f1_b = classification_metrics(wrong_into_present, labels, 3)["macro_f1"]
    assert f1_a == pytest.approx((1.0 + 2 / 3) / 2)  # class 0 perfect; class 1 precision 1, recall 1/2
    assert f1_b == pytest.approx((0.8 + 2 / 3) / 2)  # class 0: precision 2/3, recall 1


def test_regression_metrics_match_scipy_and_sklearn():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_squared_error

    pred = np.array([0.1, 2.5, 3.9, 1.2, 4.8, 2.2, 0.7])
    gold = np.array([0.0, 3.0, 3.6, 1.0, 5.0, 1.4, 1.6])
    m = regression_metrics(pred[:, None], gold)
    assert m["pearson"] == pytest.approx(pearsonr(pred, gold)[0]) == pytest.approx(np.corrcoef(pred, gold)[0, 1])
    assert m["spearman"] == pytest.approx(spearmanr(pred, gold)[0])
    assert m["spearman"] == pytest.approx(np.corrcoef(np.argsort(np.argsort(pred)), np.argsort(np.argsort(gold)))[0, 1])
    assert m["mse"] == pytest.approx(mean_squared_error(gold, pred)) == m["eval_loss"]
    assert regression_metrics(np.full(7, 2.0), gold)["pearson"] == 0.0  # a constant prediction correlates with nothing


def test_multiple_choice_metrics_ignore_missing_options():
    from sklearn.metrics import accuracy_score, log_loss

    scores = np.array([[1.0, 0.2, MISSING_OPTION], [0.1, 0.3, 2.0], [-0.5, 0.5, MISSING_OPTION]])
    labels = np.array([0, 2, 0])
    m = multiple_choice_metrics(scores, labels)
    probs = np.exp(scores - scores.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, scores.argmax(1))) == pytest.approx(2 / 3)
    assert m["eval_loss"] == pytest.approx(log_loss(labels, probs, labels=[0, 1, 2]))


def test_causal_lm_metrics_weigh_every_answer_token_alike():
    stats = np.array([[2.0, 2, 1], [6.0, 3, 0], [1.0, 1, 1]])  # (NLL sum, answer tokens, exact match)
    m = causal_lm_metrics(stats)
    assert m["eval_loss"] == pytest.approx(9.0 / 6) and m["perplexity"] == pytest.approx(math.exp(1.5))
    assert m["exact_match"] == pytest.approx(2 / 3) and m["answer_tokens"] == 6


# --------------------------------------------------------------------------------------------------
# Decoder scoring against transformers' own loss
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_answer_log_likelihood_matches_the_models_own_loss(fixture, request):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture)).eval()
    ids = torch.randint(5, 500, (3, 10))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0  # right padding
    labels = torch.full_like(ids, IGNORE)
    labels[0, 4:10], labels[1, 8:10], labels[2, 3:7] = ids[0, 4:10], ids[1, 8:10], ids[2, 3:7]
    with torch.no_grad():
        nll, count, exact = answer_log_likelihood(model, ids, mask, labels)
        reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # mean over answer tokens
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert count.tolist() == [6, 2, 4]
    assert float(nll.sum() / count.sum()) == pytest.approx(float(reference), rel=1e-5)
    for row in range(3):  # exact match = every answer token is the argmax given the true prefix
        positions = torch.nonzero(labels[row, 1:] != IGNORE).flatten()
        top = logits[row, positions].argmax(-1)
        assert bool(exact[row]) == bool((top == labels[row, positions + 1]).all())


def test_exact_match_means_greedy_decoding_reproduces_the_answer(tiny_gpt2):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    prompt = torch.tensor([[11, 12, 13, 14]])
    with torch.no_grad():
        greedy = model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    ids = greedy
    labels = torch.full_like(ids, IGNORE)
    labels[0, 4:] = ids[0, 4:]
    wrong = labels.clone()
    wrong[0, 6] = (int(ids[0, 6]) + 1) % 500
    with torch.no_grad():
        assert bool(answer_log_likelihood(model, ids, torch.ones_like(ids), labels)[2][0])
        assert not bool(answer_log_likelihood(model, ids, torch.ones_like(ids), wrong)[2][0])


# --------------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------------
def _tokenizer():
    from rankalloc.models import load_tokenizer

    return load_tokenizer(ModelConfig())


def test_causal_lm_loss_is_on_the_answer_only_and_long_prompts_lose_their_start():
    tok = _tokenizer()
    df = pd.DataFrame({"text": ["the film was", " ".join(["word"] * 40) + " finally"], "answer": ["great", "good"]})
    t = CausalLM().tokenize(df, tok, max_length=16)
    end = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id  # BERT's tokenizer has no EOS
    answer = tok(" great", add_special_tokens=False)["input_ids"] + [end]
    row = t["labels"][0]
    kept = row[row != IGNORE].tolist()
    assert kept == answer and t["input_ids"][0, row != IGNORE].tolist() == answer
    assert int(t["attention_mask"][1].sum()) == 16  # truncated to the limit ...
    assert (t["labels"][1] != IGNORE).sum() == len(tok(" good", add_special_tokens=False)["input_ids"]) + 1
    prompt = tok.decode(t["input_ids"][1, :int((t["labels"][1] != IGNORE).nonzero()[0])])
    assert prompt.replace("[SEP]", "").split()[-1] == "finally"  # ... by dropping the start of the prompt
    assert "[CLS]" not in prompt and prompt.count("word") < 40  # (BERT's tokenizer wraps it in [CLS] ... [SEP])


@pytest.mark.parametrize("scoring", ["head", "loglik"])
def test_multiple_choice_pads_options_and_masks_them(scoring):
    tok = _tokenizer()
    df = pd.DataFrame({"text": ["pick one", "and now"], "choices": [["a", "b", "c"], ["yes", "no"]], "label": [2, 0]})
    t = MultipleChoice(scoring).tokenize(df, tok, max_length=12)
    assert t["input_ids"].shape == (2, 3, 12) and t["choice_mask"].tolist() == [[True] * 3, [True, True, False]]
    if scoring == "loglik":
        assert (t["option_labels"][1, 2] == IGNORE).all() and (t["option_labels"][0, 0] != IGNORE).sum() >= 1


def test_an_empty_prompt_still_predicts_the_first_answer_token():
    tok = _tokenizer()
    t = CausalLM().tokenize(pd.DataFrame({"text": [""], "answer": ["fine"]}), tok, max_length=8)
    assert t["labels"][0, 0] == IGNORE and (t["labels"][0] != IGNORE).sum() == 2  # "fine" + end token


def test_causal_lm_on_a_bidirectional_encoder_is_refused():
    from rankalloc.errors import ModelError
    from rankalloc.models import load_model_config

    with pytest.raises(ModelError, match="causal_lm needs a decoder.*'bert' is a bidirectional encoder"):
        make_family("causal_lm", load_model_config(ModelConfig()))
    from transformers import T5Config

    with pytest.raises(ModelError, match="'t5' is an encoder-decoder, whose decoder this family does not train"):
        make_family("causal_lm", T5Config(d_model=16, num_layers=1))
    from transformers import MarianConfig, PegasusConfig  # their causal-LM classes drop the encoder

    for config in (PegasusConfig(d_model=16), MarianConfig(d_model=16)):
        with pytest.raises(ModelError, match=f"'{config.model_type}' is an encoder-decoder"):
            make_family("causal_lm", config)


def test_option_labels_may_be_index_text_or_letter(tmp_path):
    from rankalloc.tasks import load_raw_task

    df = pd.DataFrame({"q": ["a?", "b?", "c?", "d?"], "options": [["1", "2", "3"], ["x", "y", "z"]] * 2,
                       "key": ["2", "z", "C", 0]})
    df.to_json(tmp_path / "mc.jsonl", orient="records", lines=True)
    raw = load_raw_task(DataConfig(task=str(tmp_path / "mc.jsonl"), text_column="q", choice_columns=["options"],
                                   label_column="key"))
    assert raw.family == "multiple_choice" and raw.train["label"].tolist() == [1, 2, 2, 0]


def test_multiple_choice_scoring_follows_the_architecture(tiny_gpt2, minilm_1layer):
    from rankalloc.errors import ModelError
    from rankalloc.models import load_model_config
    from transformers import T5Config

    assert make_family("multiple_choice", load_model_config(ModelConfig())).scoring == "head"
    assert make_family("multiple_choice", load_model_config(ModelConfig(name=tiny_gpt2))).scoring == "loglik"
    with pytest.raises(ModelError, match="neither a multiple-choice head nor a causal-LM head"):
        make_family("multiple_choice", T5Config())


# --------------------------------------------------------------------------------------------------
# A tiny search + retrain per family, from real labelled tweets cast into each family's format
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tweets() -> pd.DataFrame:
    from rankalloc.tasks import load_raw_task

    raw = load_raw_task(DataConfig(task="tweets")).train.sample(n=400, random_state=0).reset_index(drop=True)
    return raw.assign(sentiment=[SENTIMENTS[k] for k in raw["label"]])


def _task_file(kind: str, tweets: pd.DataFrame, folder: Path) -> tuple[str, dict]:
    """A local file of ``kind``, and the data flags that read it."""
    if kind == "pair":  # does the second tweet carry the same sentiment as the first?
        other = tweets.sample(frac=1.0, random_state=0).reset_index(drop=True)
        df = pd.DataFrame({"premise": tweets["text"], "hypothesis": other["text"],
                           "same": (tweets["label"] == other["label"]).astype(int)})
        flags = {"text_column": "premise", "text_pair_column": "hypothesis", "label_column": "same"}
    elif kind == "regression":  # signed sentiment intensity: -1 .. 1, fractional
        confidence = tweets.index.to_numpy() % 7 / 7 + 0.1
        df = pd.DataFrame({"text": tweets["text"], "score": (tweets["label"] - 1) * confidence})
        flags = {"label_column": "score"}
    elif kind == "multiple_choice":
        df = pd.DataFrame({"question": "Which sentiment? " + tweets["text"], "options": [SENTIMENTS] * len(tweets),
                           "answer": tweets["sentiment"]})  # the label as the right option's text
        flags = {"text_column": "question", "choice_columns": ["options"], "label_column": "answer"}
    else:  # causal LM: prompt -> the sentiment word
        df = pd.DataFrame({"prompt": "Tweet: " + tweets["text"] + "\nSentiment:", "completion": tweets["sentiment"]})
        flags = {"text_column": "prompt", "answer_column": "completion"}
    path = folder / f"{kind}.jsonl"
    df.to_json(path, orient="records", lines=True)
    return str(path), flags


def _config(model: ModelConfig):
    from rankalloc.models import load_model_config

    return load_model_config(model)


CASES = [  # family, base model fixture (None = the real MiniLM, one block), the metric it reports
    ("pair", None, "accuracy", "classification"),
    ("regression", None, "pearson", "regression"),
    ("multiple_choice", None, "accuracy", "multiple_choice"),
    ("multiple_choice", "tiny_gpt2", "accuracy", "multiple_choice"),
    ("causal_lm", "tiny_gpt2", "exact_match", "causal_lm"),
    ("causal_lm", "tiny_llama", "exact_match", "causal_lm"),
]


@pytest.mark.parametrize("kind, fixture, metric, family", CASES,
                         ids=[f"{c[0]}-{c[1] or 'minilm'}" for c in CASES])
def test_tiny_search_and_retrain_per_family(kind, fixture, metric, family, tweets, tmp_path, request):
    from rankalloc.rank_map import RankMap
    from rankalloc.retrain import run_retrain
    from rankalloc.search import run_search

    path, flags = _task_file(kind, tweets, tmp_path)
    model = ModelConfig(name=request.getfixturevalue(fixture)) if fixture else ModelConfig(num_layers=1)
    data = DataConfig(task=path, max_length=32, max_train_examples=96, max_eval_examples=24, batch_size=8,
                      eval_batch_size=24, **flags)
    search = run_search(SearchConfig(budget="6912", seed=0, device="cpu", out=str(tmp_path / "search"), model=model,
                                     data=data, search=SearchParams(steps=6, warmup_steps=2, log_every=3,
                                                                    checkpoint_every=0, gap_batches=1)), "test")
    rank_map = RankMap.load(tmp_path / "search" / "rank_map.json")
    assert 0.9 * rank_map.budget <= rank_map.total_params <= rank_map.budget
    assert rank_map.search["family"] == family and math.isfinite(search.gap["gap"])

    for name, extra in (("map", {"rank_map": str(tmp_path / "search" / "rank_map.json")}),
                        ("uniform", {"baseline": "uniform", "budget": "6912"})):
        result = run_retrain(RetrainConfig(**extra, seed=0, device="cpu", out=str(tmp_path / name), max_steps=4,
                                           model=ModelConfig(name=model.name, num_layers=model.num_layers),
                                           data=data, train=TrainParams(log_every=2)), "test")
        m = result.metrics
        assert m["family"] == family and m["metric"] == metric and m["score"] == m[metric]
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, float))
        assert m["checks"]["reload_max_abs_diff"] < 1e-4  # the saved peft adapter reproduces the outputs
        adapter = json.loads((tmp_path / name / "adapter" / "adapter_config.json").read_text())
        assert adapter["task_type"] == make_family(family, _config(model)).peft_task_type
        if family == "causal_lm":
            assert m["perplexity"] > 1 and 0 <= m["exact_match"] <= 1 and m["head_params"] == 0
            assert not adapter.get("modules_to_save")  # the pretrained output layer is not trained
        if family == "multiple_choice":
            assert m["options"] == 3
