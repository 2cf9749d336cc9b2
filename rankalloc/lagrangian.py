"""The budget constraint as a Lagrangian: a multiplier ``lam >= 0`` updated by dual ascent.

With ``v = (C - T) / B`` (expected cost ``C``, current cost target ``T``, final budget ``B``):

* the gate loss adds ``lam * v + rho * v**2``: the linear term is the Lagrangian, the quadratic term
  (an augmented-Lagrangian penalty) damps the oscillation of plain dual ascent and pulls ``C`` onto
  the target from either side, so the budget ends up used rather than undershot;
* the dual step is ``lam <- clip(lam + eta * v, 0, lam_max)``: ``lam`` grows while ``C > T`` and
  decays to 0 while ``C < T``.
"""
from __future__ import annotations

import math

import torch


class Lagrangian:
    def __init__(self, budget: int, lr: float, penalty: float = 0.0, lam: float = 0.0,
                 lam_max: float = 100.0) -> None:
        self.budget = float(budget)
        self.lr = float(lr)
        self.penalty = float(penalty)
        self.lam = float(lam)
        self.lam_max = float(lam_max)

    def violation(self, cost: torch.Tensor | float, target: float) -> torch.Tensor | float:
        """(C - T) / B: positive while the expected cost is above its target."""
        return (cost - target) / self.budget

    def term(self, cost: torch.Tensor, target: float) -> torch.Tensor:
        """What the gate step adds to the held-out loss; differentiable in ``cost``."""
        v = self.violation(cost, target)
        return self.lam * v + self.penalty * v * v

    def dual_step(self, cost: float, target: float) -> float:
        """One step of dual ascent; returns the new multiplier."""
        v = float(self.violation(float(cost), target))
        if not math.isfinite(v):
            raise FloatingPointError(f"non-finite constraint violation {v}")
        self.lam = min(self.lam_max, max(0.0, self.lam + self.lr * v))
        return self.lam

    def state_dict(self) -> dict[str, float]:
        return {"lam": self.lam, "budget": self.budget, "lr": self.lr, "penalty": self.penalty}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.lam = float(state["lam"])
