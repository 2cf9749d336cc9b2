"""Rank gates: one hard-concrete L0 gate per rank-1 LoRA component (Louizos et al. 2018; CoFi style).

Each component ``k`` of a layer has a parameter ``log_alpha_k``.  During the search a gate value is
*sampled* from the stretched, clipped binary concrete

    s = sigmoid((log u - log(1-u) + log_alpha) / beta),  z = clamp(s * (zeta - gamma) + gamma, 0, 1)

so ``z`` is exactly 0 or 1 with positive probability and the samples are differentiable in
``log_alpha``.  The probability that component ``k`` is kept (``z > 0``) has a closed form,

    P(keep_k) = sigmoid(log_alpha_k - beta * log(-gamma / zeta)),

which makes the expected parameter cost ``sum_k P(keep_k) * (d_in + d_out)`` differentiable.  The
keep-probabilities are also the scores the knapsack discretiser ranks components by.
"""
from __future__ import annotations

import math

import torch
from torch import nn

GAMMA, ZETA = -0.1, 1.1  # stretch interval of the hard-concrete distribution
EPS = 1e-6

#: gate modes: "sample" (search), "expected" (deterministic continuous), "hard" (fixed 0/1 mask),
#: "off" (all components on; a plain LoRA of rank r_max)
MODES = ("sample", "expected", "hard", "off")


def kept_components(scores: torch.Tensor | list[float], rank: int) -> torch.Tensor:
    """Indices of the ``rank`` highest scores, ties broken by position: the components a hard gate keeps
    (and the ones a warm-started retrain copies)."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    return torch.argsort(scores, descending=True, stable=True)[:rank]


class RankGates(nn.Module):
    """``r`` hard-concrete gates for the rank-1 components of one gated LoRA layer."""

    def __init__(self, r: int, init_keep: float = 0.9, temperature: float = 0.5) -> None:
        super().__init__()
        self.temperature = float(temperature)
        self.log_alpha = nn.Parameter(torch.full((r,), self._log_alpha_for(init_keep)))
        self.register_buffer("hard_mask", torch.ones(r))
        self.mode = "sample"

    def _log_alpha_for(self, keep: float) -> float:
        return math.log(keep / (1.0 - keep)) + self.temperature * math.log(-GAMMA / ZETA)

    def keep_prob(self) -> torch.Tensor:
        """P(component kept), differentiable in ``log_alpha``."""
        return torch.sigmoid(self.log_alpha - self.temperature * math.log(-GAMMA / ZETA))

    def keep_prob_shifted(self, offset: float) -> torch.Tensor:
        """P(keep) if every ``log_alpha`` were shifted by ``offset`` (for the cost projection)."""
        return torch.sigmoid(self.log_alpha + offset - self.temperature * math.log(-GAMMA / ZETA))

    def expected(self) -> torch.Tensor:
        """Deterministic gate values (the median of the distribution, clipped to [0, 1])."""
        return torch.clamp(torch.sigmoid(self.log_alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def sample(self) -> torch.Tensor:
        u = torch.rand_like(self.log_alpha).clamp(EPS, 1.0 - EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.temperature)
        return torch.clamp(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def forward(self) -> torch.Tensor:
        if self.mode == "sample":
            return self.sample()
        if self.mode == "expected":
            return self.expected()
        if self.mode == "hard":
            return self.hard_mask
        return torch.ones_like(self.log_alpha)

    def set_hard_rank(self, rank: int) -> None:
        """Keep the ``rank`` components with the highest keep-probability, drop the rest."""
        mask = torch.zeros_like(self.hard_mask)
        mask[kept_components(self.keep_prob().detach(), rank)] = 1.0
        self.hard_mask.copy_(mask)

    def clamp_(self, bound: float = 12.0) -> None:
        """Keep ``log_alpha`` bounded so no gate saturates beyond recovery or overflows."""
        with torch.no_grad():
            self.log_alpha.clamp_(-bound, bound)

    def extra_repr(self) -> str:
        return f"r={self.log_alpha.numel()}, temperature={self.temperature}, mode={self.mode}"
