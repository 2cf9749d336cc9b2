"""Gradient-sensitivity scores: the right spectra, a model left untouched, any architecture, the budget."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rankalloc.config import DataConfig, ModelConfig
from rankalloc.errors import BudgetError
from rankalloc.families import Classification
from rankalloc.models import load_model, load_tokenizer
from rankalloc.targets import Target, find_targets

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def train_split():
    from rankalloc.data import prepare_task

    cfg = DataConfig(max_train_examples=48, max_eval_examples=16, batch_size=8, max_length=32)
    return prepare_task(cfg, load_tokenizer(ModelConfig()), 0).train


def test_spectra_are_the_singular_values_of_the_mean_loss_gradient(minilm_1layer, train_split):
    from rankalloc.data import EpochSampler
    from rankalloc.sensitivity import _SAMPLER_OFFSET, gradient_spectra, weight_of

    cfg, model = minilm_1layer
    targets = find_targets(model, cfg)
    before = {n: q.detach().clone() for n, q in model.named_parameters()}
    flags = {n: q.requires_grad for n, q in model.named_parameters()}
    training = model.training
    rng = torch.get_rng_state()
    spectra = gradient_spectra(model, targets, train_split, Classification(), 2, 8, 5, CPU)

    # by hand: the mean over the same two batches of d loss / d W, in eval mode
    sampler = EpochSampler(len(train_split), 8, 5 + _SAMPLER_OFFSET)
    model.eval()
    weights = [weight_of(model, t) for t in targets]
    total = [torch.zeros_like(w) for w in weights]
    for w in weights:
        w.requires_grad_(True)
    for _ in range(2):
        batch = train_split.batch(sampler.next())
        loss = Classification().forward(model, batch).loss
        for acc, g in zip(total, torch.autograd.grad(loss, weights)):
            acc += g
    for n, q in model.named_parameters():
        q.requires_grad_(flags[n])
    model.train(training)
    for t, s, g in zip(targets, spectra, total):
        assert s.shape == (t.max_rank,) and np.all(np.diff(s) <= 1e-6) and s[0] > 0
        np.testing.assert_allclose(s, torch.linalg.svdvals(g / 2).numpy(), rtol=1e-4, atol=1e-7)

    # the model is left as it was: weights, requires_grad flags, no gradients, training mode, torch RNG
    assert all(torch.equal(q, before[n]) for n, q in model.named_parameters())
    assert {n: q.requires_grad for n, q in model.named_parameters()} == flags
    assert all(q.grad is None for q in model.parameters()) and model.training == training
    assert torch.equal(torch.get_rng_state(), rng)


def test_spectra_work_on_gpt2_conv1d(tiny_gpt2, train_split):
    from rankalloc.sensitivity import gradient_spectra

    cfg = ModelConfig(name=tiny_gpt2)
    model = load_model(cfg, num_labels=3)
    targets = find_targets(model, cfg)
    spectra = gradient_spectra(model, targets, train_split, Classification(), 1, 4, 0, CPU)
    assert [len(s) for s in spectra] == [t.max_rank for t in targets]
    assert all(np.isfinite(s).all() for s in spectra)


def test_scores_scale_by_module_size_and_stop_at_r_max():
    from rankalloc.sensitivity import component_scores

    targets = [Target("a", 4, 9, 0, "a"), Target("b", 16, 16, 0, "b")]
    spectra = [np.array([3.0, 2.0, 1.0, 0.5]), np.arange(16, 0, -1, dtype=float)]
    scores = component_scores(targets, spectra, {"a": 2, "b": 3})
    assert scores == [[18.0, 12.0], [256.0, 240.0, 224.0]]  # sqrt(4*9) = 6, sqrt(16*16) = 16


def test_gradient_ranks_follow_the_gradient_and_fill_the_budget():
    from rankalloc.baselines import gradient_ranks

    targets = [Target(f"m{i}", 64, 64, i, "dense") for i in range(4)]
    flat = np.full(64, 1e-3)
    strong = np.linspace(1.0, 0.5, 64)
    ranks = gradient_ranks(targets, [flat, strong, flat, flat], 128 * 8)
    assert ranks["m1"] == 8 and sum(ranks.values()) == 8  # every rank goes where the gradient is
    budget = 128 * 13
    ranks = gradient_ranks(targets, [strong, strong * 0.9, flat, flat], budget)
    assert 0.99 * budget <= 128 * sum(ranks.values()) <= budget
    assert ranks["m0"] >= ranks["m1"] >= ranks["m2"]
    with pytest.raises(BudgetError, match="allowed"):
        gradient_ranks(targets, [strong] * 4, 10**9)
