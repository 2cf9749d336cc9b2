"""The retrain's training loop and evaluation: AdamW with linear warm-up and decay over a fixed number of
steps (AdaLoRA adds its orthogonality regulariser and re-allocates after each step), data-parallel under
torchrun, and the family's outputs over an evaluation split."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import distributed, io, rundir
from .baselines import orthogonality_penalty
from .config import RetrainConfig
from .data import EpochSampler, Split
from .errors import RunDirError
from .families import Classification, Family
from .training import RunClock, check_finite, rng_state, set_rng_state, to_device

logger = logging.getLogger(__name__)


def linear_schedule(total: int, warmup: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def train(model: nn.Module, train_split: Split, steps: int, lr: float, cfg: RetrainConfig, device: torch.device,
          adalora: bool = False, on_step: Callable[[dict[str, Any]], None] | None = None,
          dist_info: distributed.DistInfo = distributed.DistInfo(), family: Family | None = None,
          checkpoint: Path | None = None, resume: dict[str, Any] | None = None,
          meta: dict[str, Any] | None = None, clock: RunClock | None = None) -> list[dict[str, Any]]:
    """``steps`` AdamW steps on batches of ``train_split``; AdaLoRA adds its orthogonality regulariser to
    the loss and re-allocates its ranks after each step.

    Every ``--train.checkpoint_every`` steps rank 0 writes ``checkpoint`` (trainable weights, optimiser,
    schedule, data order, RNGs: what it takes to continue the same run; ``meta`` says which run it is);
    ``resume``, such a checkpoint loaded, continues from its step; ``clock`` (the run's time and memory
    over its processes) travels with the checkpoint.
    """
    family = family or Classification()
    p = cfg.train
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(steps, math.ceil(p.warmup_ratio * steps)))
    # every rank draws the same global batch and keeps its slice (see rankalloc.distributed)
    sampler = EpochSampler(len(train_split), cfg.data.batch_size * dist_info.world_size, cfg.seed,
                           dist_info.world_size)
    history, first = [], 0
    if resume is not None:
        first, history = _restore(model, opt, sched, sampler, resume, adalora, dist_info)
    model.train()
    for step in range(first, steps):
        batch = to_device(train_split.batch(distributed.shard(sampler.next(), dist_info)), device)
        opt.zero_grad(set_to_none=True)
        out = family.forward(model, batch)
        loss = distributed.token_weighted(out.loss, out.weight, dist_info)
        if adalora:
            loss = loss + p.adalora_orth_reg_weight * orthogonality_penalty(model)
        value = float(distributed.mean(loss.detach(), dist_info))
        check_finite(value, "training loss", step,
                     str(checkpoint) if checkpoint is not None and checkpoint.is_file() else None)
        loss.backward()
        distributed.average_gradients(params, dist_info)
        opt.step()
        sched.step()
        if adalora:  # after the update, before the gradients are cleared: it scores |w * grad|
            model.base_model.update_and_allocate(step + 1)
        row = {"step": step + 1, "total_steps": steps, "train_loss": value, "lr": sched.get_last_lr()[0]}
        history.append(row)
        if (step + 1) % p.log_every == 0 or step + 1 == steps:
            recent = [r["train_loss"] for r in history[-p.log_every:]]
            logger.info("step %d/%d  loss %.4f  lr %.2e", step + 1, steps, float(np.mean(recent)), row["lr"])
        last = step + 1 == steps  # also then: until the run is marked done, a kill resumes here, not from zero
        if checkpoint is not None and p.checkpoint_every and ((step + 1) % p.checkpoint_every == 0 or last):
            rngs = distributed.gather(dist_info, rng_state())  # every rank's own random stream
            if dist_info.is_main:
                _save(checkpoint, step + 1, model, opt, sched, sampler, history, meta or {}, adalora, rngs,
                      clock.state() if clock is not None else None)
        if on_step is not None:
            on_step(row)
    return history


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: q.detach().cpu().clone() for name, q in model.named_parameters() if q.requires_grad}


# AdaLoRA's allocator: the smoothed sensitivities and uncertainties it scores triplets by
_ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def _adalora_state(model: nn.Module) -> dict[str, Any]:
    """What AdaLoRA needs besides the weights to continue: its allocator's running scores and the rank
    pattern it has fixed (the masked singular values are zero in the weights already)."""
    tuner = model.base_model
    allocator = tuner.rankallocator
    state = {k: {n: t.detach().cpu().clone() for n, t in getattr(allocator, k).items()} for k in _ALLOCATOR_STATE}
    state["rank_pattern"] = tuner.peft_config[tuner.trainable_adapter_name].rank_pattern
    return state


def _set_adalora_state(model: nn.Module, state: dict[str, Any]) -> None:
    tuner = model.base_model
    device = next(p.device for p in model.parameters())
    for k in _ALLOCATOR_STATE:
        setattr(tuner.rankallocator, k, {n: t.to(device) for n, t in state[k].items()})
    tuner.peft_config[tuner.trainable_adapter_name].rank_pattern = state["rank_pattern"]


def _save(path: Path, step: int, model: nn.Module, opt: Any, sched: Any, sampler: EpochSampler,
          history: list[dict[str, Any]], meta: dict[str, Any], adalora: bool = False,
          rngs: list[dict[str, Any]] | None = None, clock: dict[str, Any] | None = None) -> None:
    """``rngs``: every rank's RNG state, in rank order (default: this process's); ``clock``:
    :meth:`RunClock.state`."""
    io.save_torch(path, {"meta": meta, "step": step, "params": _trainable(model), "opt": opt.state_dict(),
                         "sched": sched.state_dict(), "sampler": sampler.state_dict(), "history": list(history),
                         "rng": rngs or [rng_state()], "adalora": _adalora_state(model) if adalora else None,
                         "clock": clock})


def _restore(model: nn.Module, opt: Any, sched: Any, sampler: EpochSampler,
             ckpt: dict[str, Any], adalora: bool = False,
             dist_info: distributed.DistInfo = distributed.DistInfo()) -> tuple[int, list[dict[str, Any]]]:
    with torch.no_grad():
        for name, q in model.named_parameters():
            if q.requires_grad:
                q.copy_(ckpt["params"][name])
    if adalora:
        _set_adalora_state(model, ckpt["adalora"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    sampler.load_state_dict(ckpt["sampler"])
    set_rng_state(distributed.own_rng_state(ckpt["rng"], dist_info))
    return int(ckpt["step"]), list(ckpt["history"])


_RECORDED_LATER = ("init_from", "data_fingerprint")  # checkpoints of earlier versions lack these


def load_resumable(path: Path, meta: dict[str, Any], method: str,
                   dist_info: distributed.DistInfo | None = None) -> dict[str, Any] | None:
    """The checkpoint in the run folder, checked to belong to this very run; None when there is none
    (given ``dist_info``, a rank other than 0 that rank 0 resumes: there must be one).

    Raises:
        RunDirError: the checkpoint was written by a run with other settings, or this rank cannot see it.
    """
    if not path.is_file():
        if dist_info is not None:
            raise RunDirError(f"--resume: process {dist_info.rank} cannot see {path}, which process 0 resumes "
                              "from; give every process one shared --out")
        return None
    ckpt = rundir.read_checkpoint(path, ("meta", "step"), "retrain")
    saved = ckpt["meta"]
    if "world_size" in saved:  # first: the run length follows from it (not recorded by earlier versions)
        distributed.check_world_size(distributed.DistInfo(world_size=meta["world_size"]), saved["world_size"],
                                     path.parent)
    for key in meta:
        if key == "world_size" or (key in _RECORDED_LATER and key not in saved):  # the process count: above
            continue
        if saved.get(key) != meta[key]:
            what = {"ranks": "another rank map", "model": "other model settings", "data": "other data settings",
                    "train": "other training settings", "steps": "another run length",
                    "init_from": "another --init-from (or none)",
                    "data_fingerprint": "other examples (the task's data changed since)"}.get(key, f"another --{key}")
            raise RunDirError(f"--resume: the run in {path.parent} was started with {what}; use the same "
                              "settings, another --out, or --overwrite")
    logger.info("resuming %s (%s) from step %d of %d", path.parent, method, ckpt["step"], meta["steps"])
    return ckpt



@torch.no_grad()
def predict(model: nn.Module, split: Split, batch_size: int, device: torch.device,
            family: Family | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The family's per-example outputs ("logits") and labels over ``split``, in eval mode."""
    family = family or Classification()
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for batch in split.iter_batches(batch_size):
            labels.append(family.eval_labels(batch).numpy())
            logits.append(family.forward(model, to_device(batch, device)).logits.float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(logits), np.concatenate(labels)
