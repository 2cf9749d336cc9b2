"""What a retrain leaves: the adapter (and merged model) it saves, checked against the trained model.

``save_outputs`` writes ``adapter/`` (a peft adapter) and, with ``--merge``, ``merged/`` (a plain
transformers model), each filled in a temporary folder and renamed into place, then reloads each the way
a user would and records the largest logit difference from the trained model.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from . import io
from .baselines import adalora_summary
from .config import RetrainConfig
from .data import TaskData
from .families import Family
from .models import BUILTIN_MODELS, load_model
from .rank_map import RankMap
from .targets import Target
from .training import to_device

logger = logging.getLogger(__name__)

RELOAD_TOLERANCE = 1e-3  # largest logit difference of the saved adapter (or merged model) before a warning


def saved_adapter_params(folder: Path) -> int:
    """Adapter parameters stored in ``folder/adapter_model.safetensors`` (LoRA/AdaLoRA tensors only)."""
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if "lora_" in k)


def describe_adapter(peft_model: nn.Module, method: str, targets: list[Target], rank_map: RankMap | None,
                     budget: int, cfg: RetrainConfig) -> tuple[RankMap, dict[str, Any]]:
    """The ranks trained (for AdaLoRA: those it kept) as a rank map, and the parameter counts.

    ``adapter_params`` counts real parameters: every LoRA tensor of the model, or for AdaLoRA its
    unmasked triplets at ``d_in + d_out`` each (``adalora`` also gives the count with singular values).
    """
    heads = {"head_params": sum(q.numel() for n, q in peft_model.named_parameters() if ".modules_to_save." in n)}
    if method != "adalora":
        return rank_map, {"adapter_params": sum(q.numel() for n, q in peft_model.named_parameters() if "lora_" in n),
                          **heads}
    summary = adalora_summary(peft_model, targets, budget)
    kept = summary["kept_ranks"]
    base = io.recorded_location(cfg.model.name, BUILTIN_MODELS)
    rank_map = RankMap.from_ranks(targets, {t.name: kept.get(t.name, 0) for t in targets}, base_model=base,
                                  budget=budget, search={"baseline": "adalora", "num_layers": cfg.model.num_layers})
    logger.info("AdaLoRA kept %d parameters (%d with singular values): %.2f%% of the budget, %s it",
                summary["kept_params"], summary["kept_params_with_singular_values"],
                100 * summary["kept_params"] / budget, summary["vs_budget"])
    return rank_map, {"adapter_params": summary["kept_params"], **heads, "adalora": summary}


def save_outputs(out: Path, cfg: RetrainConfig, peft_model: nn.Module, tokenizer: Any, task: TaskData,
                 logits: np.ndarray, device: torch.device) -> dict[str, Any]:
    """Write ``adapter/`` (and ``merged/``), and check that each reproduces the trained logits."""
    with _atomic_dir(out / "adapter") as tmp, _quiet_peft():
        peft_model.save_pretrained(str(tmp))
    probe = task.eval.batch(slice(0, min(len(task.eval), cfg.data.eval_batch_size)))
    checks = {"saved_adapter_params": saved_adapter_params(out / "adapter"),
              "reload_max_abs_diff": _reload_difference(cfg, task, tokenizer, out / "adapter", probe, logits,
                                                        device)}
    if cfg.merge:
        merged = peft_model.merge_and_unload()
        checks["merged_max_abs_diff"] = _max_diff(merged, task.family, probe, logits, device)
        with _atomic_dir(out / "merged") as tmp:
            merged.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
    if cfg.model.num_layers is not None:  # peft loads an adapter onto any depth without a word
        logger.warning("the adapter fits %s cut to its first %d blocks (--model.num_layers): load it on a base "
                       "cut the same way (config num_hidden_layers=%d), not on the full model", cfg.model.name,
                       cfg.model.num_layers, cfg.model.num_layers)
    for name in ("reload_max_abs_diff", "merged_max_abs_diff"):
        if checks.get(name, 0.0) > RELOAD_TOLERANCE:
            logger.warning("%s: the saved model's logits differ from the trained model's by %.2g (more than %g); "
                           "check the peft and transformers versions before using it", name, checks[name],
                           RELOAD_TOLERANCE)
    return checks


def _reload_difference(cfg: RetrainConfig, task: TaskData, tokenizer: Any, folder: Path, probe: dict[str, torch.Tensor],
                       logits: np.ndarray, device: torch.device) -> float:
    """Largest logit difference between the trained model and its saved adapter on a fresh base."""
    from peft import PeftModel

    base = load_model(cfg.model, task.num_labels, task.family, tokenizer.pad_token_id, task.label_names)
    with _quiet_peft():
        reloaded = PeftModel.from_pretrained(base, str(folder)).to(device)
    return _max_diff(reloaded, task.family, probe, logits, device)


@torch.no_grad()
def _max_diff(model: nn.Module, family: Family, probe: dict[str, torch.Tensor], logits: np.ndarray,
              device: torch.device) -> float:
    model.eval()
    got = family.forward(model, to_device(probe, device)).logits.float().cpu().numpy()
    return float(np.abs(got - logits[: len(got)]).max())


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """Silence two peft warnings that are false alarms here: AdaLoRA modules pruned to rank 0 save
    zero-sized tensors (not unsharded ZeRO-3 shards), and AdaLoRA's own ``rank_pattern`` (masks, applied
    by its loader) does not match LoRA's ``rank_pattern`` key syntax."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
        warnings.filterwarnings("ignore", message=r".*rank_pattern keys did not match")
        yield


@contextlib.contextmanager
def _atomic_dir(path: Path) -> Iterator[Path]:
    """Fill a temporary folder beside ``path``, then rename it into place (readers never see half)."""
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
