"""Retrain: exact ranks, reload and merge fidelity, refusals before training, baselines at the budget."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from rankalloc.config import DataConfig, ModelConfig, RetrainConfig
from rankalloc.flags import load_yaml, parse_args
from rankalloc.errors import BudgetError, ConfigError, RankMapError
from rankalloc.models import load_model
from rankalloc.targets import find_targets
from rankalloc.rank_map import RankMap

pytestmark = [pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match"),
              pytest.mark.usefixtures("one_thread")]
REPO = Path(__file__).resolve().parents[1]
# The first block of the real MiniLM-L6: q, k, v, attention output (384x384, 768 per rank),
# intermediate (384x1536) and output (1536x384, 1920 per rank): 6,912 per rank on all six.
RANKS = [3, 0, 5, 1, 2, 7]
DATA = dict(max_train_examples=64, max_eval_examples=32, batch_size=8, eval_batch_size=32)
SMALL = ["--model", "minilm-l6", "--model.num_layers", "1", "--device", "cpu", "--max-steps", "4",
         "--train.log_every", "2"] + [f"--data.{k}={v}" for k, v in DATA.items()]
DOCUMENTED = {"method", "task", "base_model", "accuracy", "macro_f1", "eval_loss", "adapter_params", "head_params",
              "budget", "budget_used", "ranks", "wall_time_s", "peak_memory_mb", "recipe", "config", "seed",
              "rankalloc_version", "command", "checks", "steps", "train_examples", "eval_examples"}




def _run(argv: list[str]):
    from rankalloc.retrain import run_retrain

    cfg, _ = parse_args(RetrainConfig, argv, "rankalloc retrain", "")
    return run_retrain(cfg, command="test")


def _eval_split():
    from rankalloc.data import prepare_task
    from rankalloc.models import load_tokenizer

    return prepare_task(DataConfig(**DATA), load_tokenizer(ModelConfig()), 0).eval


def _reload(folder: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(ModelConfig(num_layers=1), num_labels=3), str(folder))


def _logits(model) -> np.ndarray:
    from rankalloc.retrain_loop import predict

    return predict(model, _eval_split(), 32, torch.device("cpu"))[0]


@pytest.fixture(scope="module")
def targets(minilm_1layer):
    cfg, model = minilm_1layer
    return find_targets(model, cfg)


@pytest.fixture(scope="module")
def rank_map_file(targets, tmp_path_factory) -> Path:
    rm = RankMap.from_ranks(targets, {t.name: r for t, r in zip(targets, RANKS)}, base_model="minilm-l6",
                            budget=30000, search={"num_layers": 1, "task": "tweets"})
    path = tmp_path_factory.mktemp("map") / "rank_map.json"
    rm.save(path)
    return path


@pytest.fixture(scope="module")
def rank_map_run(rank_map_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("rt") / "run"
    return _run(["--rank-map", str(rank_map_file), "--out", str(out), "--merge", *SMALL])


# --------------------------------------------------------------------------------------------------
# The rank-map method end to end
# --------------------------------------------------------------------------------------------------
def test_adapter_has_exactly_the_mapped_ranks(rank_map_run, targets):
    model = _reload(rank_map_run.out / "adapter")
    built = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            built[name] = module.lora_A["default"].weight.shape[0]
    wanted = {t.name: r for t, r in zip(targets, RANKS)}
    assert built == {n: r for n, r in wanted.items() if r > 0}  # rank-0 modules carry no adapter
    assert rank_map_run.metrics["adapter_params"] == sum(r * t.cost_per_rank for t, r in zip(targets, RANKS))
    assert rank_map_run.metrics["checks"]["saved_adapter_params"] == rank_map_run.metrics["adapter_params"]


def test_saved_adapter_and_merged_model_reproduce_the_trained_logits(rank_map_run):
    from transformers import AutoModelForSequenceClassification

    trained = rank_map_run.logits
    assert not np.allclose(trained, _logits(load_model(ModelConfig(num_layers=1), num_labels=3)))  # it trained
    np.testing.assert_allclose(_logits(_reload(rank_map_run.out / "adapter")), trained, atol=1e-5, rtol=0)
    merged = AutoModelForSequenceClassification.from_pretrained(str(rank_map_run.out / "merged"))
    np.testing.assert_allclose(_logits(merged), trained, atol=1e-4, rtol=0)
    assert (rank_map_run.out / "merged" / "tokenizer_config.json").is_file()
    assert rank_map_run.metrics["checks"]["reload_max_abs_diff"] <= 1e-5
    names = rank_map_run.metrics["label_names"]  # the saved model names the task's classes
    assert names == ["negative", "neutral", "positive"]
    assert merged.config.id2label == dict(enumerate(names)) and merged.config.label2id["neutral"] == 1
    adapter = rank_map_run.out / "adapter"  # the built-in alias is recorded by its hub id, not a local folder
    published = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert published == "sentence-transformers/all-MiniLM-L6-v2"
    card = (adapter / "README.md").read_text()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card
    assert "- base_model:adapter:sentence-transformers/all-MiniLM-L6-v2\n" in card  # not the packaged folder
    assert "More Information Needed" not in card  # no blank template
    assert json.loads((adapter / "base_model_kwargs.json").read_text())["num_hidden_layers"] == 1


def test_a_saved_adapter_loaded_as_its_model_card_says_gives_the_trained_logits(tmp_path):
    """A decoder whose config pads with another id than its tokenizer (as Llama-2's): the retrain pools by
    the tokenizer's id, so the adapter on a stock base pools a padding position.  The adapter folder records
    the settings (and the tokenizer) that rebuild the trained model, and its model card shows the call."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, GPT2Config

    from conftest import _save_random

    model = _save_random(tmp_path / "gpt2-pad5", GPT2Config(vocab_size=30522, n_positions=128, n_embd=32, n_layer=2,
                                                            n_head=2, num_labels=3, pad_token_id=5))
    out = tmp_path / "run"
    result = _run(["--baseline", "uniform", "--budget", "2048", "--model", model, "--out", str(out), "--device",
                   "cpu", "--max-steps", "3"] + [f"--data.{k}={v}" for k, v in DATA.items()])
    adapter = out / "adapter"
    kwargs = json.loads((adapter / "base_model_kwargs.json").read_text())
    assert kwargs["pad_token_id"] == 0 and kwargs["num_labels"] == 3 and kwargs["id2label"]["1"] == "neutral"
    card = (adapter / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card.split("## Loading (written by rankalloc)")[1], flags=re.S).group(1)
    scope: dict = {}
    exec(snippet.replace("path/to/this/folder", str(adapter)), scope)  # the card's load, as written
    assert scope["model"].config.id2label[1] == "neutral"  # class ids as integers, as transformers keeps them
    batch = scope["tokenizer"](["short", "a longer text that makes the other one padded"], padding=True,
                               return_tensors="pt")
    with torch.no_grad():
        as_card_says = scope["model"].eval()(**batch).logits
        base = AutoModelForSequenceClassification.from_pretrained(model, ignore_mismatched_sizes=True)
        stock = PeftModel.from_pretrained(base, str(adapter)).eval()(**batch).logits
    assert not torch.allclose(stock, as_card_says, atol=1e-4)  # the stock config pools a padding position
    assert result.metrics["checks"]["reload_max_abs_diff"] <= 1e-5  # measured by loading as the card says


def test_metrics_json_has_the_documented_keys(rank_map_run):
    metrics = json.loads((rank_map_run.out / "metrics.json").read_text())
    assert DOCUMENTED <= set(metrics)
    assert set(metrics["wall_time_s"]) >= {"load", "train", "eval"}
    assert metrics["peak_memory_mb"]["cpu_rss"] > 0 and "mcc" not in metrics  # 3 classes: no MCC
    assert metrics["method"] == "rank_map" and metrics["steps"] == 4 and metrics["eval_examples"] == 32
    assert metrics["recipe"]["scale"] == 2.0 and metrics["config"]["model"]["num_layers"] == 1
    assert metrics["recipe"]["max_steps"] == 4  # the recipe's 2 epochs were cut to 4 steps, and it says so
    assert json.loads((rank_map_run.out / "status.json").read_text())["state"] == "done"
    assert (rank_map_run.out / "adapter" / "adapter_config.json").is_file()


# --------------------------------------------------------------------------------------------------
# Refusals: one line, before any training, nothing written
# --------------------------------------------------------------------------------------------------
def _edit(data: dict, case: str) -> dict:
    first = next(iter(data["modules"]))
    if case == "version":
        data["version"] = 3
    elif case == "negative":
        data["modules"][first]["rank"] = -1
    elif case == "too_big":
        data["modules"][first]["rank"] = 385  # q is 384x384
        data.pop("total_params")
    elif case == "search_not_mapping":
        data["search"] = "abc"
    elif case == "recorded_columns":
        data["search"]["data"] = {"task": "tweets", "choice_columns": 5}
    elif case == "recorded_layers":
        data["search"]["num_layers"] = "two"
    return data


@pytest.mark.parametrize("case, needle", [
    ("corrupted", "not valid JSON"),
    ("version", "version 3"),
    ("negative", "negative"),
    ("too_big", "exceeds min(d_in, d_out) = 384"),
    ("search_not_mapping", "'search' must be a mapping"),
    ("recorded_columns", "rank map search.data.choice_columns must be a comma-separated list"),
    ("recorded_layers", "rank map search.num_layers must be an integer or null, got 'two'"),
])
def test_bad_rank_map_files_are_refused_in_one_line(case, needle, rank_map_file, tmp_path, capsys):
    from rankalloc.retrain import main

    bad = tmp_path / "bad.json"
    if case == "corrupted":
        bad.write_text(rank_map_file.read_text()[:-40])
    else:
        bad.write_text(json.dumps(_edit(json.loads(rank_map_file.read_text()), case)))
    out = tmp_path / "run"
    small = [a for a in SMALL if a not in ("--model.num_layers", "1")] if case == "recorded_layers" else SMALL
    assert main(["--rank-map", str(bad), "--out", str(out), *small]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and err[0].startswith("rankalloc retrain: error:")
    assert not out.exists()


def test_rank_map_of_another_model_is_refused_before_training(tiny_gpt2, tmp_path, capsys):
    from rankalloc.retrain import main

    gpt2_cfg = ModelConfig(name=tiny_gpt2)
    gpt2_targets = find_targets(load_model(gpt2_cfg, num_labels=3), gpt2_cfg)
    path = tmp_path / "gpt2_map.json"
    RankMap.from_ranks(gpt2_targets, {t.name: 1 for t in gpt2_targets}, base_model=tiny_gpt2, budget=10**6).save(path)
    out = tmp_path / "run"
    assert main(["--rank-map", str(path), "--out", str(out), *SMALL]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err
    assert "transformer.h.0" in errors[0] and "another model" in errors[0]
    assert "step 1/" not in err and not out.exists()  # refused before the first training step


# --------------------------------------------------------------------------------------------------
# Baselines at the budget
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("baseline, budget", [("uniform", 13824), ("random", 13824), ("gradient", 13824),
                                              ("adalora", 12000)])
def test_baselines_use_the_budget_within_two_percent(baseline, budget, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="rankalloc"):
        result = _run(["--baseline", baseline, "--budget", str(budget), "--out", str(tmp_path / "run"), *SMALL]
                      + (["--max-steps", "12"] if baseline == "adalora" else []))  # through its budget schedule
    assert "the rank map uses" not in caplog.text  # (AdaLoRA's in-between budgets need not fill 99%)
    m = result.metrics
    assert m["method"] == baseline and m["budget"] == budget
    assert 0.98 * budget <= m["adapter_params"] <= 1.02 * budget
    np.testing.assert_allclose(_logits(_reload(result.out / "adapter")), result.logits, atol=1e-5, rtol=0)
    if baseline == "uniform":
        assert set(m["ranks"].values()) == {2}  # 2 * 6,912 = 13,824
    elif baseline in ("random", "gradient"):
        assert 0.99 * budget <= m["adapter_params"] <= budget
        assert json.loads((result.out / "rank_map.json").read_text())["search"]["baseline"] == baseline
    else:
        a = m["adalora"]
        assert a["kept_params"] == m["adapter_params"] <= budget and a["vs_budget"] == "below"
        assert a["kept_params_with_singular_values"] == a["kept_params"] + sum(a["kept_ranks"].values())
        assert m["checks"]["saved_adapter_params"] == a["kept_params_with_singular_values"]
        assert m["recipe"]["lr_used"] == m["recipe"]["adalora_lr"]
        kept = RankMap.load(result.out / "rank_map.json")  # the ranks AdaLoRA kept, as LoRA would train them
        assert kept.peft["modules_to_save"] == ["classifier"] and kept.lora_config()["modules_to_save"] == ["classifier"]


def test_adalora_schedule_scores_before_its_first_pruning():
    """peft scores at steps < T - tfinal and prunes from tinit + 1 (or at T - tfinal): T - tfinal >= 2 on every
    run length and setting the config allows, and one step of budget decrease remains."""
    from rankalloc.baselines import adalora_schedule
    from rankalloc.config import TrainParams

    for tinit_share, tfinal_share in [(0.1, 0.4), (0.0, 0.0), (0.05, 0.9), (0.0, 0.99), (0.5, 0.49)]:
        p = TrainParams(adalora_tinit=tinit_share, adalora_tfinal=tfinal_share)
        for steps in range(2, 40):
            tinit, tfinal = adalora_schedule(steps, p)
            assert steps - tfinal >= 2 and steps - tfinal - tinit >= 1 and tfinal >= 0, (tinit_share, steps)


@pytest.mark.parametrize("extra", [["--max-steps", "2"], ["--max-steps", "8", "--train.adalora_tinit", "0.05",
                                                          "--train.adalora_tfinal", "0.9"]])
def test_a_short_adalora_run_trains_where_it_crashed(extra, tmp_path):
    """Pruning started at step 1 with no scores collected (peft's KeyError on lora_E) on these settings."""
    result = _run(["--baseline", "adalora", "--budget", "12000", "--out", str(tmp_path / "run"), *SMALL, *extra])
    assert 0 < result.metrics["adapter_params"] <= 12000


def test_adalora_on_one_step_is_refused_in_one_line_before_writing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"needs at least 2 training steps.*this run has 1") as caught:
        _run(["--baseline", "adalora", "--budget", "12000", "--out", str(out), *SMALL, "--max-steps", "1"])
    assert "\n" not in str(caught.value) and not out.exists()


def test_uniform_below_99_percent_of_the_budget_says_so(targets, caplog):
    """Uniform moves in steps of one rank on every target (6,912 on this 1-block model): at 13,000 it keeps
    rank 1 (53%) and says why, where a multiple of the step fills it silently."""
    from rankalloc.baselines import check_baseline_budget, uniform_rank
    from rankalloc.config import TrainParams

    with caplog.at_level("WARNING", logger="rankalloc"):
        assert uniform_rank(targets, 13_000) == 1
    assert "uses 6,912 of the budget 13,000 parameters (53.2%)" in caplog.text and "multiple of 6,912" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="rankalloc"):
        assert uniform_rank(targets, 13_824) == 2
        check_baseline_budget("uniform", targets, 13_000, TrainParams())  # a sweep's check: its trial warns
    assert caplog.text == ""


def test_random_ranks_are_seeded_fill_the_budget_and_respect_r_max(targets):
    from rankalloc.baselines import random_ranks
    from rankalloc.budget import auto_r_max

    budget = 20000
    r_max = auto_r_max(budget, [t.cost_per_rank for t in targets])
    draws = [random_ranks(targets, budget, seed) for seed in range(6)]
    assert draws[0] == random_ranks(targets, budget, 0)  # the seed alone fixes the draw
    assert len({tuple(d.values()) for d in draws}) > 1  # and different seeds draw different maps
    for ranks in draws:
        used = sum(ranks[t.name] * t.cost_per_rank for t in targets)
        assert 0.99 * budget <= used <= budget
        assert all(0 <= ranks[t.name] <= min(r_max, t.max_rank) for t in targets)
    with pytest.raises(BudgetError, match="allowed"):
        random_ranks(targets, 10**9, 0)


def test_uniform_rank_is_the_largest_that_fits(targets):
    from rankalloc.baselines import uniform_rank

    assert uniform_rank(targets, 6912) == 1 and uniform_rank(targets, 20735) == 2
    with pytest.raises(BudgetError, match="below rank 1"):
        uniform_rank(targets, 6911)


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, flag", [
    ([], "--rank-map"),
    (["--rank-map", "x.json", "--baseline", "uniform", "--budget", "1k"], "exactly one"),
    (["--baseline", "lora"], "--baseline"),
    (["--baseline", "uniform"], "--budget"),
    (["--rank-map", "x.json", "--budget", "1k"], "--budget"),
    (["--rank-map", "x.json", "--train.lr", "0"], "--train.lr"),
    (["--rank-map", "x.json", "--train.adalora_tinit", "0.7"], "--train.adalora_tinit"),
    (["--rank-map", "x.json", "--train.epochs", "two"], "--train.epochs"),
])
def test_bad_flags_name_the_flag(argv, flag):
    with pytest.raises(ConfigError, match=flag):
        parse_args(RetrainConfig, argv, "rankalloc retrain", "")


@pytest.mark.parametrize("name", ["default.yaml", "smoke.yaml"])
def test_retrain_configs_load(name):
    cfg = load_yaml(RetrainConfig, REPO / "configs" / "retrain" / name)
    cfg.baseline, cfg.budget = "uniform", "83k"
    cfg.validate()
    header = (REPO / "configs" / "retrain" / name).read_text().splitlines()[0]
    assert header.startswith("# python -m rankalloc.retrain --config configs/retrain/" + name)


def test_classification_metrics_binary_has_mcc():
    from rankalloc.metrics import classification_metrics

    logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    m = classification_metrics(logits, np.array([0, 1, 1, 1]), 2)
    assert m["accuracy"] == 0.75 and -1 <= m["mcc"] <= 1 and m["eval_loss"] > 0


@pytest.mark.parametrize("retrain_scale", [2.0, 0.5])
def test_warm_start_reproduces_the_searched_model_with_hard_gates(tmp_path, retrain_scale):
    """--init-from copies each module's top-ranked components: before any step, the peft LoRA computes
    what the search's model computed with its hard gates, also when the retrain's LoRA scale differs
    from the search's (B is rescaled)."""
    import copy

    from rankalloc.config import TrainParams

    from rankalloc.adapters import GatedModel
    from rankalloc.config import SearchConfig, SearchParams
    from rankalloc.export import Scores
    from rankalloc.retrain import build_adapter
    from rankalloc.search import run_search
    from rankalloc.warm_start import warm_start

    model_cfg = ModelConfig(num_layers=1)
    data = DataConfig(**DATA, max_length=24)
    run = tmp_path / "search"
    run_search(SearchConfig(budget="13824", seed=0, device="cpu", out=str(run), model=model_cfg, data=data,
                            search=SearchParams(steps=6, warmup_steps=2, checkpoint_every=0, gap_batches=1)), "test")
    rank_map = RankMap.load(run / "rank_map.json")
    assert sum(1 for m in rank_map.modules.values() if m["rank"]) >= 2

    base = load_model(model_cfg, num_labels=3)
    targets = find_targets(base, model_cfg)
    scores = Scores.load(run)
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    gated = GatedModel(copy.deepcopy(base), targets, scores.r_max, scale=2.0)
    with torch.no_grad():
        for name, layer in gated.layers.items():
            layer.lora_A.copy_(state["adapters"][f"{name}.lora_A"])
            layer.lora_B.copy_(state["adapters"][f"{name}.lora_B"])
            layer.gates.log_alpha.copy_(state["adapters"][f"{name}.log_alpha"])
        gated.model.classifier.load_state_dict(state["heads"]["classifier"])
    gated.set_hard_ranks(rank_map.ranks)
    gated.set_gate_mode("hard")

    cfg = RetrainConfig(rank_map=str(run / "rank_map.json"), init_from=str(run), device="cpu", model=model_cfg,
                        data=data, train=TrainParams(scale=retrain_scale))
    peft_model, _ = build_adapter(cfg, copy.deepcopy(base), targets, rank_map, rank_map.budget, None, 10)
    batch = _eval_split().batch(slice(0, 16))
    batch.pop("labels")
    fresh = peft_model(**batch).logits.detach()
    info = warm_start(peft_model, run, rank_map)
    assert info["modules"] == sum(1 for m in rank_map.modules.values() if m["rank"]) and info["head_tensors"] == 2
    gated.eval()
    peft_model.eval()
    with torch.no_grad():
        expected, got = gated.model(**batch).logits, peft_model(**batch).logits
    assert torch.allclose(got, expected, atol=1e-5) and not torch.allclose(fresh, expected, atol=1e-3)
    five = load_model(model_cfg, num_labels=5)  # a retrain on a task with other classes than the search's
    other, _ = build_adapter(cfg, five, find_targets(five, model_cfg), rank_map, rank_map.budget, None, 10)
    with pytest.raises(RankMapError, match="the search's task head classifier has other shapes"):
        warm_start(other, run, rank_map)


def test_warm_start_needs_a_rank_map_and_a_search_of_the_same_model(tmp_path):
    with pytest.raises(ConfigError, match="--init-from .* needs --rank-map"):
        parse_args(RetrainConfig, ["--baseline", "uniform", "--budget", "10k", "--init-from", str(tmp_path)], "x", "")


def test_a_rank_map_searched_with_target_flags_retrains_without_them(minilm_1layer, tmp_path):
    """The map names its modules: one searched with --model.target_regex reaching outside the blocks
    (here BERT's pooler) retrains as it is, with no targeting flags repeated."""
    _, model = minilm_1layer
    chosen = find_targets(model, ModelConfig(num_layers=1, target_regex=r".*(pooler\.dense|self\.query)"))
    assert {t.name for t in chosen} == {"bert.pooler.dense", "bert.encoder.layer.0.attention.self.query"}
    rm = RankMap.from_ranks(chosen, {t.name: 2 for t in chosen}, base_model="minilm-l6", budget=3072,
                            search={"num_layers": 1, "task": "tweets"})
    rm.save(tmp_path / "rank_map.json")
    result = _run(["--rank-map", str(tmp_path / "rank_map.json"), "--out", str(tmp_path / "run"), *SMALL,
                   "--max-steps", "1"])
    assert result.metrics["adapter_params"] == 3072
    assert result.metrics["ranks"] == {t.name: 2 for t in chosen}


def test_without_task_the_retrain_takes_the_rank_maps_task_and_columns(rank_map_file, tmp_path):
    """A map searched on a local file with its own columns retrains on that file, not on the built-in default."""
    import pandas as pd

    rows = [{"sentence": f"{word} film number {i}", "y": word} for i in range(40) for word in ("good", "bad")]
    csv = tmp_path / "reviews.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    rm = RankMap.load(rank_map_file)
    rm.search = dict(rm.search, task="reviews", data={"task": str(csv), "text_column": "sentence",
                                                       "label_column": "y", "eval_file": None})
    rm.save(tmp_path / "rank_map.json")
    result = _run(["--rank-map", str(tmp_path / "rank_map.json"), "--out", str(tmp_path / "run"), *SMALL,
                   "--max-steps", "1"])
    assert result.metrics["task"] == "reviews" and result.metrics["config"]["data"]["text_column"] == "sentence"
    assert result.metrics["train_examples"] == 64  # --data.max_train_examples of SMALL, from the 80 rows
    assert sorted(set(result.labels.tolist())) == [0, 1]


def test_a_retrain_from_a_map_splits_its_task_as_the_search_did(rank_map_file, tmp_path, caplog):
    """A task without an evaluation split is split by --data.split_seed and --data.eval_fraction: a retrain that
    took the defaults instead would evaluate on examples the search trained on."""
    import pandas as pd

    rows = [{"sentence": f"{word} film number {i}", "y": word} for i in range(40) for word in ("good", "bad")]
    csv = tmp_path / "reviews.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    rm = RankMap.load(rank_map_file)
    rm.search = dict(rm.search, task="reviews", data={"task": str(csv), "text_column": "sentence",
                                                       "label_column": "y", "split_seed": 7, "eval_fraction": 0.3})
    rm.save(tmp_path / "rank_map.json")
    result = _run(["--rank-map", str(tmp_path / "rank_map.json"), "--out", str(tmp_path / "run"), *SMALL,
                   "--max-steps", "1"])
    data = result.metrics["config"]["data"]
    assert (data["split_seed"], data["eval_fraction"]) == (7, 0.3)
    assert result.metrics["eval_examples"] == 24  # 30% of the 80 rows, against 16 at the default 20%
    columns = ["--task", str(csv), "--data.text_column", "sentence", "--data.label_column", "y", "--max-steps", "1"]
    named = _run(["--rank-map", str(tmp_path / "rank_map.json"), "--out", str(tmp_path / "named"), *SMALL, *columns])
    assert named.metrics["eval_examples"] == 24  # the map's task named: its split too
    with caplog.at_level("WARNING", logger="rankalloc"):  # another split asked for, even at the usual values
        other = _run(["--rank-map", str(tmp_path / "rank_map.json"), "--out", str(tmp_path / "run2"), *SMALL,
                      *columns, "--data.split_seed", "0", "--data.eval_fraction", "0.2"])
    assert other.metrics["eval_examples"] == 16
    rm.search["data"]["eval_fraction"] = 1.5  # a hand-edited map: refused in one line, however the task is named
    rm.save(tmp_path / "bad_map.json")
    with pytest.raises(RankMapError, match=r"rank map search.data: --data.eval_fraction must lie strictly between 0 "
                                           r"and 1, got 1.5 \(a value recorded in the rank map; give the flag"):
        _run(["--rank-map", str(tmp_path / "bad_map.json"), "--out", str(tmp_path / "bad"), *SMALL, *columns])
    assert "--data.split_seed 0 (searched with 7), --data.eval_fraction 0.2 (searched with 0.3)" in caplog.text
    # from Python, a DataConfig built without a task follows the map too (it had trained on tweets)
    from rankalloc.config import DataConfig, ModelConfig
    from rankalloc.retrain import run_retrain

    python = run_retrain(RetrainConfig(rank_map=str(tmp_path / "rank_map.json"), out=str(tmp_path / "run3"),
                                       device="cpu", max_steps=1, model=ModelConfig(name="minilm-l6", num_layers=1),
                                       data=DataConfig(**DATA)))
    assert python.metrics["task"] == "reviews" and python.metrics["eval_examples"] == 24


def test_a_killed_retrain_resumes_from_its_checkpoint_to_the_same_result(rank_map_file, tmp_path):
    """Killed after step 5 of 8 (checkpoint at 4), a rerun continues from step 4 and ends where an
    uninterrupted run ends: same logits, same history."""
    from rankalloc.errors import RunDirError
    from rankalloc.retrain import run_retrain

    argv = ["--rank-map", str(rank_map_file), *SMALL, "--max-steps", "8", "--train.checkpoint_every", "4",
            "--train.lora_dropout", "0.1"]  # dropout: the RNG state must travel with the checkpoint too
    whole = _run(argv + ["--out", str(tmp_path / "whole")])

    class Killed(Exception):
        pass

    def die_after_step_5(row):
        if row["step"] == 5:
            raise Killed

    cfg, _ = parse_args(RetrainConfig, argv + ["--out", str(tmp_path / "killed")], "rankalloc retrain", "")
    with pytest.raises(Killed):
        run_retrain(cfg, command="test", on_step=die_after_step_5)
    assert (tmp_path / "killed" / "checkpoint.pt").is_file()
    earlier = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)["clock"]["elapsed_s"]
    status = (tmp_path / "killed" / "status.json").read_text()
    with pytest.raises(RunDirError, match="started with other training settings"):
        _run(argv + ["--out", str(tmp_path / "killed"), "--train.lr", "0.01"])
    assert (tmp_path / "killed" / "status.json").read_text() == status  # the refused command is not recorded
    resumed = _run(argv + ["--out", str(tmp_path / "killed")])
    assert resumed.metrics["resumed_from_step"] == 4 and whole.metrics["resumed_from_step"] is None
    assert resumed.metrics["wall_time_s"]["earlier_processes"] == earlier > 0  # the killed process's share
    assert resumed.metrics["wall_time_s"]["total"] > earlier and "earlier_processes" not in whole.metrics["wall_time_s"]
    assert np.array_equal(resumed.logits, whole.logits)
    assert [r["train_loss"] for r in json.loads((resumed.out / "history.json").read_text())] == \
        [r["train_loss"] for r in json.loads((whole.out / "history.json").read_text())]
    assert not (resumed.out / "checkpoint.pt").exists()  # the adapter holds the result


def test_a_retrain_killed_after_its_outputs_but_before_done_is_not_replaced_by_a_rerun(rank_map_file, tmp_path,
                                                                                       monkeypatch):
    """Killed in the moment between writing its outputs and marking itself done, a retrain keeps its
    checkpoint: a rerun with other settings is refused (the result is not replaced), the same command
    resumes and ends with the same result, and only then is the checkpoint deleted."""
    from rankalloc import rundir
    from rankalloc.errors import RunDirError

    class Killed(BaseException):
        pass

    argv = ["--rank-map", str(rank_map_file), *SMALL, "--out", str(tmp_path / "run")]  # 4 steps, checkpoints every 100
    real_set_status = rundir.set_status

    def killed_when_marking_done(out, state, **extra):
        if state == "done":
            raise Killed
        return real_set_status(out, state, **extra)

    monkeypatch.setattr(rundir, "set_status", killed_when_marking_done)
    with pytest.raises(Killed):
        _run(argv)
    monkeypatch.setattr(rundir, "set_status", real_set_status)
    run = tmp_path / "run"
    metrics = (run / "metrics.json").read_text()
    assert json.loads((run / "status.json").read_text())["state"] == "running"
    assert (run / "checkpoint.pt").is_file()
    with pytest.raises(RunDirError, match="started with other training settings"):
        _run(argv + ["--train.lr", "0.05"])
    assert (run / "metrics.json").read_text() == metrics
    again = _run(argv)
    assert again.metrics["resumed_from_step"] == 4  # the checkpoint after the last step: nothing to train again
    assert again.metrics["accuracy"] == json.loads(metrics)["accuracy"]
    assert json.loads((run / "status.json").read_text())["state"] == "done"
    assert not (run / "checkpoint.pt").exists()


@pytest.mark.parametrize("killed_after", [5, 8])  # 5: in the budget decrease (resumes at 3); 8: at the final ranks (6)
def test_a_killed_adalora_retrain_resumes_with_its_allocator_state(tmp_path, killed_after):
    """AdaLoRA's checkpoint carries its allocator's running scores and fixed rank pattern: a rerun ends
    with the same logits, history and kept ranks as an uninterrupted run."""
    from rankalloc.retrain import run_retrain

    argv = ["--baseline", "adalora", "--budget", "10k", *SMALL, "--max-steps", "10", "--train.checkpoint_every", "3"]
    whole = _run(argv + ["--out", str(tmp_path / "whole")])

    class Killed(Exception):
        pass

    def die(row):
        if row["step"] == killed_after:
            raise Killed

    cfg, _ = parse_args(RetrainConfig, argv + ["--out", str(tmp_path / "killed")], "rankalloc retrain", "")
    with pytest.raises(Killed):
        run_retrain(cfg, command="test", on_step=die)
    resumed = _run(argv + ["--out", str(tmp_path / "killed"), "--resume"])
    assert resumed.metrics["resumed_from_step"] == 3 * (killed_after // 3)
    assert np.array_equal(resumed.logits, whole.logits)
    assert resumed.metrics["ranks"] == whole.metrics["ranks"]
    assert [r["train_loss"] for r in json.loads((resumed.out / "history.json").read_text())] == \
        [r["train_loss"] for r in json.loads((whole.out / "history.json").read_text())]


def test_a_resume_needs_the_same_process_count_and_a_checkpoint_every_process_sees(tmp_path):
    from rankalloc.distributed import DistInfo
    from rankalloc.errors import RunDirError
    from rankalloc.retrain_loop import load_resumable as _resumable
    from rankalloc.search import load_checkpoint

    second = DistInfo(rank=1, world_size=2)
    with pytest.raises(RunDirError, match="process 1 cannot see .*give every process one shared --out"):
        _resumable(tmp_path / "checkpoint.pt", {"world_size": 2}, "uniform", second)
    with pytest.raises(RunDirError, match="process 1 cannot see .*give every process one shared --out"):
        load_checkpoint(tmp_path, None, None, None, second)
    assert _resumable(tmp_path / "checkpoint.pt", {"world_size": 1}, "uniform") is None  # rank 0: a fresh run

    torch.save({"meta": {"method": "uniform", "steps": 8, "world_size": 1}, "step": 4}, tmp_path / "checkpoint.pt")
    with pytest.raises(RunDirError, match=r"started on 1 process\(es\), this one has 2; resume with 1"):
        _resumable(tmp_path / "checkpoint.pt", {"method": "uniform", "steps": 4, "world_size": 2}, "uniform")
    torch.save({"meta": {"method": "uniform", "steps": 4}, "step": 2}, tmp_path / "checkpoint.pt")  # earlier version
    assert _resumable(tmp_path / "checkpoint.pt", {"method": "uniform", "steps": 4, "world_size": 2}, "uniform")["step"] == 2


def test_a_rank_map_searched_with_relative_paths_retrains_from_another_folder(tmp_path, monkeypatch, tiny_gpt2):
    """A relative --model folder and --task file are recorded as absolute paths (rank map, scores, peft
    config), so the rank map retrains, and the adapter loads, from any working directory."""
    import os

    import pandas as pd

    from rankalloc.config import SearchConfig
    from rankalloc.search import run_search

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    rows = [{"sentence": f"{word} film number {i}", "y": word} for i in range(40) for word in ("good", "bad")]
    pd.DataFrame(rows).to_csv(work / "reviews.csv", index=False)
    monkeypatch.chdir(work)
    model = os.path.relpath(tiny_gpt2, work)
    cfg, _ = parse_args(SearchConfig, ["--model", model, "--task", "reviews.csv", "--data.text_column", "sentence",
                                       "--data.label_column", "y", "--budget", "2000", "--out", "runs/s",
                                       "--device", "cpu", "--max-steps", "4", "--search.warmup_steps", "1",
                                       "--search.gap_batches", "1"] + [f"--data.{k}={v}" for k, v in DATA.items()],
                        "rankalloc search", "")
    run_search(cfg, command="test")
    rank_map = json.loads((work / "runs/s/rank_map.json").read_text())
    assert rank_map["base_model"] == str(Path(tiny_gpt2).resolve())
    assert rank_map["search"]["data"]["task"] == str((work / "reviews.csv").resolve())
    assert json.loads((work / "runs/s/adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(Path(tiny_gpt2).resolve())

    monkeypatch.chdir(elsewhere)
    result = _run(["--rank-map", str(Path("..") / "work" / "runs" / "s" / "rank_map.json"), "--out", "r",
                   "--device", "cpu", "--max-steps", "2"] + [f"--data.{k}={v}" for k, v in DATA.items()])
    assert result.metrics["task"] == "reviews" and sorted(set(result.labels.tolist())) == [0, 1]


def test_the_model_card_says_how_pairs_were_joined_and_where_the_built_in_base_is(tmp_path, rank_map_run):
    """A tokenizer without a pair template got the two texts joined by rankalloc: the card says how, so that
    a user's inputs match training.  The built-in base is named by its hub id, with its packaged copy."""
    import pandas as pd
    from transformers import AutoModelForSequenceClassification, GPT2Config

    from test_models import _word_tokenizer

    model = _word_tokenizer(tmp_path / "wordlevel", special=True)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(
        GPT2Config.from_pretrained(model, num_labels=2, pad_token_id=0)).save_pretrained(model)
    rows = [{"a": f"w{i % 50} w{i % 7}", "b": f"w{i % 11}", "label": i % 2} for i in range(80)]
    pd.DataFrame(rows).to_csv(tmp_path / "pairs.csv", index=False)
    _run(["--baseline", "uniform", "--budget", "512", "--model", model, "--task", str(tmp_path / "pairs.csv"),
          "--data.text_column", "a", "--data.text_pair_column", "b", "--out", str(tmp_path / "r"), "--device", "cpu",
          "--max-steps", "1"] + [f"--data.{k}={v}" for k, v in DATA.items()])
    card = (tmp_path / "r" / "adapter" / "README.md").read_text()
    assert "joined into one before tokenizing, as `text + '</s>' + pair`" in card
    assert "joined into one" not in (rank_map_run.out / "adapter" / "README.md").read_text()  # BERT marks pairs
    assert 'resolve_model_path("minilm-l6")' in (rank_map_run.out / "adapter" / "README.md").read_text()


def test_a_baseline_s_rank_map_retrains_on_the_task_it_was_trained_on(tmp_path):
    """Every retrain's rank_map.json names the task and columns it trained (a baseline's named none, and a
    retrain from it trained on tweets without a word); the sweep's Pareto rows point at these files."""
    import pandas as pd

    rows = [{"sentence": f"{word} film number {i}", "verdict": "good" if word == "fine" else "bad"}
            for i in range(48) for word in ("fine", "awful")]
    pd.DataFrame(rows).to_csv(tmp_path / "reviews.csv", index=False)
    columns = ["--data.text_column", "sentence", "--data.label_column", "verdict"]
    first = _run(["--baseline", "uniform", "--budget", "13824", "--task", str(tmp_path / "reviews.csv"), *columns,
                  "--out", str(tmp_path / "u"), *SMALL, "--max-steps", "1"])
    recorded = RankMap.load(tmp_path / "u" / "rank_map.json").search
    assert recorded["data"]["task"] == str(tmp_path / "reviews.csv") and recorded["data"]["text_column"] == "sentence"
    again = _run(["--rank-map", str(tmp_path / "u" / "rank_map.json"), "--out", str(tmp_path / "again"), *SMALL,
                  "--max-steps", "1"])
    assert again.metrics["task"] == first.metrics["task"] and again.metrics["label_names"] == ["bad", "good"]


def test_a_rank_map_searched_at_another_scale_says_so(rank_map_file, tmp_path, caplog):
    rm = RankMap.load(rank_map_file)
    rm.search = dict(rm.search, scale=4.0)
    rm.save(tmp_path / "rank_map.json")
    with caplog.at_level("WARNING", logger="rankalloc"):
        result = _run(["--rank-map", str(tmp_path / "rank_map.json"), "--out", str(tmp_path / "r"), *SMALL,
                       "--max-steps", "1"])
    assert "searched with --search.scale 4.0; retraining with --train.scale 2.0" in caplog.text
    assert result.metrics["recipe"]["scale"] == 2.0  # the flag decides; the warning only tells
    deeper = [a if a != "1" or SMALL[i - 1] != "--model.num_layers" else "2" for i, a in enumerate(SMALL)]
    with caplog.at_level("WARNING", logger="rankalloc"):  # a 1-block map on 2 blocks: the second gets nothing
        result = _run(["--rank-map", str(rank_map_file), "--out", str(tmp_path / "r2"), *deeper, "--max-steps", "1"])
    assert "searched on the first 1 blocks, this retrain runs the first 2 blocks" in caplog.text
    assert all(".layer.0." in name for name in result.metrics["ranks"])


def test_a_resume_checks_the_warm_start_and_the_examples_and_reads_damaged_checkpoints_in_one_line(tmp_path):
    import torch

    from rankalloc.errors import RunDirError
    from rankalloc.retrain_loop import load_resumable

    meta = {"method": "rank_map", "steps": 8, "init_from": None, "data_fingerprint": "abc"}
    path = tmp_path / "checkpoint.pt"
    torch.save({"meta": dict(meta), "step": 4, "params": {}}, path)
    assert load_resumable(path, meta, "rank_map")["step"] == 4
    with pytest.raises(RunDirError, match="started with another --init-from"):
        load_resumable(path, {**meta, "init_from": "/runs/search"}, "rank_map")
    with pytest.raises(RunDirError, match="started with other examples"):
        load_resumable(path, {**meta, "data_fingerprint": "xyz"}, "rank_map")
    torch.save({"meta": {"method": "rank_map", "steps": 8}, "step": 4, "params": {}}, path)  # an earlier version's
    assert load_resumable(path, meta, "rank_map")["step"] == 4
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RunDirError, match="cannot be read"):
        load_resumable(path, meta, "rank_map")
    torch.save({"config": {}, "adapters": {}}, path)  # a search's checkpoint
    with pytest.raises(RunDirError, match="is not a retrain checkpoint"):
        load_resumable(path, meta, "rank_map")


def test_an_out_holding_the_rank_map_s_run_is_refused(rank_map_file, tmp_path):
    """--overwrite there would set the search aside and delete it once the retrain finishes."""
    import shutil

    from rankalloc.errors import RunDirError

    search = tmp_path / "search"
    search.mkdir()
    shutil.copy(rank_map_file, search / "rank_map.json")
    for out in (search, tmp_path):
        with pytest.raises(RunDirError, match=r"holds the run of --rank-map .*; choose a folder outside it"):
            _run(["--rank-map", str(search / "rank_map.json"), *SMALL, "--out", str(out), "--overwrite"])
    assert sorted(p.name for p in search.iterdir()) == ["rank_map.json"]


def test_a_target_flag_that_leaves_out_the_maps_modules_is_named(rank_map_file, tmp_path):
    """A rank map names its own modules; a --model.target_modules that drops some of them is the cause the
    message names (not "a module of another model")."""
    from rankalloc.errors import RankMapError

    with pytest.raises(RankMapError, match=r"--model.target_modules leaves out bert.encoder.layer.0.attention.self.key, "
                                           r"which the rank map .* gives rank 0 \(5 such module\(s\)\); drop the flag"):
        _run(["--rank-map", str(rank_map_file), *SMALL, "--model.target_modules", "query", "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_a_bad_value_recorded_in_the_map_is_named_as_the_maps(rank_map_file, tmp_path):
    rm = RankMap.load(rank_map_file)
    rm.search["num_layers"] = 0
    rm.save(tmp_path / "map.json")
    with pytest.raises(RankMapError, match=r"rank map search.num_layers: --model.num_layers must be a positive"):
        _run(["--rank-map", str(tmp_path / "map.json"), "--out", str(tmp_path / "r"), "--device", "cpu"])
    rm.search["num_layers"] = 100
    rm.save(tmp_path / "map.json")
    with pytest.raises(RankMapError, match=r"rank map search.num_layers: --model.num_layers 100: .* has only 6 blocks.*"
                                           r"give --model.num_layers to override it"):
        _run(["--rank-map", str(tmp_path / "map.json"), "--out", str(tmp_path / "r"), "--device", "cpu"])
    rm.search["num_layers"] = 1
    rm.base_model = str(tmp_path / "no-such-model")
    rm.save(tmp_path / "map.json")
    with pytest.raises(RankMapError, match=r"rank map base_model: --model .*no-such-model.*give --model to override"):
        _run(["--rank-map", str(tmp_path / "map.json"), "--out", str(tmp_path / "r"), "--device", "cpu"])
    assert not (tmp_path / "r").exists()
