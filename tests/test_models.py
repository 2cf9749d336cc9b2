"""Target discovery for any architecture; model loading errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rankalloc.config import ModelConfig
from rankalloc.errors import ModelError
from rankalloc.models import load_model, resolve_model_path, skeleton_targets
from rankalloc.targets import find_targets, fingerprint, head_modules


def test_minilm_targets_are_the_six_projections_per_block(minilm_1layer):
    cfg, model = minilm_1layer
    targets = find_targets(model, cfg)
    kinds = [t.kind for t in targets]
    assert kinds == ["attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense", "intermediate.dense", "output.dense"]
    assert all(t.layer == 0 for t in targets)
    assert sum(t.cost_per_rank for t in targets) == 6912  # 4 x 768 + 2 x 1920
    assert "classifier" in head_modules(model)
    assert not any("pooler" in t.name or "classifier" in t.name for t in targets)


def test_gpt2_conv1d_targets(tiny_gpt2):
    cfg = ModelConfig(name=tiny_gpt2)
    model = load_model(cfg, num_labels=3)
    targets = find_targets(model, cfg)
    by_kind = {t.kind: t for t in targets if t.layer == 0}
    assert set(by_kind) == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    assert (by_kind["attn.c_attn"].in_features, by_kind["attn.c_attn"].out_features) == (32, 96)
    assert (by_kind["mlp.c_fc"].in_features, by_kind["mlp.c_fc"].out_features) == (32, 128)
    assert {t.layer for t in targets} == {0, 1}


def test_llama_targets(tiny_llama):
    cfg = ModelConfig(name=tiny_llama)
    model = load_model(cfg, num_labels=3)
    targets = find_targets(model, cfg)
    kinds = {t.kind for t in targets}
    assert kinds == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    k = next(t for t in targets if t.kind == "self_attn.k_proj")
    assert (k.in_features, k.out_features) == (32, 16)  # grouped-query attention


@pytest.mark.parametrize("model", ["minilm", "gpt2", "llama", "mixtral"])
def test_targets_from_the_config_alone_equal_those_of_the_loaded_model(model, tiny_gpt2, tiny_llama, tiny_mixtral):
    cfg = {"minilm": ModelConfig(num_layers=2), "gpt2": ModelConfig(name=tiny_gpt2),
           "llama": ModelConfig(name=tiny_llama), "mixtral": ModelConfig(name=tiny_mixtral)}[model]
    skeleton = skeleton_targets(cfg)  # built on the meta device: no weights read
    assert skeleton == find_targets(load_model(cfg, num_labels=3), cfg)
    assert len(skeleton) == {"minilm": 12, "gpt2": 8, "llama": 14, "mixtral": 12}[model]


@pytest.mark.parametrize("field, value, expected", [
    ("target_modules", ["query", "value"], {"attention.self.query", "attention.self.value"}),
    ("target_regex", r".*\.intermediate\.dense", {"intermediate.dense"}),
])
def test_user_target_patterns(minilm_1layer, field, value, expected):
    _, model = minilm_1layer
    targets = find_targets(model, ModelConfig(num_layers=1, **{field: value}))
    assert {t.kind for t in targets} == expected


@pytest.mark.parametrize("field, value", [("target_modules", ["nonexistent"]), ("target_regex", "zzz.*")])
def test_patterns_matching_nothing_list_module_names(minilm_1layer, field, value):
    _, model = minilm_1layer
    with pytest.raises(ModelError, match="no adapter targets match.*include: bert.encoder.layer.0"):
        find_targets(model, ModelConfig(num_layers=1, **{field: value}))


def test_a_target_suffix_that_matches_nothing_is_refused_even_beside_one_that_matches(minilm_1layer):
    _, model = minilm_1layer
    with pytest.raises(ModelError, match=r"target_modules: valeu match\(es\) no module of .* that can take an adapter.*attention"):
        find_targets(model, ModelConfig(num_layers=1, target_modules=["query", "valeu"]))


def test_more_layers_than_the_model_has_is_refused():
    """transformers would add randomly initialised blocks without a word."""
    from rankalloc.models import skeleton_targets

    with pytest.raises(ModelError, match=r"--model.num_layers 8: minilm-l6 has only 6 blocks; allowed: 1 to 6"):
        skeleton_targets(ModelConfig(num_layers=8))
    assert len(skeleton_targets(ModelConfig(num_layers=6))) == 36


def test_a_missing_relative_folder_read_as_a_hub_id_says_so():
    from rankalloc.models import load_tokenizer

    with pytest.raises(ModelError, match=r"models/my-bert was read as a hub id, as there is no such local folder"):
        load_tokenizer(ModelConfig(name="models/my-bert"))


def test_missing_model_path_is_a_one_line_error(tmp_path):
    with pytest.raises(ModelError, match="no such folder"):
        resolve_model_path(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_path(str(tmp_path / "empty"))


def test_fingerprint_depends_on_names_and_shapes(minilm_1layer):
    cfg, model = minilm_1layer
    targets = find_targets(model, cfg)
    assert fingerprint(targets) == fingerprint(list(reversed(targets)))
    assert fingerprint(targets) != fingerprint(targets[:-1])


def _tiny_encoder_decoder(kind: str):
    from transformers import (BartConfig, BartForSequenceClassification, T5Config,
                              T5ForSequenceClassification)

    if kind == "bart":
        return BartForSequenceClassification(BartConfig(
            vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
            num_labels=3))
    return T5ForSequenceClassification(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                                num_heads=2, num_labels=3))


@pytest.mark.parametrize("kind, stacks, per_block", [
    ("bart", ("model.encoder.layers", "model.decoder.layers"), (6, 10)),
    ("t5", ("transformer.encoder.block", "transformer.decoder.block"), (6, 10)),
])
def test_encoder_decoder_models_get_adapters_in_both_stacks(kind, stacks, per_block):
    model = _tiny_encoder_decoder(kind)
    targets = find_targets(model, ModelConfig())
    encoder, decoder = ([t for t in targets if t.name.startswith(s + ".")] for s in stacks)
    assert (len(encoder), len(decoder)) == (2 * per_block[0], 2 * per_block[1])  # cross-attention in the decoder
    assert len(encoder) + len(decoder) == len(targets)
    assert {t.layer for t in targets} == {0, 1}
    # the kind names its stack, so the encoder's and the decoder's query stay apart in tables and reports
    assert all(t.kind.startswith(stacks[0] + ".") for t in encoder)
    assert all(t.kind.startswith(stacks[1] + ".") for t in decoder)
    # the stack's own inner ModuleLists (T5's block.layer) are not stacks of their own
    assert len({(t.layer, t.kind) for t in targets}) == len(targets)


@pytest.mark.parametrize("kind, stacks", [
    ("bart", ("model.encoder.layers", "model.decoder.layers")),
    ("t5", ("transformer.encoder.block", "transformer.decoder.block")),
])
def test_num_layers_cuts_the_encoder_and_the_decoder_alike(kind, stacks, tmp_path):
    _tiny_encoder_decoder(kind).config.save_pretrained(tmp_path)
    targets = skeleton_targets(ModelConfig(name=str(tmp_path), num_layers=1))
    for stack in stacks:
        assert {t.layer for t in targets if t.name.startswith(stack + ".")} == {0}, stack
    with pytest.raises(ModelError, match=r"--model.num_layers 3: .* has only 2 blocks; allowed: 1 to 2"):
        skeleton_targets(ModelConfig(name=str(tmp_path), num_layers=3))


def test_num_layers_cuts_per_block_settings_too(tmp_path):
    """Longformer keeps one attention window per block; a cut that left two for one block failed its assert."""
    from transformers import LongformerConfig

    from conftest import _save_random

    path = _save_random(tmp_path, LongformerConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=2, intermediate_size=64,
                                                   attention_window=[4, 8], max_position_embeddings=80))
    model = load_model(ModelConfig(name=path, num_layers=1))
    assert model.config.num_hidden_layers == 1 and list(model.config.attention_window) == [4]
    assert {t.layer for t in find_targets(model, ModelConfig())} == {0}


def test_a_config_the_model_refuses_is_a_one_line_model_error(tmp_path):
    from transformers import LongformerConfig

    from conftest import _save_random

    path = Path(_save_random(tmp_path, LongformerConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                                        num_attention_heads=2, intermediate_size=64,
                                                        attention_window=[4, 8], max_position_embeddings=80)))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(config, attention_window=[4, 8, 8])))
    with pytest.raises(ModelError, match=r"cannot load its weights as .*attention_window"):
        load_model(ModelConfig(name=str(path)))


def test_a_checkpoint_with_another_label_count_loads_with_a_fresh_head(tiny_gpt2, caplog):
    """A fine-tuned 3-label checkpoint used for a 5-label task: the head starts fresh, the rest loads."""
    import torch
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(tiny_gpt2)
    with caplog.at_level("WARNING", logger="rankalloc.models"):
        model = load_model(ModelConfig(name=tiny_gpt2), num_labels=5)
    assert model.score.weight.shape[0] == 5
    assert "task head (score.weight) has another shape; it starts fresh (5 labels)" in caplog.text
    torch.testing.assert_close(model.transformer.h[0].mlp.c_fc.weight, saved.transformer.h[0].mlp.c_fc.weight)


def test_a_checkpoint_whose_body_does_not_fit_is_a_one_line_error(tiny_gpt2, tmp_path):
    import json
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_gpt2, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(dict(config, n_inner=64)))  # the MLP no longer fits
    with pytest.raises(ModelError, match=r"mlp\.c_fc\.(weight|bias) does not fit .* only the head may differ"):
        load_model(ModelConfig(name=str(broken)), num_labels=3)


def test_skeleton_targets_of_a_decoder_without_a_classification_class(tmp_path):
    """Cohere has no sequence-classification class; the sweep still counts its target costs."""
    from transformers import CohereConfig, CohereForCausalLM

    config = CohereConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, eos_token_id=1, bos_token_id=0,
                          pad_token_id=0)
    config.save_pretrained(tmp_path)
    skeleton = skeleton_targets(ModelConfig(name=str(tmp_path)))
    loaded = find_targets(CohereForCausalLM(config), ModelConfig())
    assert [(t.name, t.cost_per_rank) for t in skeleton] == [(t.name, t.cost_per_rank) for t in loaded]
    assert len(skeleton) == 14


def test_an_fp16_checkpoint_loads_in_float32(tiny_gpt2, tmp_path):
    """transformers >= 5 keeps a checkpoint's dtype; an fp16 task head under AdamW underflows to inf/NaN."""
    import torch
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(tiny_gpt2).half().save_pretrained(tmp_path / "fp16")
    model = load_model(ModelConfig(name=str(tmp_path / "fp16")), num_labels=3)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_linear_layers_inside_multihead_attention_are_not_targets():
    """nn.MultiheadAttention uses out_proj.weight directly: a LoRA there would change nothing."""
    from torch import nn

    class Classifier(nn.Module):
        base_model_prefix = "encoder"

        def __init__(self):
            super().__init__()
            self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2,
                                                 enable_nested_tensor=False)
            self.classifier = nn.Linear(16, 3)

    model = Classifier()
    names = [t.name for t in find_targets(model, ModelConfig())]
    assert names == [f"encoder.layers.{i}.{k}" for i in range(2) for k in ("linear1", "linear2")]
    with pytest.raises(ModelError, match=r"inside nn.MultiheadAttention, e.g. encoder.layers.0.self_attn.out_proj"):
        find_targets(model, ModelConfig(target_modules=["out_proj"]))


def test_a_decoder_head_finds_the_last_token_by_the_tokenizer_s_padding_id(tiny_gpt2, tmp_path, caplog):
    """A config whose pad_token_id is not the tokenizer's: the classifier would pool a padding position."""
    import json
    import shutil

    import torch

    folder = tmp_path / "pad5"
    shutil.copytree(tiny_gpt2, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, pad_token_id=5)))
    with caplog.at_level("INFO", logger="rankalloc.models"):
        model = load_model(ModelConfig(name=str(folder)), num_labels=3, pad_token_id=0)
    assert model.config.pad_token_id == 0
    assert "pad_token_id 5 is not the tokenizer's padding id 0" in caplog.text
    ids, mask = torch.tensor([[101, 2023, 2003, 102, 0, 0]]), torch.tensor([[1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[:, :4], attention_mask=mask[:, :4]).logits
    torch.testing.assert_close(padded, alone)


def test_num_layers_keeps_a_shallower_decoder_whole(tmp_path):
    """An asymmetric encoder-decoder (distilbart style: more encoder than decoder blocks) is cut to N
    encoder blocks and at most N decoder blocks, not refused."""
    from transformers import BartConfig

    BartConfig(vocab_size=100, d_model=16, encoder_layers=3, decoder_layers=1, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
               max_position_embeddings=64).save_pretrained(tmp_path)
    targets = skeleton_targets(ModelConfig(name=str(tmp_path), num_layers=2))
    assert {t.layer for t in targets if t.name.startswith("model.encoder.layers.")} == {0, 1}
    assert {t.layer for t in targets if t.name.startswith("model.decoder.layers.")} == {0}


# --------------------------------------------------------------------------------------------------
# From a review of architectures and tokenizers beyond the shipped model
# --------------------------------------------------------------------------------------------------
def _word_tokenizer(folder, special: bool):
    """A word-level tokenizer of 200 words with no pair template (as byte-level BPE tokenizers have);
    with ``special``, its end-of-sequence token is </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["</s>"] + [f"w{i}" for i in range(199)] + ["a", "b"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **({"eos_token": "</s>"} if special else {}))
    tok.save_pretrained(folder)
    from transformers import GPT2Config

    GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=1, n_head=2).save_pretrained(folder)
    return str(folder)


def test_a_model_folder_without_a_usable_tokenizer_is_refused_in_one_line(tmp_path):
    from transformers import BertConfig

    from rankalloc.models import load_tokenizer

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "bare")
    with pytest.raises(ModelError, match="the folder holds no tokenizer"):
        load_tokenizer(ModelConfig(name=str(tmp_path / "bare")))
    _word_tokenizer(tmp_path / "plain", special=False)
    with pytest.raises(ModelError, match="no padding, end-of-sequence or unknown token"):
        load_tokenizer(ModelConfig(name=str(tmp_path / "plain")))
    assert load_tokenizer(ModelConfig(name=_word_tokenizer(tmp_path / "eos", special=True))).pad_token == "</s>"


def test_pair_texts_keep_a_boundary_when_the_tokenizer_has_no_pair_template(tmp_path):
    import pandas as pd

    from rankalloc.tokenization import tokenize_texts
    from rankalloc.models import load_tokenizer

    tok = load_tokenizer(ModelConfig(name=_word_tokenizer(tmp_path / "eos", special=True)))
    ids = tokenize_texts(pd.DataFrame({"text": ["w1 w2"], "text_pair": ["w3"]}), tok, 8)["input_ids"][0]
    assert ids[:4].tolist() == [tok.convert_tokens_to_ids(t) for t in ("w1", "w2", "</s>", "w3")]


def test_a_body_outside_the_class_prefix_is_not_taken_for_a_head():
    """Llama-4's text model names its prefix 'language_model' but keeps the body in 'model'."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    model = Llama4ForCausalLM(Llama4TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, intermediate_size_mlp=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=2, tie_word_embeddings=False))
    assert "model" not in head_modules(model)
    targets = find_targets(model, ModelConfig())
    assert targets and all(t.name.startswith("model.layers.") for t in targets)


def test_an_encoder_decoder_with_one_decoder_block_keeps_it():
    """distilbart-xsum-12-1's shape: the lone decoder block (with cross-attention) gets adapters too."""
    from transformers import BartConfig, BartForSequenceClassification

    model = BartForSequenceClassification(BartConfig(
        vocab_size=64, d_model=16, encoder_layers=12, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32, num_labels=3))
    decoder = [t for t in find_targets(model, ModelConfig()) if t.name.startswith("model.decoder.layers.")]
    assert len(decoder) == 10


def test_mixture_of_experts_routers_and_scalar_gates_are_not_default_targets():
    """A router picks experts and a scalar gate weighs the shared expert: LoRA budget there is wasted."""
    from torch import nn
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        num_experts=4, num_experts_per_tok=2))
    model.model.layers[0].mlp.router_like = nn.Linear(32, 4)  # a router as a plain Linear, named like one
    kinds = {t.kind for t in find_targets(model, ModelConfig())}
    assert "mlp.shared_expert.gate_proj" in kinds and "self_attn.q_proj" in kinds
    assert not {"mlp.shared_expert_gate", "mlp.router_like"} & kinds
    picked = find_targets(model, ModelConfig(target_regex=r".*shared_expert_gate"))  # asked for: adapted
    assert len(picked) == 2


def test_a_causal_language_model_has_no_task_head():
    """ModernBERT's decoder keeps a pretrained dense + norm ('lm_head') before its output layer
    ('decoder'): it is part of the pretrained model, not a head to train outside the budget."""
    from transformers import ModernBertDecoderConfig, ModernBertDecoderForCausalLM

    model = ModernBertDecoderForCausalLM(ModernBertDecoderConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, cls_token_id=2, sep_token_id=1))
    assert head_modules(model) == {}
    assert all(t.name.startswith("model.layers.") for t in find_targets(model, ModelConfig()))


def test_loading_a_model_leaves_the_caller_s_progress_bars_as_they_were(minilm_1layer):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    load_model(ModelConfig(num_layers=1), num_labels=2)
    assert hf_logging.is_progress_bar_enabled()


def test_block_weights_outside_linear_layers_are_named(caplog):
    """XLNet keeps its attention in raw matrices: only its feed-forward layers can take adapters, and a run says so."""
    from transformers import XLNetConfig, XLNetForSequenceClassification

    model = XLNetForSequenceClassification(XLNetConfig(vocab_size=64, d_model=32, n_layer=2, n_head=2, d_inner=64))
    with caplog.at_level("WARNING", logger="rankalloc.models"):
        targets = find_targets(model, ModelConfig())
    assert {t.kind for t in targets} == {"ff.layer_1", "ff.layer_2"}
    assert "of the transformer blocks' weights are matrices outside Linear layers (transformer.layer.0.rel_attn" \
        in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="rankalloc.models"):
        find_targets(load_model(ModelConfig(num_layers=1)), ModelConfig())
    assert "outside Linear layers" not in caplog.text
