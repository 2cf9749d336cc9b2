"""Start a retrain from the search's trained adapters instead of a fresh initialisation.

``python -m rankalloc.retrain --rank-map RUN/rank_map.json --init-from RUN`` copies, for every module
of rank ``r``, the ``r`` components the search ranked highest (the same ones its "hard" gates keep)
into the peft LoRA: ``lora_A = A[kept]``, ``lora_B = (s / s') B[:, kept]``, where ``s`` is the search's
LoRA scale and ``s' = alpha / r`` the retrain's (equal by default), so before the first step the peft
model computes exactly what the search's model computed with hard gates.  The task head starts from the search's head too.

This turns search + retrain into one continued training run (as AdaLoRA allocates inside one run), so
the retrain can be shorter than a fresh one; whether that pays off is measured in ``benchmarks/LOG.md``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from . import rundir
from .baselines import ADAPTER
from .errors import RankMapError, RunDirError
from .export import Scores
from .gates import kept_components
from .rank_map import RankMap

logger = logging.getLogger(__name__)


def warm_start(peft_model: nn.Module, run: str | Path, rank_map: RankMap) -> dict[str, int]:
    """Copy the search in ``run``'s kept adapter components and head into ``peft_model`` (a peft LoRA
    built from ``rank_map``).  Returns how many modules and head tensors were copied.

    Raises:
        RunDirError: ``run`` holds no finished search with a final checkpoint.
        RankMapError: the rank map does not come from that search's model, or asks for more components
            than the search had.
    """
    run = Path(run)
    scores = Scores.load(run, flag="--init-from")
    if scores.data.get("model_fingerprint") != rank_map.model_fingerprint:
        raise RankMapError(f"--init-from {run}: that search ran on another model (fingerprint "
                           f"{scores.data.get('model_fingerprint')}) than the rank map ({rank_map.model_fingerprint})")
    checkpoint = run / rundir.CHECKPOINT
    if not checkpoint.is_file():
        raise RunDirError(f"--init-from {run}: no {rundir.CHECKPOINT} there (the search's final weights)")
    state = rundir.read_checkpoint(checkpoint, ("adapters",), "search",  # scores.json: it finished
                                   fix=f"give --init-from a finished search, or search again into {run}")
    model = peft_model.get_base_model()
    copied = 0
    with torch.no_grad():
        for name, module in rank_map.modules.items():
            rank = int(module["rank"])
            if rank == 0:
                continue
            A, B = state["adapters"][f"{name}.lora_A"], state["adapters"][f"{name}.lora_B"]
            fused = bool(module.get("experts"))
            trained = A.shape[-2] if fused else A.shape[0]  # fused: A is (experts, r, in)
            if rank > trained:
                raise RankMapError(f"--init-from {run}: {name} has rank {rank} in the rank map but the search "
                                   f"trained only {trained} components there")
            keep = kept_components(scores.scores[name], rank)
            layer = peft_layer(model, name, fused)
            # the retrain's scale alpha / r may differ from the search's (--train.scale): B absorbs the ratio
            factor = float(scores.data.get("scale", layer.scaling[ADAPTER])) / layer.scaling[ADAPTER]
            if fused:  # search: A (experts, r, in), B (experts, out, r); peft stacks the experts'
                # components as rows (expert, k) of A and columns (k, expert) of B
                A = A[:, keep].reshape(-1, A.shape[-1])
                B = B[:, :, keep].permute(1, 2, 0).reshape(B.shape[1], -1)
            else:
                A, B = A[keep], B[:, keep]
            layer.lora_A[ADAPTER].weight.copy_(A.to(layer.lora_A[ADAPTER].weight))
            layer.lora_B[ADAPTER].weight.copy_((factor * B).to(layer.lora_B[ADAPTER].weight))
            copied += 1
        heads = 0
        for head, head_state in state["heads"].items():
            wrapper = model.get_submodule(head)
            target = wrapper.modules_to_save[ADAPTER] if hasattr(wrapper, "modules_to_save") else wrapper
            shapes = {k: tuple(v.shape) for k, v in target.state_dict().items()}
            searched = {k: tuple(v.shape) for k, v in head_state.items()}
            if shapes != searched:  # e.g. a search on 2 classes, a retrain on 3
                raise RankMapError(f"--init-from {run}: the search's task head {head} has other shapes "
                                   f"({searched}) than this retrain's ({shapes}); retrain on the searched task, "
                                   "or drop --init-from")
            target.load_state_dict(head_state)
            heads += len(head_state)
    logger.info("warm start from %s: %d adapted modules and %d head tensors from the search's step %d", run,
                copied, heads, state["step"])
    return {"modules": copied, "head_tensors": heads, "search_step": int(state["step"])}


def peft_layer(model: nn.Module, name: str, fused: bool) -> nn.Module:
    """The peft LoRA layer of target ``name``: its module, or for a fused expert weight the wrapper of that
    parameter (peft nests one wrapper per parameter of a module)."""
    if not fused:
        return model.get_submodule(name)
    owner, _, param_name = name.rpartition(".")
    layer = model.get_submodule(owner)
    while getattr(layer, "parameter_name", param_name) != param_name:
        layer = layer.base_layer
    return layer
