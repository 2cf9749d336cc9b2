"""Mixture-of-experts blocks whose experts are fused 3-D weights (transformers' Mixtral, gpt-oss, ...):
found as targets, searched with gates shared by every expert, and retrained through peft's
``target_parameters`` with exactly the map's ranks and parameters."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from rankalloc.adapters import GatedModel, remove_gated_lora
from rankalloc.config import DataConfig, ModelConfig, RetrainConfig, SearchConfig, SearchParams, TrainParams
from rankalloc.errors import ConfigError, RankMapError
from rankalloc.models import load_model
from rankalloc.rank_map import RankMap
from rankalloc.targets import find_targets, fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = dict(task="tweets", max_train_examples=96, max_eval_examples=16, max_length=16, batch_size=8)


@pytest.fixture(params=["mixtral", "gpt_oss"])
def moe(request) -> str:
    return request.getfixturevalue(f"tiny_{request.param}")


def _batch(model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    from rankalloc.data import prepare_task
    from rankalloc.models import load_tokenizer

    batch = prepare_task(DataConfig(**DATA), load_tokenizer(model_cfg), 0).eval.batch(slice(0, 8))
    batch.pop("labels")
    return batch


def test_fused_expert_weights_are_targets_with_every_experts_shape_and_cost(tiny_mixtral, tiny_gpt_oss):
    for path, transposed in ((tiny_mixtral, False), (tiny_gpt_oss, True)):
        cfg = ModelConfig(name=path)
        model = load_model(cfg, num_labels=3)
        fused = {t.kind: t for t in find_targets(model, cfg) if t.experts}
        assert set(fused) == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}  # routers are not targets
        up, down = fused["mlp.experts.gate_up_proj"], fused["mlp.experts.down_proj"]
        # each expert maps the hidden size (32) to 2 x intermediate (96) and back from 48, whichever way it is stored
        assert (up.experts, up.in_features, up.out_features) == (4, 32, 96)
        assert (down.in_features, down.out_features) == (48, 32)
        assert up.cost_per_rank == 4 * (32 + 96) and up.max_rank == 32
        stored = model.get_parameter(up.name).shape
        assert stored == ((4, 32, 96) if transposed else (4, 96, 32))
    only = find_targets(model, ModelConfig(name=tiny_gpt_oss, target_modules=["down_proj"]))
    assert [t.kind for t in only] == ["mlp.experts.down_proj"] * 2
    plain = [t for t in only]
    assert fingerprint(plain) != fingerprint([type(t)(t.name, t.in_features, t.out_features, t.layer, t.kind)
                                              for t in plain])  # the expert count is part of the shape


def test_the_searched_model_with_hard_gates_is_what_peft_builds_from_the_map(tmp_path, moe):
    """The retrain's peft adapter (target_parameters), started from the search, computes what the search's
    model computed with its hard gates, on either storage order; its parameters are the map's, exactly."""
    from rankalloc.retrain import build_adapter
    from rankalloc.search import run_search
    from rankalloc.warm_start import warm_start

    model_cfg, data = ModelConfig(name=moe), DataConfig(**DATA)
    run = tmp_path / "search"
    run_search(SearchConfig(budget="4000", device="cpu", out=str(run), max_steps=4, model=model_cfg, data=data,
                            search=SearchParams(r_max=4, warmup_steps=2, gap_batches=1)), "test")
    rank_map = RankMap.load(run / "rank_map.json")
    base = load_model(model_cfg, num_labels=3)
    targets = find_targets(base, model_cfg)
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    ranks = {t.name: (3 if t.experts else 1) for t in targets}  # every fused weight adapted, at a rank of its own
    ranks[targets[0].name] = 0
    rank_map = RankMap.from_ranks(targets, ranks, base_model=moe, budget=rank_map.total_params * 10,
                                  peft=rank_map.peft, search=rank_map.search)
    rank_map.model_fingerprint = fingerprint(targets)
    inner = copy.deepcopy(base)
    originals = dict(inner.named_parameters())
    gated = GatedModel(inner, targets, {t.name: 4 for t in targets}, scale=2.0)
    with torch.no_grad():
        for name, layer in gated.layers.items():
            layer.lora_A.copy_(state["adapters"][f"{name}.lora_A"])
            layer.lora_B.copy_(torch.randn_like(layer.lora_B) * 0.1)  # 4 search steps leave B near 0
            layer.gates.log_alpha.copy_(state["adapters"][f"{name}.log_alpha"])
        state["adapters"].update({f"{name}.lora_B": layer.lora_B.detach().clone()
                                  for name, layer in gated.layers.items()})
        gated.model.score.load_state_dict(state["heads"]["score"])
    torch.save(state, run / "checkpoint.pt")
    gated.set_hard_ranks(rank_map.ranks)
    gated.set_gate_mode("hard")

    cfg = RetrainConfig(rank_map=str(run / "rank_map.json"), init_from=str(run), device="cpu", model=model_cfg,
                        data=data, train=TrainParams())
    peft_model, _ = build_adapter(cfg, copy.deepcopy(base), targets, rank_map, rank_map.budget, None, 10)
    adapter_params = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert adapter_params == rank_map.total_params == sum(ranks[t.name] * t.cost_per_rank for t in targets)
    wrappers = [m for m in peft_model.modules() if hasattr(m, "parameter_name")]
    assert len(wrappers) == 4 and all(m.scaling["default"] == 2.0 for m in wrappers)  # alpha = scale * rank
    batch = _batch(model_cfg)
    fresh = peft_model(**batch).logits.detach()
    info = warm_start(peft_model, run, rank_map)
    assert info["modules"] == len(targets) - 1
    gated.eval()
    peft_model.eval()
    with torch.no_grad():
        expected, got = gated.model(**batch).logits, peft_model(**batch).logits
    assert torch.allclose(got, expected, atol=1e-5) and not torch.allclose(fresh, expected, atol=1e-3)

    plain = remove_gated_lora(gated)  # the original weight tensors are back in place, unchanged
    restored = dict(plain.named_parameters())
    assert restored.keys() == originals.keys() and all(restored[n] is p for n, p in originals.items())
    assert all(torch.equal(p, base.get_parameter(n)) for n, p in restored.items() if not n.startswith("score."))
    plain.score.load_state_dict(base.score.state_dict())
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, base.eval()(**batch).logits)


def test_search_retrain_and_baselines_fill_the_budget_exactly_on_fused_experts(tmp_path, tiny_mixtral, caplog):
    from rankalloc.retrain import run_retrain
    from rankalloc.search import run_search

    model_cfg, data = ModelConfig(name=tiny_mixtral), DataConfig(**DATA)
    run_search(SearchConfig(budget="6000", device="cpu", out=str(tmp_path / "s"), max_steps=4, model=model_cfg,
                            data=data, search=SearchParams(r_max=4, warmup_steps=2, gap_batches=1)), "test")
    rank_map = RankMap.load(tmp_path / "s" / "rank_map.json")
    assert any("experts" in m for m in rank_map.modules.values())
    assert 0.99 * 6000 <= rank_map.total_params <= 6000
    scores = json.loads((tmp_path / "s" / "scores.json").read_text())
    assert {m["name"] for m in scores["modules"] if m.get("experts") == 4} == {
        n for n, m in rank_map.modules.items() if m.get("experts")}

    def retrain(out: str, **kwargs):
        return run_retrain(RetrainConfig(out=str(tmp_path / out), device="cpu", max_steps=2, model=model_cfg,
                                         data=data, **kwargs), command="test")

    for out, kwargs in (("r", dict(rank_map=str(tmp_path / "s" / "rank_map.json"))),
                        ("u", dict(baseline="uniform", budget="6336")),
                        ("g", dict(baseline="gradient", budget="6000"))):
        retrain(out, **kwargs)
        result = json.loads((tmp_path / out / "metrics.json").read_text())
        assert result["checks"]["saved_adapter_params"] == result["adapter_params"]
        assert result["checks"]["reload_max_abs_diff"] < 1e-4
        assert 0.99 * result["budget"] <= result["adapter_params"] <= result["budget"], out
        config = json.loads((tmp_path / out / "adapter" / "adapter_config.json").read_text())
        fused = sorted(n for n, r in result["ranks"].items() if r and ".experts." in n)
        assert sorted(config["target_parameters"]) == fused and fused
        assert not set(config["target_modules"]) & set(fused)
    assert json.loads((tmp_path / "u" / "metrics.json").read_text())["adapter_params"] == 6336  # rank 3 on all 12

    with pytest.raises(ConfigError, match=r"--search.lora_dropout 0.1 with fused expert weights \(model.layers.0.mlp"):
        run_search(SearchConfig(budget="6000", device="cpu", out=str(tmp_path / "sd"), max_steps=4, model=model_cfg,
                                data=data, search=SearchParams(r_max=4, warmup_steps=2, lora_dropout=0.1)), "test")
    with pytest.raises(ConfigError, match="peft's AdaLoRA adapts Linear modules only, not fused expert weights"):
        retrain("a", baseline="adalora", budget="6000")
    with pytest.raises(RankMapError, match="lora_dropout 0.1 with fused expert weights"):
        retrain("d", rank_map=str(tmp_path / "s" / "rank_map.json"), train=TrainParams(lora_dropout=0.1))
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists() and not (tmp_path / "sd").exists()


def test_a_rank_map_records_and_checks_the_expert_count(tmp_path, tiny_mixtral):
    cfg = ModelConfig(name=tiny_mixtral)
    targets = find_targets(load_model(cfg, num_labels=3), cfg)
    rm = RankMap.from_ranks(targets, {t.name: 1 for t in targets}, base_model=tiny_mixtral, budget=10_000)
    data = rm.to_dict()
    up = "model.layers.0.mlp.experts.gate_up_proj"
    assert data["modules"][up] == {"rank": 1, "in_features": 32, "out_features": 96, "experts": 4}
    assert data["total_params"] == sum(t.cost_per_rank for t in targets)
    assert data["version"] == 2  # a reader of version 1 alone refuses it rather than miscount the experts
    plain = RankMap.from_ranks([t for t in targets if not t.experts], {t.name: 1 for t in targets}, base_model="m",
                               budget=10_000)
    assert plain.to_dict()["version"] == 1 and RankMap.from_dict(data).total_params == data["total_params"]
    data["modules"][up]["experts"] = 0
    with pytest.raises(RankMapError, match=f"module {up}: experts must be a positive integer"):
        RankMap.from_dict(data)
    data["modules"][up]["experts"] = 8
    data.pop("total_params")
    with pytest.raises(RankMapError, match=f"module {up} is 32x96 in each of 8 experts in the rank map but "
                                           "32x96 in each of 4 experts in the model"):
        RankMap.from_dict(data).check_against(load_model(cfg, num_labels=3))


@pytest.fixture(scope="module")
def tiny_deepseek(tmp_path_factory) -> str:
    """A random 2-block DeepSeek-V3: a dense first block (gate_proj, up_proj, down_proj), then routed experts
    (fused) beside a shared expert (Linear gate_proj, ...)."""
    from conftest import _save_random
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("deepseek_v3", vocab_size=30522, hidden_size=32, intermediate_size=48,
                               moe_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=4, max_position_embeddings=128, num_experts_per_tok=2,
                               pad_token_id=0, n_routed_experts=4, first_k_dense_replace=1, n_group=1, topk_group=1,
                               q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                               v_head_dim=8, n_shared_experts=1, num_labels=3)
    return _save_random(tmp_path_factory.mktemp("deepseek"), cfg)


def test_peft_does_not_rename_the_maps_mlp_targets_as_transformers_4_ones(tmp_path, tiny_deepseek, monkeypatch):
    """peft rewrites this model type's LoRA config as if written for transformers 4: every gate_proj/up_proj/
    down_proj target (the dense block's, the shared expert's) would become the fused experts of every block at
    twice the rank.  The retrain builds and reloads exactly the map's adapter, and its model card says how."""
    import re

    from peft import LoraConfig

    from rankalloc.rank_map import peft_would_rewrite
    from rankalloc.retrain import run_retrain

    model_cfg = ModelConfig(name=tiny_deepseek)
    run_retrain(RetrainConfig(baseline="uniform", budget="6000", out=str(tmp_path / "u"), device="cpu", max_steps=2,
                              model=model_cfg, data=DataConfig(**DATA)), command="test")
    result = json.loads((tmp_path / "u" / "metrics.json").read_text())
    assert result["ranks"]["model.layers.0.mlp.gate_proj"] == result["ranks"]["model.layers.1.mlp.experts.down_proj"]
    assert result["adapter_params"] == RankMap.load(tmp_path / "u" / "rank_map.json").total_params == 5904
    assert result["checks"]["reload_max_abs_diff"] < 1e-5
    rank_map = RankMap.load(tmp_path / "u" / "rank_map.json")
    assert peft_would_rewrite(LoraConfig(**rank_map.lora_config()), load_model(model_cfg, num_labels=3))
    card = (tmp_path / "u" / "adapter" / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    from peft.utils import transformers_weight_conversion as conversion

    monkeypatch.setattr(conversion, "convert_peft_config_for_transformers",  # restored after the card's own load
                        conversion.convert_peft_config_for_transformers)
    namespace: dict = {}
    exec(code.replace("path/to/this/folder", str(tmp_path / "u" / "adapter")), namespace)  # the card's own load
    rank_map.check_built(namespace["model"])


def test_routers_named_by_their_module_or_counted_in_a_sub_config_are_not_targets():
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    hunyuan = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(
        "hunyuan_v1_moe", vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
        pad_token_id=0, num_labels=3))
    kinds = {t.kind for t in find_targets(hunyuan, ModelConfig(name="x"))}
    assert "mlp.gate.wg" not in kinds and {"mlp.experts.gate_up_proj", "mlp.shared_mlp.up_proj"} <= kinds
    dbrx = AutoModelForCausalLM.from_config(AutoConfig.for_model(  # its expert count lives in ffn_config
        "dbrx", vocab_size=512, d_model=32, n_heads=4, n_layers=1, max_seq_len=128,
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0), ffn_config=dict(ffn_hidden_size=48, moe_num_experts=4,
                                                                             moe_top_k=2)))
    assert {t.kind for t in find_targets(dbrx, ModelConfig(name="x"))} == {"norm_attn_norm.attn.Wqkv",
                                                                           "norm_attn_norm.attn.out_proj"}
