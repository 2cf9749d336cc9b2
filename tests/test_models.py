"""Target discovery for any architecture; model loading errors."""
from __future__ import annotations

import pytest

from rankalloc.config import ModelConfig
from rankalloc.errors import ModelError
from rankalloc.models import (find_targets, fingerprint, head_modules, load_model, resolve_model_path,
                              skeleton_targets)


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


@pytest.mark.parametrize("model", ["minilm", "gpt2", "llama"])
def test_targets_from_the_config_alone_equal_those_of_the_loaded_model(model, tiny_gpt2, tiny_llama):
    cfg = {"minilm": ModelConfig(num_layers=2), "gpt2": ModelConfig(name=tiny_gpt2),
           "llama": ModelConfig(name=tiny_llama)}[model]
    skeleton = skeleton_targets(cfg)  # built on the meta device: no weights read
    assert skeleton == find_targets(load_model(cfg, num_labels=3), cfg)
    assert len(skeleton) == {"minilm": 12, "gpt2": 8, "llama": 14}[model]


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
