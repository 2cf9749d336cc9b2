"""Gradient sensitivity of the frozen weights: a one-shot score for every rank-1 component.

Before any adapter exists, the mean task-loss gradient ``G`` of each target's frozen weight over a few
training batches says where a low-rank update would lower the loss fastest: the best rank-``k`` step of
Frobenius size ``eps`` along ``-G`` lowers the loss by about ``eps * sqrt(s_1^2 + ... + s_k^2)``, with
``s_1 >= s_2 >= ...`` the singular values of ``G``.  The ``k``-th rank-1 component of a module is therefore
scored by ``s_k``, scaled by ``sqrt(d_in * d_out)``: an optimiser that moves every adapter parameter by
about the same amount (Adam) gives a rank-1 product ``b a^T`` of Frobenius size proportional to
``sqrt(d_in) * sqrt(d_out)``.  The knapsack then divides each score by the component's cost.

This is the ``gradient`` baseline of the retrain stage (``--baseline gradient``): the same candidate
ranks and the same exact knapsack as the search, only the scores come from one gradient pass instead
of the bilevel search.  It asks whether a cheap first-order signal allocates better than the search
and than random scores.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import numpy as np
import torch
from torch import nn

from .data import EpochSampler, Split
from .families import Family
from .targets import Target
from .training import to_device

#: added to the seed of the sampler, so the scoring batches are not the retrain's first batches
_SAMPLER_OFFSET = 7919


def weight_of(model: nn.Module, target: Target) -> nn.Parameter:
    """The frozen weight of ``target`` (``Linear``: out x in; GPT-2's ``Conv1D``: in x out; a fused expert
    weight: one such matrix per expert)."""
    if target.experts:
        weight = model.get_parameter(target.name)
    else:
        weight = getattr(model.get_submodule(target.name), "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != (3 if target.experts else 2):
        raise ValueError(f"target {target.name} has no {3 if target.experts else 2}-D weight to score")
    return weight


@contextlib.contextmanager
def _only_grad_on(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Gradients flow to ``params`` alone; every flag and ``.grad`` is restored afterwards."""
    flags = {id(q): q.requires_grad for q in model.parameters()}
    grads = {id(q): q.grad for q in model.parameters()}
    try:
        for q in model.parameters():
            q.requires_grad_(False)
            q.grad = None
        for q in params:
            q.requires_grad_(True)
        yield
    finally:
        for q in model.parameters():
            q.requires_grad_(flags[id(q)])
            q.grad = grads[id(q)]


def gradient_spectra(model: nn.Module, targets: list[Target], split: Split, family: Family, batches: int,
                     batch_size: int, seed: int, device: torch.device) -> list[np.ndarray]:
    """Singular values of each target's mean loss gradient over ``batches`` training batches.

    The model runs in eval mode (no dropout, so the torch random state is not touched) and is left
    as it was: no weight changes, no gradients kept.
    """
    if batches <= 0:
        raise ValueError(f"batches must be positive, got {batches}")
    weights = [weight_of(model, t) for t in targets]
    sums = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in weights]
    sampler = EpochSampler(len(split), min(batch_size, len(split)), seed + _SAMPLER_OFFSET)
    was_training = model.training
    model.eval()
    try:
        with _only_grad_on(model, weights):
            for _ in range(batches):
                loss = family.forward(model, to_device(split.batch(sampler.next()), device)).loss
                grads = torch.autograd.grad(loss, weights)
                for total, g in zip(sums, grads):
                    total += g.float()
    finally:
        model.train(was_training)
    # a fused expert weight: one spectrum per expert, summed, since its k-th component is one in every expert
    return [torch.linalg.svdvals(total / batches).reshape(-1, min(total.shape[-2:])).sum(0).cpu().numpy()
            for total in sums]


def component_scores(targets: list[Target], spectra: list[np.ndarray], r_max: dict[str, int]) -> list[list[float]]:
    """Score of the ``k``-th component of each target: ``s_k * sqrt(d_in * d_out)``, for ``k < r_max``."""
    scores = []
    for t, s in zip(targets, spectra):
        scale = math.sqrt(t.in_features * t.out_features)
        scores.append([float(v) * scale for v in s[: r_max[t.name]]])
    return scores
