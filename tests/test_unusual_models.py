"""Architectures with a twist: modules peft refuses (Mamba), language models that are not causal (XLNet),
configs that refuse a depth cut (Funnel), decoders without a classification head, budgets past full rank."""
from __future__ import annotations

import pytest
import torch

from rankalloc.budget import check_budget
from rankalloc.config import ModelConfig
from rankalloc.errors import BudgetError, ModelError
from rankalloc.families import CausalLM, Classification
from rankalloc.models import check_causal, load_model
from rankalloc.targets import find_targets


def _saved(folder, config) -> str:
    from transformers import AutoModel

    AutoModel.from_config(config).save_pretrained(folder)
    return str(folder)


def test_modules_peft_refuses_on_mamba_are_not_targets_and_the_rest_build_in_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, state_size=4, expand=2))
    names = [t.name for t in find_targets(model, ModelConfig())]
    assert names and not any(n.endswith(("out_proj", "conv1d")) for n in names)
    assert any(n.endswith("in_proj") for n in names)
    peft_model = get_peft_model(model, LoraConfig(r=1, target_modules=names))
    assert sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n) == sum(
        t.cost_per_rank for t in find_targets(MambaForCausalLM(model.config), ModelConfig()))
    with pytest.raises(ModelError, match=r"no adapter targets match --model.target_modules out_proj.*refused by "
                                         r"peft's LoRA on this model type"):
        find_targets(MambaForCausalLM(model.config), ModelConfig(target_modules=["out_proj"]))


def test_a_language_model_that_sees_later_tokens_is_refused_for_answers(tiny_gpt2):
    from transformers import XLNetConfig, XLNetLMHeadModel

    torch.manual_seed(0)
    xlnet = XLNetLMHeadModel(XLNetConfig(vocab_size=100, d_model=32, n_layer=2, n_head=4, d_inner=64))
    with pytest.raises(ModelError, match=r"model type 'xlnet' is not causal"):
        check_causal(xlnet, "xlnet")
    assert xlnet.training  # left in the mode it was in
    gpt2 = load_model(ModelConfig(name=tiny_gpt2), family=CausalLM())  # a decoder passes the same probe
    check_causal(gpt2, tiny_gpt2)


def test_a_config_that_refuses_the_depth_cut_is_one_line(tmp_path):
    from transformers import FunnelConfig

    FunnelConfig(vocab_size=64, block_sizes=[1, 1], d_model=16, n_head=2, d_head=8, d_inner=32).save_pretrained(
        tmp_path / "funnel")  # the config alone: it refuses the cut before any weight is read
    folder = str(tmp_path / "funnel")
    with pytest.raises(ModelError, match=r"its config refuses a setting .*; drop --model.num_layers"):
        load_model(ModelConfig(name=folder, num_layers=1))


def test_a_decoder_without_a_classification_head_is_pointed_to_the_language_families(tmp_path):
    from transformers import CodeGenConfig

    folder = _saved(tmp_path / "codegen", CodeGenConfig(vocab_size=64, n_embd=16, n_layer=1, n_head=2,
                                                        rotary_dim=4, n_positions=64))
    with pytest.raises(ModelError, match=r"cannot load its weights as .*--data.family causal_lm or multiple_choice"):
        load_model(ModelConfig(name=folder), family=Classification())


def test_the_allowed_budget_range_is_what_any_cap_reaches():
    costs, caps, full = [100, 200], [4, 4], [32, 32]  # at these caps up to 1,200; at full rank 9,600
    with pytest.raises(BudgetError, match=r"allowed: 100 to 9,600$"):
        check_budget(50, costs, caps, full_ranks=full)
    with pytest.raises(BudgetError, match=r"exceeds every module at its largest rank \(1,200\); allowed: 100 to "
                                          r"1,200 \(raise --search.r_max"):
        check_budget(5000, costs, caps, full_ranks=full)
    with pytest.raises(BudgetError, match=r"exceeds every module at full rank \(9,600\); allowed: 100 to 9,600$"):
        check_budget(10_000, costs, caps, full_ranks=full)
    check_budget(1200, costs, caps, full_ranks=full)


def test_targets_the_model_never_calls_are_warned_about(caplog, minilm_1layer):
    from transformers import MambaConfig, MambaForCausalLM

    from rankalloc.adapters import GatedModel

    torch.manual_seed(0)
    mamba = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, state_size=4, expand=2))
    targets = find_targets(mamba, ModelConfig())
    gated = GatedModel(mamba, targets, {t.name: 2 for t in targets}, 2.0, family=CausalLM())
    ids = torch.randint(0, 64, (2, 8))
    gated(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    with caplog.at_level("WARNING"):
        gated.warn_idle_targets()
    assert "2 of 6 adapter targets never ran in a forward pass" in caplog.text and "mixer.dt_proj" in caplog.text
    caplog.clear()
    cfg, model = minilm_1layer
    import copy

    bert = copy.deepcopy(model)
    targets = find_targets(bert, cfg)
    gated = GatedModel(bert, targets, {t.name: 2 for t in targets}, 2.0)
    gated(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.zeros(2, dtype=torch.long))
    with caplog.at_level("WARNING"):
        gated.warn_idle_targets()
    assert "never ran" not in caplog.text
