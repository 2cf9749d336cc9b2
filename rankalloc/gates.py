"""Rank gates of one gated LoRA layer, in two parameterisations (``--search.gates``).

``hard_concrete`` (default): one hard-concrete L0 gate per rank-1 LoRA component (Louizos et al. 2018;
CoFi style), described below.  ``nested``: one categorical distribution over the layer's rank with
nested masks (DARTS style), see :class:`NestedRankGates`.

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


class _Gates(nn.Module):
    """What both parameterisations share: the gate values of the current mode (see :data:`MODES`)."""

    mode = "sample"
    description = ""  # one line for summaries and reports
    hard_mask: torch.Tensor

    def forward(self) -> torch.Tensor:
        if self.mode == "sample":
            return self.sample()
        if self.mode == "expected":
            return self.expected()
        if self.mode == "hard":
            return self.hard_mask
        return torch.ones_like(self.hard_mask)


class RankGates(_Gates):
    """``r`` hard-concrete gates for the rank-1 components of one gated LoRA layer."""

    description = "hard-concrete per rank-1 component"

    def __init__(self, r: int, init_keep: float = 0.9, temperature: float = 0.5) -> None:
        super().__init__()
        self.temperature = float(temperature)
        self.log_alpha = nn.Parameter(torch.full((r,), self._log_alpha_for(init_keep)))
        self.register_buffer("hard_mask", torch.ones(r))

    def _log_alpha_for(self, keep: float) -> float:
        return math.log(keep / (1.0 - keep)) + self.temperature * math.log(-GAMMA / ZETA)

    def keep_prob(self) -> torch.Tensor:
        """P(component kept), differentiable in ``log_alpha``."""
        return torch.sigmoid(self.log_alpha - self.temperature * math.log(-GAMMA / ZETA))

    def keep_prob_shifted(self, offset: float) -> torch.Tensor:
        """P(keep) if every ``log_alpha`` were shifted by ``offset`` (for the cost projection)."""
        return torch.sigmoid(self.log_alpha + offset - self.temperature * math.log(-GAMMA / ZETA))

    @torch.no_grad()
    def shift_(self, offset: float) -> None:
        """Apply the shift of :meth:`keep_prob_shifted`; the order of the components is unchanged."""
        self.log_alpha.add_(offset)

    def expected(self) -> torch.Tensor:
        """Deterministic gate values: the L0 paper's test-time estimate clip(sigmoid(log_alpha) (zeta - gamma)
        + gamma, 0, 1) (Louizos et al., 2018, eq. 13). It ignores the temperature, so it is neither the mean
        nor the median of the gate; near P(keep) = 0.25 it is almost 0. No report uses it."""
        return torch.clamp(torch.sigmoid(self.log_alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def sample(self) -> torch.Tensor:
        u = torch.rand_like(self.log_alpha).clamp(EPS, 1.0 - EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.temperature)
        return torch.clamp(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def set_hard_rank(self, rank: int) -> None:
        """Keep the ``rank`` components with the highest keep-probability, drop the rest."""
        mask = torch.zeros_like(self.hard_mask)
        mask[kept_components(self.keep_prob().detach(), rank)] = 1.0
        self.hard_mask.copy_(mask)

    def clamp_(self, bound: float = 50.0) -> None:
        """Keep ``log_alpha`` finite and bounded.  The bound lies far beyond where gate steps and cost
        projections take the logits (P(keep) < 1e-21 there), so clipping never ties distinct scores, which
        would make the knapsack fall back to component order (at 12 a projection did)."""
        with torch.no_grad():
            self.log_alpha.clamp_(-bound, bound)

    def extra_repr(self) -> str:
        return f"r={self.log_alpha.numel()}, temperature={self.temperature}, mode={self.mode}"


class NestedRankGates(_Gates):
    """A categorical distribution over the rank ``0..r`` of one layer, with nested masks (DARTS style).

    ``log_alpha`` holds ``r + 1`` logits, one per rank; ``pi = softmax(log_alpha)``.  Component ``k`` is
    kept exactly when the rank exceeds ``k``, so the masks are nested (rank 3 keeps components 0, 1, 2)
    and ``P(keep_k) = P(rank > k)``, a tail sum of ``pi``: the expected cost stays
    ``sum_k P(keep_k) * (d_in + d_out)``, and the knapsack reads these keep-probabilities as for
    hard-concrete gates (they never increase with ``k``, so rank ``r`` is worth ``E[min(rank, r)]``).

    A sample draws one rank from the Gumbel-softmax relaxation at ``temperature`` and keeps the components
    below it: the forward pass sees an exact 0/1 mask, the gradient flows through the relaxed one-hot
    (straight-through).  The cost projection tilts the logits by ``offset * rank`` (one common tilt for
    every layer), which moves each layer's expected rank monotonically and keeps the order of components.
    """

    description = "categorical over each layer's rank, nested masks"

    def __init__(self, r: int, init_keep: float = 0.9, temperature: float = 0.5) -> None:
        super().__init__()
        self.temperature = float(temperature)
        self.register_buffer("ranks", torch.arange(r + 1, dtype=torch.float32))
        self.log_alpha = nn.Parameter(self._logits_for(init_keep))
        self.register_buffer("hard_mask", torch.ones(r))

    def _logits_for(self, keep: float) -> torch.Tensor:
        """Logits ``t * rank / r`` whose expected rank is ``keep * r`` (bisection on the tilt ``t``)."""
        r = max(1, len(self.ranks) - 1)
        lo, hi = -200.0, 200.0
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            mean = float((torch.softmax(mid * self.ranks / r, 0) * self.ranks).sum()) / r
            lo, hi = (mid, hi) if mean < keep else (lo, mid)
        return 0.5 * (lo + hi) * self.ranks / r

    @staticmethod
    def _tail(pi: torch.Tensor) -> torch.Tensor:
        """``P(rank > k)`` for ``k = 0..r-1`` from the rank probabilities (summed from the top: no cancellation)."""
        return torch.flip(torch.cumsum(torch.flip(pi, (0,)), 0), (0,))[1:]

    def rank_probs(self) -> torch.Tensor:
        return torch.softmax(self.log_alpha, 0)

    def keep_prob(self) -> torch.Tensor:
        return self._tail(self.rank_probs())

    def keep_prob_shifted(self, offset: float) -> torch.Tensor:
        return self._tail(torch.softmax(self.log_alpha + offset * self.ranks, 0))

    @torch.no_grad()
    def shift_(self, offset: float) -> None:
        self.log_alpha.add_(offset * self.ranks)

    def expected(self) -> torch.Tensor:
        return self.keep_prob()

    def sample(self) -> torch.Tensor:
        u = torch.rand_like(self.log_alpha).clamp(EPS, 1.0 - EPS)
        soft = torch.softmax((self.log_alpha - torch.log(-torch.log(u))) / self.temperature, 0)
        hard = torch.zeros_like(soft).scatter_(0, soft.argmax().view(1), 1.0)
        return self._tail(hard + (soft - soft.detach()))  # forward: exactly the 0/1 mask of the drawn rank

    def set_hard_rank(self, rank: int) -> None:
        """Keep the first ``rank`` components (the nested mask of that rank)."""
        mask = torch.zeros_like(self.hard_mask)
        mask[:rank] = 1.0
        self.hard_mask.copy_(mask)

    def clamp_(self, bound: float = 12.0) -> None:
        """Normalise the logits to log-probabilities and floor them at ``-bound``, so that no rank
        becomes too improbable to recover and the logits never drift (softmax ignores a common shift)."""
        with torch.no_grad():
            self.log_alpha.copy_(torch.log_softmax(self.log_alpha, 0).clamp_(min=-bound))

    def extra_repr(self) -> str:
        return f"r={len(self.hard_mask)}, temperature={self.temperature}, mode={self.mode}, nested"


#: ``--search.gates``: name -> class
GATE_KINDS = {"hard_concrete": RankGates, "nested": NestedRankGates}


def make_gates(kind: str, r: int, init_keep: float = 0.9, temperature: float = 0.5) -> nn.Module:
    if kind not in GATE_KINDS:
        raise ValueError(f"gates must be one of {', '.join(GATE_KINDS)}, got {kind!r}")
    return GATE_KINDS[kind](r, init_keep, temperature)
