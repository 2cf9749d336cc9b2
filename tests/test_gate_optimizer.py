"""Gate optimisers: shared_adam keeps the relative sizes of gate gradients, Adam does not."""
from __future__ import annotations

import pytest
import torch

from rankalloc.config import SearchParams
from rankalloc.errors import ConfigError
from rankalloc.gate_optimizer import SharedScaleAdam, make_gate_optimizer

GRAD = torch.tensor([1.0, 3.0, -1.0, 0.01])


def _run(opt_name: str, steps: int, grad: torch.Tensor = GRAD) -> torch.Tensor:
    p = torch.nn.Parameter(torch.zeros(len(grad)))
    opt = make_gate_optimizer(opt_name, [p], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        (p * grad).sum().backward()
        opt.step()
    return p.detach()


def test_shared_adam_moves_each_gate_in_proportion_to_its_gradient():
    moved = _run("shared_adam", 20)
    assert torch.allclose(moved / moved[0], GRAD / GRAD[0], rtol=1e-5)
    assert moved[1] < 0 and moved[2] > 0  # descent


def test_per_gate_adam_moves_every_gate_by_about_the_same_amount():
    moved = _run("adam", 20).abs()
    assert moved[:3].max() / moved[:3].min() < 1.01  # a 3x larger gradient moves no further
    assert moved[3] > 0.5 * moved[0]  # even a 100x smaller gradient moves almost as far


def test_shared_adam_separates_gates_that_a_dominant_common_term_would_hide():
    """A cost-like term 100x the loss-like differences: after removing the common movement (what the
    cost projection does), shared_adam has ordered the gates by their small differences; Adam has not."""
    differences = torch.tensor([2e-3, -1e-3, 0.0, 1e-3])
    grad = 1.0 + differences
    shared = _run("shared_adam", 30, grad)
    adam = _run("adam", 30, grad)
    shared, adam = shared - shared.mean(), adam - adam.mean()
    assert torch.equal(torch.argsort(shared), torch.argsort(-differences))
    assert shared.std() > 100 * adam.std()


def test_shared_adam_resumes_exactly_from_its_state_dict():
    def fresh():
        torch.manual_seed(0)
        return torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))

    def step(params, opt, i):
        opt.zero_grad()
        sum(((q - i) ** 2).sum() * (k + 1) for k, q in enumerate(params)).backward()
        opt.step()

    straight = fresh()
    opt = SharedScaleAdam(straight, lr=0.05)
    for i in range(6):
        step(straight, opt, i)

    first = fresh()
    opt = SharedScaleAdam(first, lr=0.05)
    for i in range(3):
        step(first, opt, i)
    saved = opt.state_dict()
    resumed = tuple(torch.nn.Parameter(q.detach().clone()) for q in first)
    opt = SharedScaleAdam(resumed, lr=0.05)
    opt.load_state_dict(saved)
    for i in range(3, 6):
        step(resumed, opt, i)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))


def test_unknown_gate_optimizer_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^--search.gate_optimizer must be one of adam, shared_adam, got 'sgd'$"):
        SearchParams(gate_optimizer="sgd").validate()
