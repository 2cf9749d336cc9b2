"""Shared fixtures: tiny real and random models, saved as ordinary transformers folders."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def _save_random(tmp: Path, config) -> str:
    import torch
    from transformers import AutoModelForSequenceClassification

    from rankalloc.config import ModelConfig
    from rankalloc.models import load_tokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(tmp)
    load_tokenizer(ModelConfig()).save_pretrained(tmp)  # any tokenizer whose ids fit the vocab
    return str(tmp)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on 2 shared cores run far faster on one thread than on two contending ones."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    """A random 2-block GPT-2 (its projections are transformers' Conv1D)."""
    from transformers import GPT2Config

    cfg = GPT2Config(vocab_size=30522, n_positions=128, n_embd=32, n_layer=2, n_head=2, num_labels=3,
                     pad_token_id=0)
    return _save_random(tmp_path_factory.mktemp("gpt2"), cfg)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A random 2-block Llama with grouped-query attention and a gated MLP."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      num_labels=3, pad_token_id=0, tie_word_embeddings=True)  # so a causal-LM load finds its head
    return _save_random(tmp_path_factory.mktemp("llama"), cfg)


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory) -> str:
    """A random 2-block Mixtral whose 4 experts are fused 3-D weights (experts x out x in)."""
    from transformers import MixtralConfig

    cfg = MixtralConfig(vocab_size=30522, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=128, num_labels=3, pad_token_id=0)
    return _save_random(tmp_path_factory.mktemp("mixtral"), cfg)


@pytest.fixture(scope="session")
def tiny_gpt_oss(tmp_path_factory) -> str:
    """A random 2-block gpt-oss: fused experts stored transposed (experts x in x out), with biases."""
    from transformers import GptOssConfig

    cfg = GptOssConfig(vocab_size=30522, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                       num_experts_per_tok=2, max_position_embeddings=128, num_labels=3, pad_token_id=0,
                       layer_types=["full_attention"] * 2)
    return _save_random(tmp_path_factory.mktemp("gpt_oss"), cfg)


@pytest.fixture(scope="session")
def minilm_1layer():
    """The real pretrained MiniLM-L6, sliced to its first block, with a 3-class head."""
    from rankalloc.config import ModelConfig
    from rankalloc.models import load_model

    return ModelConfig(num_layers=1), load_model(ModelConfig(num_layers=1), num_labels=3)


def crash_then_resume(make_config, crash_at_step: int):
    """Run a search that crashes right after weight step ``crash_at_step`` (the last checkpoint lies
    before it), then resume it from its folder; returns the resumed result."""
    from rankalloc.search import run_search

    class Crash(Exception):
        pass

    def crash(row):
        if row["step"] == crash_at_step:
            raise Crash

    with pytest.raises(Crash):
        run_search(make_config(), command="test", on_step=crash)
    return run_search(make_config(resume=True), command="test")
