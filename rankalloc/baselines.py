"""The baselines of the retrain stage, at the same parameter budget ``B`` as a rank map.

* **uniform** - one rank ``r`` on every target, the largest with ``r * sum(d_in + d_out) <= B``;
  it becomes an ordinary rank map, so it trains through exactly the same peft LoRA path.
* **random** - the search's ablation: every rank-1 component of every target (up to the search's
  automatic ``r_max``) gets an i.i.d. uniform random score instead of a learned one, and the same exact
  knapsack turns the scores into ranks within ``[0.99 B, B]``.  If the search's rank maps do not beat
  these, its scores carry no information the retrain can use (the random-search baseline of NAS).
* **gradient** - the same candidates and knapsack, scored by the singular values of each frozen weight's
  mean loss gradient over a few training batches (:mod:`rankalloc.sensitivity`): a one-shot,
  first-order allocation that costs one gradient pass instead of a search.
* **adalora** - peft's AdaLoRA (Zhang et al., ICLR 2023): ``W x + s/r0 * P diag(E) Q x``, pruning
  singular-value triplets ``(P_k, E_k, Q_k)`` by a smoothed sensitivity score while the budget falls
  on a cubic schedule from ``b(0)`` to ``b(T)``.

AdaLoRA's own budget counts triplets (``target_r * number of modules``).  When modules differ in width
- BERT's MLP matrices cost 1,920 parameters per rank, its attention matrices 768 - a triplet count does
not fix the parameter count: 72 triplets on MiniLM-L6 cost anywhere from 55k to 138k parameters.
:class:`ParamBudgetAllocator` therefore keeps peft's scores, schedule and masking, and counts the
budget in parameters: a kept triplet on a module costs ``d_in + d_out`` (the singular value adds 1,
reported apart), and each re-allocation keeps the best-scoring triplets that fit, chosen by the exact
knapsack of :mod:`rankalloc.discretize`, so the final adapter uses between 99% and 100% of ``B``.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable

import numpy as np
import torch
from peft import AdaLoraConfig
from peft.tuners.adalora import AdaLoraLayer
from peft.tuners.adalora.layer import RankAllocator
from torch import nn

from .budget import candidate_r_max, check_budget
from .config import TrainParams
from .discretize import discretize
from .errors import BudgetError, ConfigError
from .targets import Target
from .sensitivity import component_scores

ADAPTER = "default"
logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Uniform LoRA
# --------------------------------------------------------------------------------------------------
def uniform_rank(targets: list[Target], budget: int, budget_text: str | None = None,
                 warn_unfilled: bool = True) -> int:
    """The largest ``r`` with ``r * sum(d_in + d_out) <= budget``; below 99% of ``budget`` it warns (unless
    ``warn_unfilled`` is False: a check that builds nothing).

    Raises:
        BudgetError: rank 1 on every target already exceeds ``budget``, or ``r`` would exceed a module.
    """
    per_rank = sum(t.cost_per_rank for t in targets)
    shown = budget_text or f"{budget:,}"
    r = budget // per_rank
    if r < 1:
        raise BudgetError(f"--budget {shown} ({budget:,} parameters) is below rank 1 on all {len(targets)} "
                          f"targets ({per_rank:,}); a uniform baseline needs at least that")
    limit = min(t.max_rank for t in targets)
    if r > limit:
        raise BudgetError(f"--budget {shown} affords rank {r} everywhere, above the smallest module's "
                          f"largest rank {limit}; allowed: {per_rank:,} to {per_rank * limit:,}")
    if warn_unfilled and r * per_rank < 0.99 * budget:  # one rank everywhere is the step: B need not be a multiple
        logger.warning("uniform rank %d on all %d targets uses %s of the budget %s parameters (%.1f%%); one more "
                       "rank everywhere (%s) would exceed it. Compare methods at a multiple of %s, where uniform "
                       "fills it", r, len(targets), f"{r * per_rank:,}", f"{budget:,}", 100 * r * per_rank / budget,
                       f"{(r + 1) * per_rank:,}", f"{per_rank:,}")
    return int(r)


# --------------------------------------------------------------------------------------------------
# Random or gradient scores, the search's knapsack
# --------------------------------------------------------------------------------------------------
def random_ranks(targets: list[Target], budget: int, seed: int, budget_text: str | None = None) -> dict[str, int]:
    """Ranks from i.i.d. uniform scores per rank-1 component, rounded by the search's knapsack.

    The draw depends on ``seed`` only (its own generator, so it does not move the training's random state).

    Raises:
        BudgetError: ``budget`` is outside what the candidate ranks can reach.
    """
    rng = np.random.default_rng(seed)
    return knapsack_ranks(targets, budget, lambda r_max: [rng.random(r_max[t.name]).tolist() for t in targets],
                          budget_text)


def gradient_ranks(targets: list[Target], spectra: list[np.ndarray], budget: int,
                   budget_text: str | None = None) -> dict[str, int]:
    """Ranks from gradient-sensitivity scores (:func:`~rankalloc.sensitivity.component_scores`), rounded
    by the search's knapsack.

    Raises:
        BudgetError: ``budget`` is outside what the candidate ranks can reach.
    """
    return knapsack_ranks(targets, budget, lambda r_max: component_scores(targets, spectra, r_max), budget_text)


def knapsack_ranks(targets: list[Target], budget: int, scores_for: Callable[[dict[str, int]], list[list[float]]],
                   budget_text: str | None = None) -> dict[str, int]:
    """The search's rounding with other scores: ``scores_for(r_max)`` scores every candidate component
    (the default search's candidate ranks, :func:`~rankalloc.budget.candidate_r_max`), and the exact
    knapsack keeps the best set within ``[0.99 B, B]``.

    Raises:
        BudgetError: ``budget`` is outside what the candidate ranks can reach.
    """
    r_max = knapsack_candidates(targets, budget, budget_text)
    ranks = discretize(scores_for(r_max), [t.cost_per_rank for t in targets], budget)
    return {t.name: int(k) for t, k in zip(targets, ranks)}


def knapsack_candidates(targets: list[Target], budget: int, budget_text: str | None = None) -> dict[str, int]:
    """The search's candidate ranks per target at ``budget``, once the budget is known to be reachable.

    Raises:
        BudgetError: ``budget`` is outside what the candidate ranks can reach.
    """
    r_max = candidate_r_max(targets, budget)
    check_budget(budget, [t.cost_per_rank for t in targets], r_max.values(), budget_text,
                 "the random and gradient baselines draw from the search's automatic candidate ranks, which no "
                 "flag raises", full_ranks=[t.max_rank for t in targets])
    return r_max


def check_baseline_budget(method: str, targets: list[Target], budget: int, p: TrainParams,
                          budget_text: str | None = None) -> None:
    """Raise the BudgetError that ``--baseline method --budget budget`` would raise, without a model or data
    (a sweep checks all its points before its first trial)."""
    if method == "uniform":
        uniform_rank(targets, budget, budget_text, warn_unfilled=False)  # the trial's retrain warns
    elif method == "adalora":
        adalora_config(targets, budget, 100, p, [], budget_text)  # the step count does not enter the check
    else:  # random, gradient: the search's candidate ranks and knapsack
        knapsack_candidates(targets, budget, budget_text)


# --------------------------------------------------------------------------------------------------
# AdaLoRA
# --------------------------------------------------------------------------------------------------
def adalora_config(targets: list[Target], budget: int, total_steps: int, p: TrainParams,
                   modules_to_save: list[str], budget_text: str | None = None,
                   task_type: str | None = "SEQ_CLS") -> AdaLoraConfig:
    """An ``AdaLoraConfig`` whose initial budget is ``p.adalora_init_ratio * budget``.

    ``init_r = ceil(ratio * B / sum(d_in + d_out))`` on every target; ``target_r`` is the mean final
    rank (peft requires it; :class:`ParamBudgetAllocator` replaces its triplet budget by ``B``).
    ``lora_alpha = scale * init_r``: AdaLoRA divides by its initial rank, so the scale is ``scale``.
    """
    fused = [t.name for t in targets if t.experts]
    if fused:
        raise ConfigError(f"--baseline adalora: peft's AdaLoRA adapts Linear modules only, not fused expert weights "
                          f"({fused[0]}, ...); leave them out with --model.target_regex, or use another baseline")
    per_rank = sum(t.cost_per_rank for t in targets)
    check_budget(budget, [t.cost_per_rank for t in targets], [t.max_rank for t in targets], budget_text,
                 "every module at full rank: a budget this large fine-tunes them all")
    init_r = min(max(1, math.ceil(p.adalora_init_ratio * budget / per_rank)), min(t.max_rank for t in targets))
    if init_r * per_rank < budget:
        raise BudgetError(f"--budget {budget_text or budget}: AdaLoRA's initial rank would exceed the smallest "
                          f"module; allowed up to {init_r * per_rank:,} parameters")
    tinit, tfinal = adalora_schedule(total_steps, p)
    return AdaLoraConfig(
        init_r=init_r, target_r=max(1, round(budget / per_rank)), lora_alpha=p.scale * init_r,
        lora_dropout=p.lora_dropout, target_modules=[t.name for t in targets], modules_to_save=modules_to_save,
        tinit=tinit, tfinal=tfinal, deltaT=p.adalora_delta_t, beta1=p.adalora_beta1, beta2=p.adalora_beta2,
        orth_reg_weight=p.adalora_orth_reg_weight, total_step=total_steps, task_type=task_type, bias="none")


def orthogonality_penalty(model: nn.Module, adapter: str = ADAPTER) -> torch.Tensor:
    """AdaLoRA's regulariser R(P, Q) = mean over its A (Q) and B (P) matrices of ||Q Q^T - I||_F and
    ||P^T P - I||_F, which keeps the triplets near-orthogonal so their scores mean something.

    peft adds it inside its own forward only when labels go into the model; every task family here
    computes its loss outside the model, so the training loop adds it explicitly.
    """
    terms = []
    for layer in model.modules():
        if isinstance(layer, AdaLoraLayer) and adapter in layer.lora_A:
            for cov in (layer.lora_A[adapter] @ layer.lora_A[adapter].T,
                        layer.lora_B[adapter].T @ layer.lora_B[adapter]):
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device,
                                                                      dtype=cov.dtype)))
    return torch.stack(terms).mean() if terms else torch.zeros(())


def adalora_schedule(total_steps: int, p: TrainParams) -> tuple[int, int]:
    """(tinit, tfinal) in steps, leaving at least one step of budget decrease, and at least one scored step
    before the first pruning.

    peft scores the triplets only at steps ``< total_steps - tfinal`` (the retrain's steps count from 1) and
    prunes from step ``tinit + 1`` on, or at ``total_steps - tfinal`` at the latest; so ``total_steps - tfinal``
    must be at least 2, or the first pruning finds no scores (with ``tinit`` 0 on a short run it did).

    Raises:
        ConfigError: fewer than 2 steps, where AdaLoRA cannot score before it prunes.
    """
    if total_steps < 2:
        raise ConfigError(f"--baseline adalora needs at least 2 training steps (it scores its triplets before it "
                          f"prunes them); this run has {total_steps}: raise --max-steps or the training examples")
    tinit = int(p.adalora_tinit * total_steps)
    tfinal = int(round(p.adalora_tfinal * total_steps))
    tfinal = max(0, min(tfinal, total_steps - max(tinit, 1) - 1))
    return tinit, tfinal


class ParamBudgetAllocator(RankAllocator):
    """peft's AdaLoRA rank allocator with its budget counted in parameters instead of triplets.

    Unchanged from peft: the sensitivity ``|w * grad|`` smoothed by ``beta1``, its uncertainty smoothed
    by ``beta2``, the triplet score ``s(E_k) + mean s(Q_k) + mean s(P_k)``, the cubic budget schedule,
    and masking by zeroing ``E_k``.  Changed: the schedule runs from the initial *parameters* to
    ``budget``, and the kept triplets are the highest-scoring set whose cost fits (exact knapsack).
    """

    def __init__(self, model: nn.Module, peft_config: AdaLoraConfig, adapter_name: str, budget: int) -> None:
        self.budget_params = int(budget)
        super().__init__(model, peft_config, adapter_name)

    def _set_budget_scheduler(self, model: nn.Module) -> None:
        super()._set_budget_scheduler(model)  # name_set: "<module>.%s.<adapter>" keys
        self.cost: dict[str, int] = {}
        self.init_params = 0
        for name, module in model.named_modules():
            if isinstance(module, AdaLoraLayer) and self.adapter_name in module.lora_A:
                key = f"{name}.%s.{self.adapter_name}"
                self.cost[key] = module.in_features + module.out_features
                self.init_params += module.r[self.adapter_name] * self.cost[key]

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        c = self.peft_config
        if step <= c.tinit:
            return self.init_params, False
        if step > c.total_step - c.tfinal:
            return self.budget_params, True
        remaining = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_params - self.budget_params) * remaining ** 3 + self.budget_params)
        return budget, step % c.deltaT == 0

    def triplet_scores(self, key: str) -> torch.Tensor:
        s = self._element_score
        return s(key % "lora_E").view(-1) + s(key % "lora_A").mean(dim=1) + s(key % "lora_B").mean(dim=0)

    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        keys = sorted(self.cost)
        scores = [self.triplet_scores(k).float().cpu() for k in keys]
        ranks = discretize([s.tolist() for s in scores], [self.cost[k] for k in keys], budget,
                           warn_unfilled=budget == self.budget_params)  # not at the schedule's in-between budgets
        params = dict(model.named_parameters())
        rank_pattern = {}
        with torch.no_grad():
            for key, score, r in zip(keys, scores, ranks):
                keep = torch.zeros(len(score), dtype=torch.bool)
                keep[torch.argsort(score, descending=True, stable=True)[:r]] = True
                lora_e = params[key % "lora_E"]
                lora_e.masked_fill_(~keep.to(lora_e.device).view(-1, 1), 0.0)
                rank_pattern[key % "lora_E"] = keep.tolist()
        return rank_pattern


def install_param_budget(peft_model: nn.Module, budget: int) -> ParamBudgetAllocator:
    """Replace the triplet-count allocator of a freshly built AdaLoRA ``PeftModel`` by ours."""
    tuner = peft_model.base_model
    allocator = ParamBudgetAllocator(tuner.model, tuner.peft_config[ADAPTER], ADAPTER, budget)
    tuner.rankallocator = allocator
    return allocator


def adalora_kept_ranks(peft_model: nn.Module) -> dict[str, int]:
    """Final kept rank of every AdaLoRA module (its unmasked triplets), keyed by module name."""
    pattern = peft_model.peft_config[ADAPTER].rank_pattern
    if not pattern:
        raise RuntimeError("AdaLoRA never allocated its budget: was update_and_allocate called every step?")
    kept = {}
    for key, mask in pattern.items():
        name = key.replace(f".{ADAPTER}", "").removesuffix(".lora_E")
        kept[name] = int(sum(bool(m) for m in mask))
    return kept


def adalora_summary(peft_model: nn.Module, targets: list[Target], budget: int) -> dict[str, Any]:
    """Kept ranks and parameters of a trained AdaLoRA adapter, both ways, against ``budget``."""
    kept = adalora_kept_ranks(peft_model)
    cost = {t.name: t.cost_per_rank for t in targets}
    params = sum(r * cost[n] for n, r in kept.items())
    with_values = params + sum(kept.values())
    cfg = peft_model.peft_config[ADAPTER]
    trained = sum(cfg.init_r * (c + 1) for c in cost.values())
    side = "equal to" if params == budget else ("above" if params > budget else "below")
    return {
        "kept_ranks": kept,
        "kept_params": params,  # d_in + d_out per kept triplet: the same cost model as LoRA
        "kept_params_with_singular_values": with_values,  # + 1 per kept triplet
        "budget_ratio": params / budget,
        "budget_ratio_with_singular_values": with_values / budget,
        "vs_budget": side,
        "trained_params": trained,  # init_r triplets on every module during training
        "init_r": cfg.init_r, "target_r": cfg.target_r, "tinit": cfg.tinit, "tfinal": cfg.tfinal,
        "deltaT": cfg.deltaT, "total_step": cfg.total_step, "beta1": cfg.beta1, "beta2": cfg.beta2,
        "orth_reg_weight": cfg.orth_reg_weight, "lora_alpha": cfg.lora_alpha,
        "allocator": "peft RankAllocator scores, budget in parameters (exact knapsack per re-allocation)",
    }
