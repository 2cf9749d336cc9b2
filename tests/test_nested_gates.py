"""Nested rank gates (``--search.gates nested``): one categorical over each layer's rank, nested masks."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import crash_then_resume
from rankalloc.adapters import GatedModel
from rankalloc.config import DataConfig, ModelConfig, SearchConfig, SearchParams
from rankalloc.errors import ConfigError
from rankalloc.gates import NestedRankGates
from rankalloc.targets import find_targets
from rankalloc.rank_map import RankMap
from rankalloc.search import run_search


@pytest.mark.parametrize("init_keep", [0.1, 0.5, 0.9])
def test_initial_expected_rank_is_gate_init_and_keep_probabilities_never_increase(init_keep):
    gates = NestedRankGates(16, init_keep=init_keep)
    keep = gates.keep_prob().detach()
    assert float(keep.detach().sum()) / 16 == pytest.approx(init_keep, abs=1e-4)
    assert torch.all(keep[1:] <= keep[:-1] + 1e-7)
    probs = gates.rank_probs().detach()  # P(rank > k) is the tail sum of the rank probabilities
    assert float(keep[3]) == pytest.approx(float(probs[4:].sum()), abs=1e-6)


def test_samples_are_nested_masks_drawn_with_the_rank_probabilities():
    torch.manual_seed(0)
    gates = NestedRankGates(5)
    with torch.no_grad():
        gates.log_alpha.copy_(torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5, -0.5]))
    masks = torch.stack([gates().detach() for _ in range(4000)])
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(masks[:, 1:] <= masks[:, :-1])  # nested: component k kept only if every j < k is
    freq = torch.bincount(masks.sum(1).round().long(), minlength=6).float() / len(masks)
    assert torch.allclose(freq, gates.rank_probs().detach(), atol=0.03)


def test_a_sampled_mask_passes_gradient_to_every_rank_logit():
    torch.manual_seed(1)
    gates = NestedRankGates(6, temperature=1.0)
    (gates() * torch.arange(1.0, 7.0)).sum().backward()
    assert gates.log_alpha.grad is not None and torch.count_nonzero(gates.log_alpha.grad) >= 5


def test_hard_rank_keeps_the_first_components():
    gates = NestedRankGates(6)
    gates.set_hard_rank(4)
    gates.mode = "hard"
    assert gates().tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_projection_puts_the_expected_cost_on_target_and_keeps_each_layers_order(minilm_1layer):
    cfg, model = minilm_1layer
    targets = find_targets(copy.deepcopy(model), cfg)
    gated = GatedModel(copy.deepcopy(model), targets, {t.name: 8 for t in targets}, scale=2.0, gates="nested")
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in gated.layers.values():
            layer.gates.log_alpha.normal_(0.0, 2.0)
    for target in (0.2 * gated.max_cost(), 0.7 * gated.max_cost()):
        gated.project_cost_(target)
        assert float(gated.expected_cost().detach()) == pytest.approx(target, rel=1e-3)
        for layer in gated.layers.values():
            keep = layer.gates.keep_prob()
            assert torch.all(keep[1:] <= keep[:-1] + 1e-7)


def test_clamp_floors_log_probabilities_without_changing_a_moderate_distribution():
    gates = NestedRankGates(4)
    with torch.no_grad():
        gates.log_alpha.copy_(torch.tensor([100.0, 101.0, 99.0, 100.5, -400.0]))
    before = gates.rank_probs().detach().clone()
    gates.clamp_(bound=12.0)
    assert float(torch.logsumexp(gates.log_alpha.detach(), 0)) == pytest.approx(0.0, abs=1e-5)  # normalised
    assert float(gates.log_alpha.detach().min()) == pytest.approx(-12.0)  # the dead rank can come back
    assert torch.allclose(gates.rank_probs()[:4], before[:4], atol=1e-4)


def _nested_config(tmp_path, name: str, **top) -> SearchConfig:
    return SearchConfig(
        budget="20k", seed=0, device="cpu", out=str(tmp_path / name), model=ModelConfig(num_layers=1),
        data=DataConfig(task="tweets", max_length=24, max_train_examples=160, max_eval_examples=32, batch_size=16),
        search=SearchParams(steps=8, warmup_steps=2, gap_batches=2, r_max=8, gates="nested", project_ramp=True,
                            budget_warmup=0.5, checkpoint_every=4), **top)


def test_search_with_nested_gates_writes_a_rank_map_inside_the_budget(tmp_path, one_thread):
    result = run_search(_nested_config(tmp_path, "run"), command="test")
    rm = RankMap.load(result.out / "rank_map.json")
    assert 0.99 * 20_000 <= rm.total_params <= 20_000
    gated_rows = [row for row in result.history if row["val_loss"] is not None]
    assert len(gated_rows) == 6 and all(abs(row["cost_ratio"] - row["target_ratio"]) < 1e-2 for row in gated_rows)
    assert "nested" in (result.out / "scores.json").read_text()  # the choice travels with the scores
    assert "nested masks" in (result.out / "summary.json").read_text()
    assert rm.search["gates"] == "nested"

    resumed = crash_then_resume(lambda **top: _nested_config(tmp_path, "crashed", **top), crash_at_step=6)
    assert resumed.history == result.history
    assert resumed.rank_map.ranks == rm.ranks
    first, second = (torch.load(r.out / "checkpoint.pt", weights_only=False)["adapters"] for r in (result, resumed))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_unknown_gate_kind_is_refused_in_one_line():
    with pytest.raises(ConfigError) as err:
        SearchParams(gates="darts").validate()
    assert "\n" not in str(err.value) and "hard_concrete" in str(err.value) and "nested" in str(err.value)
