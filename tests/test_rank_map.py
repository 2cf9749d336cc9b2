"""Rank map JSON: round trip, validation against a model, and the peft config it exports."""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from rankalloc.errors import RankMapError
from rankalloc.targets import find_targets
from rankalloc.rank_map import RankMap


@pytest.fixture()
def targets(minilm_1layer):
    cfg, model = minilm_1layer
    return find_targets(model, cfg)


def _ranks(targets):
    # varied ranks, one module left out (rank 0)
    return {t.name: r for t, r in zip(targets, [3, 0, 5, 1, 2, 7])}


def test_round_trip(tmp_path, targets):
    rm = RankMap.from_ranks(targets, _ranks(targets), base_model="minilm-l6", budget=30000,
                            search={"seed": 0})
    rm.save(tmp_path / "rank_map.json")
    data = json.loads((tmp_path / "rank_map.json").read_text())
    assert data["format"] == "rankalloc.rank_map" and data["version"] == 1
    assert data["total_params"] == sum(r * t.cost_per_rank for t, r in zip(targets, _ranks(targets).values()))
    back = RankMap.load(tmp_path / "rank_map.json")
    assert back.ranks == rm.ranks and back.model_fingerprint == rm.model_fingerprint
    back.check_against(targets)


def test_peft_builds_exactly_the_mapped_ranks(minilm_1layer, targets):
    from peft import LoraConfig, get_peft_model

    _, model = minilm_1layer
    ranks = _ranks(targets)
    rm = RankMap.from_ranks(targets, ranks, base_model="minilm-l6", budget=30000)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**rm.lora_config(2.0, modules_to_save=["classifier"])))
    built = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            built[name.removeprefix("base_model.model.")] = module.lora_A["default"].weight.shape[0]
            assert module.scaling["default"] == pytest.approx(2.0)  # alpha = 2 r for every rank
    assert built == {n: r for n, r in ranks.items() if r > 0}
    lora_params = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert lora_params == rm.total_params


def test_check_built_catches_a_peft_that_ignores_the_rank_pattern(minilm_1layer, targets):
    """Older peft could not match the anchored keys and gave every module the common rank, silently."""
    from peft import LoraConfig, get_peft_model

    _, model = minilm_1layer
    rm = RankMap.from_ranks(targets, _ranks(targets), base_model="minilm-l6", budget=30000)
    cfg = rm.lora_config(2.0, modules_to_save=["classifier"])
    rm.check_built(get_peft_model(copy.deepcopy(model), LoraConfig(**cfg)))  # this peft matches them
    ignored = dict(cfg, rank_pattern={}, alpha_pattern={})  # what an unmatched pattern amounts to
    with pytest.raises(RankMapError, match=r"built rank \d+ for .*the rank map says \d+: peft did not apply"):
        rm.check_built(get_peft_model(copy.deepcopy(model), LoraConfig(**ignored)))
    ranks = _ranks(targets)
    kept = [t.name for t in targets if ranks[t.name] > 0]
    partial = RankMap.from_ranks([t for t in targets if t.name == kept[0]], ranks, base_model="minilm-l6",
                                 budget=30000)
    extra = re.escape(sorted(kept[1:])[0])  # a module peft adapted beyond the map
    with pytest.raises(RankMapError, match=f"built an adapter on {extra} .*which the rank map does not name"):
        partial.check_built(get_peft_model(copy.deepcopy(model), LoraConfig(**cfg)))


def test_module_names_are_literal_in_the_rank_pattern():
    """peft reads rank_pattern keys as regexes: unescaped, `attn.out` would also give its rank to `attn_out`."""
    from peft import LoraConfig, get_peft_model

    from rankalloc.targets import Target

    block = torch.nn.ModuleDict({"attn": torch.nn.ModuleDict({"out": torch.nn.Linear(8, 8)}),
                                 "attn_out": torch.nn.Linear(8, 8)})
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([block])
    targets = [Target("layers.0.attn.out", 8, 8, 0, "attn.out"), Target("layers.0.attn_out", 8, 8, 0, "attn_out")]
    rm = RankMap.from_ranks(targets, {"layers.0.attn.out": 2, "layers.0.attn_out": 5}, base_model="m", budget=112)
    rm.check_built(get_peft_model(model, LoraConfig(**rm.lora_config(2.0, task_type=None))))


def test_adapter_config_file_loads_into_peft(tmp_path, targets):
    from peft import LoraConfig

    rm = RankMap.from_ranks(targets, _ranks(targets), base_model="minilm-l6", budget=30000)
    cfg = rm.write_adapter_config(tmp_path / "adapter_config.json", 2.0, modules_to_save=["classifier"])
    on_disk = json.loads((tmp_path / "adapter_config.json").read_text())
    assert on_disk["rank_pattern"] == {f"^{re.escape(n)}$": r for n, r in _ranks(targets).items() if r > 0}
    assert on_disk["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"  # not the alias
    assert all(k.startswith("^") and k.endswith("$") for k in on_disk["rank_pattern"])
    assert targets[1].name not in on_disk["target_modules"]  # rank 0: no adapter
    assert cfg["peft_type"] == "LORA"
    LoraConfig.from_pretrained(tmp_path)


def _write(tmp_path, data):
    path = tmp_path / "rm.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _valid(targets):
    return RankMap.from_ranks(targets, _ranks(targets), base_model="m", budget=30000).to_dict()


@pytest.mark.parametrize("mutate, fragment", [
    (lambda d: "{not json", "not valid JSON"),
    (lambda d: {**d, "format": "other"}, "format must be"),
    (lambda d: {**d, "version": 3}, "version 3 is not supported"),
    (lambda d: {k: v for k, v in d.items() if k != "modules"}, "missing field 'modules'"),
    (lambda d: {**d, "modules": {**d["modules"], next(iter(d["modules"])): {"rank": -1, "in_features": 384,
                                                                             "out_features": 384}}},
     "is negative"),
    (lambda d: {**d, "modules": {**d["modules"], next(iter(d["modules"])): {"rank": 385, "in_features": 384,
                                                                             "out_features": 384}}},
     "exceeds min\\(d_in, d_out\\) = 384"),
    (lambda d: {**d, "modules": {**d["modules"], next(iter(d["modules"])): {"rank": "3", "in_features": 384,
                                                                             "out_features": 384}}},
     "rank must be an integer"),
    (lambda d: {**d, "total_params": 1}, "disagrees with the ranks"),
    (lambda d: [1, 2], "format must be"),
    (lambda d: {**d, "budget": True}, "budget must be a positive integer, got True"),
    (lambda d: {**d, "search": "abc"}, "'search' must be a mapping"),
    (lambda d: {**d, "base_model": 3}, "base_model must be a model name or folder"),
    (lambda d: {**d, "peft": [1]}, "'peft' must be a mapping"),
    (lambda d: {**d, "peft": {"scale": "two"}}, "peft.scale must be a positive finite number, got 'two'"),
    (lambda d: {**d, "peft": {"scale": float("inf")}}, "peft.scale must be a positive finite number, got inf"),
    (lambda d: {**d, "peft": {"task_type": "NOPE"}}, "peft.task_type must be one of SEQ_CLS, .*CAUSAL_LM.* or null"),
    (lambda d: {**d, "peft": {"modules_to_save": "classifier"}}, "peft.modules_to_save must be a list"),
    (lambda d: {**d, "peft": {"fan_in_fan_out": "yes"}}, "peft.fan_in_fan_out must be true or false"),
])
def test_malformed_files_are_refused(tmp_path, targets, mutate, fragment):
    with pytest.raises(RankMapError, match=fragment):
        RankMap.load(_write(tmp_path, mutate(_valid(targets))))


def test_missing_file(tmp_path):
    with pytest.raises(RankMapError, match="no such file"):
        RankMap.load(tmp_path / "nope.json")


def test_mismatch_with_model_names_first_bad_module(targets, minilm_1layer):
    _, model = minilm_1layer
    data = _valid(targets)
    data["modules"]["bert.encoder.layer.7.attention.self.query"] = {"rank": 1, "in_features": 384, "out_features": 384}
    data.pop("total_params")
    rm = RankMap.from_dict(data)
    with pytest.raises(RankMapError, match="layer.7.attention.self.query is not a Linear-like module"):
        rm.check_against(model)
    data = _valid(targets)
    data["modules"][targets[0].name]["in_features"] = 512
    data.pop("total_params")
    with pytest.raises(RankMapError, match="512x384 in the rank map but 384x384 in the model"):
        RankMap.from_dict(data).check_against(targets)
