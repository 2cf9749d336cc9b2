"""Gated LoRA, the expected cost, and the Lagrange multiplier."""
from __future__ import annotations

import copy

import pytest
import torch

from rankalloc.adapters import GatedModel, remove_gated_lora
from rankalloc.config import ModelConfig
from rankalloc.gates import RankGates
from rankalloc.lagrangian import Lagrangian
from rankalloc.targets import find_targets


def _batch(n=4, length=10):
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(1000, 2000, (n, length), generator=g),
            "attention_mask": torch.ones(n, length, dtype=torch.long), "labels": torch.tensor([0, 1, 2, 0][:n])}


@pytest.fixture()
def gated_minilm(minilm_1layer):
    cfg, model = minilm_1layer
    model = copy.deepcopy(model)
    targets = find_targets(model, cfg)
    return GatedModel(model, targets, {t.name: 4 for t in targets}, scale=2.0)


def test_starts_as_the_base_model_and_removes_cleanly(minilm_1layer, gated_minilm):
    _, base = minilm_1layer
    batch = _batch()
    base.eval(), gated_minilm.eval()
    with torch.no_grad():
        expected = base(**batch).logits
        assert torch.allclose(gated_minilm(**batch).logits, expected, atol=1e-6)  # B = 0 at start
        plain = remove_gated_lora(gated_minilm)
        assert torch.allclose(plain(**batch).logits, expected, atol=1e-6)
    assert not any("lora" in n for n, _ in plain.named_parameters())


def test_forward_formula_with_hard_mask(gated_minilm):
    layer = next(iter(gated_minilm.layers.values()))
    torch.nn.init.normal_(layer.lora_B)
    layer.gates.hard_mask.copy_(torch.tensor([1.0, 0.0, 1.0, 0.0]))
    layer.gates.mode = "hard"
    x = torch.randn(3, layer.in_features)
    g = torch.diag(layer.gates.hard_mask)
    expected = layer.base_layer(x) + 2.0 * x @ layer.lora_A.t() @ g @ layer.lora_B.t()
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_expected_cost_equals_parameters_of_adapters_built(gated_minilm):
    # all gates fully open: expected cost = every LoRA parameter that exists
    for layer in gated_minilm.layers.values():
        layer.gates.log_alpha.data.fill_(50.0)
    n_params = sum(p.numel() for p in gated_minilm.adapter_parameters())
    assert float(gated_minilm.expected_cost().detach()) == pytest.approx(n_params, rel=1e-6)
    assert gated_minilm.max_cost() == n_params
    # and a known keep-probability p gives p times that
    for layer in gated_minilm.layers.values():
        layer.gates.log_alpha.data.copy_(torch.full_like(layer.gates.log_alpha, layer.gates._log_alpha_for(0.25)))
    assert float(gated_minilm.expected_cost()) == pytest.approx(0.25 * n_params, rel=1e-5)


def test_expected_cost_is_differentiable_in_the_gates(gated_minilm):
    cost = gated_minilm.expected_cost()
    cost.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gated_minilm.gate_parameters())
    assert all(p.grad is None for p in gated_minilm.adapter_parameters())


def test_gate_distribution():
    torch.manual_seed(0)
    gates = RankGates(20000, init_keep=0.7, temperature=0.5)
    samples = gates.sample()
    assert samples.min() >= 0 and samples.max() <= 1
    assert (samples > 0).float().mean().item() == pytest.approx(0.7, abs=0.02)  # closed form matches
    assert gates.keep_prob()[0].item() == pytest.approx(0.7, abs=1e-6)
    assert ((samples == 0) | (samples == 1)).float().mean() > 0.3  # hard-concrete: many exact 0/1


def test_hard_rank_keeps_the_most_probable_components():
    gates = RankGates(5)
    gates.log_alpha.data = torch.tensor([0.0, 3.0, -2.0, 1.0, 2.0])
    gates.set_hard_rank(2)
    assert gates.hard_mask.tolist() == [0.0, 1.0, 0.0, 0.0, 1.0]
    gates.set_hard_rank(0)
    assert gates.hard_mask.sum() == 0


def test_lambda_grows_above_budget_and_decays_to_zero_below():
    lag = Lagrangian(budget=1000, lr=0.5)
    history = [lag.dual_step(1500, 1000) for _ in range(10)]
    assert all(b > a for a, b in zip(history, history[1:]))
    assert history[-1] == pytest.approx(2.5)
    down = [lag.dual_step(500, 1000) for _ in range(10)]
    assert all(b <= a for a, b in zip(down, down[1:]))
    assert down[-1] == 0.0
    assert Lagrangian(1000, lr=1e6, lam_max=100).dual_step(1e9, 1000) == 100  # bounded


def test_lagrangian_term_pushes_cost_towards_target():
    lag = Lagrangian(budget=100, lr=0.1, penalty=1.0, lam=0.5)
    cost = torch.tensor(150.0, requires_grad=True)
    lag.term(cost, 100).backward()
    assert cost.grad > 0  # above target: gradient descent lowers the cost
    cost = torch.tensor(50.0, requires_grad=True)
    Lagrangian(budget=100, lr=0.1, penalty=1.0, lam=0.0).term(cost, 100).backward()
    assert cost.grad < 0  # below target with lam = 0: the penalty raises it


def test_cost_projection_hits_the_target_and_keeps_the_order(gated_minilm):
    torch.manual_seed(1)
    for layer in gated_minilm.layers.values():
        layer.gates.log_alpha.data.normal_(0.0, 2.0)
    order = {n: torch.argsort(l.gates.log_alpha.detach()) for n, l in gated_minilm.layers.items()}
    target = 0.3 * gated_minilm.max_cost()
    gated_minilm.project_cost_(target)
    assert float(gated_minilm.expected_cost().detach()) == pytest.approx(target, rel=1e-4)
    for name, layer in gated_minilm.layers.items():
        assert torch.equal(torch.argsort(layer.gates.log_alpha.detach()), order[name])


def test_gated_layers_expose_the_base_weight_for_model_code_that_reads_it():
    """T5's feed-forward reads ``wo.weight.dtype``; a search on T5 must run through the gated layers."""
    from transformers import T5Config, T5ForSequenceClassification

    torch.manual_seed(0)
    model = T5ForSequenceClassification(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                                 num_heads=2, num_labels=3, decoder_start_token_id=0,
                                                 eos_token_id=1, pad_token_id=0)).eval()
    ids = torch.randint(1, 64, (2, 7))
    ids[:, -1] = 1  # T5's classifier reads the hidden state at the end-of-sequence token
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 2])}
    before = model(**batch).logits
    targets = find_targets(model, ModelConfig())
    gated = GatedModel(model, targets, {t.name: 2 for t in targets}, scale=2.0)
    layer = gated.layers[targets[0].name]
    assert layer.weight is layer.base_layer.weight and layer.bias is layer.base_layer.bias
    out = gated(**batch)
    torch.testing.assert_close(out.logits, before)  # B = 0 at the start: the base model's output
    out.loss.backward()
    assert layer.lora_A.grad is not None or layer.lora_B.grad is not None


def test_a_projection_far_down_keeps_the_components_apart():
    """Shifting logits -8..7 by about -10 to meet a small target must keep four distinct, ordered scores;
    clipping at -12 tied them, and the knapsack then fell back to component order."""
    import torch
    from torch import nn

    from rankalloc.adapters import GatedModel
    from rankalloc.targets import Target

    gated = GatedModel(nn.Sequential(nn.Linear(16, 16)), [Target("0", 16, 16, 0, "a")], {"0": 8}, 1.0)
    with torch.no_grad():
        gated.layers["0"].gates.log_alpha.copy_(torch.tensor([-8., -7, -6, -5, 4, 5, 6, 7]))
    target = 0.02 * gated.max_cost()
    gated.project_cost_(target)
    logits = gated.layers["0"].gates.log_alpha.detach()
    assert torch.all(logits[1:] > logits[:-1]) and float(logits[0]) < -12
    assert float(gated.expected_cost()) == pytest.approx(target, rel=1e-6)
