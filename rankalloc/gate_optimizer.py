"""Optimisers of the rank gates.

The gate gradient of component ``k`` is ``dL_val/dlog_alpha_k + (Lagrangian term)_k``.  Which
components the search keeps depends on how these gradients *compare across components*.

* ``adam`` (torch's Adam): every gate logit is divided by the root mean square of its *own* gradient
  history, so every logit moves by about ``lr`` per step whatever the size of its gradient.  When one
  term dominates all gates alike (measured at 82,944 parameters: the cost term was 108-600x, mean ~350x, the
  held-out-loss term), every logit moves by the same amount and the scores end up equal
  (keep-probabilities 0.241-0.258 after the default search).
* ``shared_adam``: Adam with **one** second-moment estimate for all gates (the mean of the squared
  gradients over every gate).  Steps keep the relative sizes of the gradients - a gate whose held-out
  loss gradient is three times the typical one moves three times as far - while the overall step
  size stays about ``lr`` whatever the scale of the loss.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

GATE_OPTIMIZERS = ("adam", "shared_adam")


class SharedScaleAdam(torch.optim.Optimizer):
    """Adam whose second moment is one scalar shared by every parameter of the optimiser."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-12) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = None if closure is None else closure()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return loss
        mean_sq = torch.cat([p.grad.reshape(-1) for p in params]).pow(2).mean()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(())
                    state["exp_avg"] = torch.zeros_like(p)
                    state["shared_sq"] = torch.zeros(())  # the same value in every parameter's state
                state["step"] += 1
                state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["shared_sq"].mul_(beta2).add_(mean_sq.to(state["shared_sq"]), alpha=1 - beta2)
                t = float(state["step"])
                m_hat = state["exp_avg"] / (1 - beta1 ** t)
                v_hat = state["shared_sq"] / (1 - beta2 ** t)
                p.add_(m_hat / (v_hat.sqrt() + group["eps"]), alpha=-group["lr"])
        return loss


def make_gate_optimizer(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "shared_adam":
        return SharedScaleAdam(params, lr=lr)
    raise ValueError(f"unknown gate optimiser {name!r}; allowed: {', '.join(GATE_OPTIMIZERS)}")
