"""What a retrain leaves: the adapter (and merged model) it saves, checked against the trained model.

``save_outputs`` writes ``adapter/`` (a peft adapter) and, with ``--merge``, ``merged/`` (a plain
transformers model), each filled in a temporary folder and renamed into place, then reloads each the way
a user would and records the largest logit difference from the trained model.
"""
from __future__ import annotations

import contextlib
import json
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
from .models import BUILTIN_MODELS, config_overrides, dtype_kwarg, hub_id, load_pretrained, resolve_model_path
from .rank_map import RankMap, peft_as_named, peft_settings, peft_would_rewrite
from .targets import Target
from .tokenization import pair_separator
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
    built = peft_model.peft_config["default"]
    task_type = getattr(built.task_type, "value", built.task_type)
    names = [name for name, _ in peft_model.get_base_model().named_modules()]
    head_names = sorted({head for head in built.modules_to_save or []  # peft adds its class's defaults ("score", ..)
                         if any(name == head or name.endswith("." + head) for name in names)})
    rank_map = RankMap.from_ranks(targets, {t.name: kept.get(t.name, 0) for t in targets}, base_model=base,
                                  budget=budget, search={"baseline": "adalora", "num_layers": cfg.model.num_layers},
                                  peft=peft_settings(task_type, head_names, built.fan_in_fan_out, cfg.train.scale))
    logger.info("AdaLoRA kept %d parameters (%d with singular values): %.2f%% of the budget, %s it",
                summary["kept_params"], summary["kept_params_with_singular_values"],
                100 * summary["kept_params"] / budget, summary["vs_budget"])
    return rank_map, {"adapter_params": summary["kept_params"], **heads, "adalora": summary}


BASE_MODEL_KWARGS = "base_model_kwargs.json"  # in adapter/: the config settings that rebuild the trained base


def save_outputs(out: Path, cfg: RetrainConfig, peft_model: nn.Module, tokenizer: Any, task: TaskData,
                 logits: np.ndarray, device: torch.device) -> dict[str, Any]:
    """Write ``adapter/`` (and ``merged/``), and check that each reproduces the trained logits.

    The adapter folder also holds the tokenizer (its padding) and ``base_model_kwargs.json``, the config
    settings the base model was loaded with (label count and names, a cut depth, a padding id the model's
    own config lacks); its ``README.md`` says how to load it.  The reload check loads it that way.
    """
    from transformers import AutoModelForCausalLM

    kwargs = config_overrides(cfg.model, task.family, task.num_labels, tokenizer.pad_token_id, task.label_names)
    published = hub_id(io.recorded_location(cfg.model.name, BUILTIN_MODELS))  # a hub id or an absolute folder
    with _atomic_dir(out / "adapter") as tmp, _quiet_peft(), _named_as_published(peft_model, published):
        # no embedding is an adapter target and the vocabulary is never resized: without this, peft asks the
        # hub whether the base's vocabulary changed (a network call, which fails offline)
        peft_model.save_pretrained(str(tmp), save_embedding_layers=False)
        tokenizer.save_pretrained(str(tmp))
        io.write_json(tmp / BASE_MODEL_KWARGS, kwargs)
        _add_loading_note(tmp / "README.md", published, task.family, builtin=cfg.model.name if cfg.model.name in BUILTIN_MODELS else None,
                          pairs=pair_separator(tokenizer) if cfg.data.text_pair_column else None,
                          as_named=peft_would_rewrite(peft_model.peft_config["default"], peft_model.get_base_model()))
    probe = task.eval.batch(slice(0, min(len(task.eval), cfg.data.eval_batch_size)))
    checks = {"saved_adapter_params": saved_adapter_params(out / "adapter"),
              "reload_max_abs_diff": _reload_difference(cfg, task, out / "adapter", probe, logits, device)}
    if cfg.merge:
        merged = peft_model.merge_and_unload()
        checks["merged_max_abs_diff"] = _max_diff(merged, task.family, probe, logits, device)
        with _atomic_dir(out / "merged") as tmp:
            merged.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
    # settings beyond the head's that peft would not know on a stock base, where the logits then differ
    # without a word (a causal LM's do not depend on the padding id: the attention mask hides padding)
    changed = sorted(set(kwargs) - set(task.family.config_kwargs(task.num_labels, task.label_names))
                     - ({"pad_token_id"} if task.family.model_class() is AutoModelForCausalLM else set()))
    if changed:
        logger.warning("the adapter fits %s loaded with %s: load its base with adapter/%s (see adapter/README.md), "
                       "not with the model's own config", cfg.model.name,
                       ", ".join(f"{key}={kwargs[key]}" for key in changed), BASE_MODEL_KWARGS)
    for name in ("reload_max_abs_diff", "merged_max_abs_diff"):
        if checks.get(name, 0.0) > RELOAD_TOLERANCE:
            logger.warning("%s: the saved model's logits differ from the trained model's by %.2g (more than %g); "
                           "check the peft and transformers versions before using it", name, checks[name],
                           RELOAD_TOLERANCE)
    return checks


@contextlib.contextmanager
def _named_as_published(peft_model: nn.Module, published: str) -> Iterator[None]:
    """While saving, the base is recorded as ``published``: a built-in model as its hub id (peft would write the
    local folder the alias resolves to, which means nothing on another machine), a folder as its absolute path
    (a relative one means nothing from another working folder)."""
    configs = list(peft_model.peft_config.values())
    base_config = peft_model.get_base_model().config
    before = [c.base_model_name_or_path for c in configs], base_config._name_or_path
    for c in configs:
        c.base_model_name_or_path = published
    base_config._name_or_path = published
    try:
        yield
    finally:
        for c, old in zip(configs, before[0]):
            c.base_model_name_or_path = old
        base_config._name_or_path = before[1]


def _add_loading_note(card: Path, base: str, family: Family, builtin: str | None = None,
                      pairs: str | None = None, as_named: bool = False) -> None:
    """Write the model card in place of peft's blank template (whose tags named the local folder the base was
    read from): what the adapter is, and how to rebuild the trained model (peft alone would load the adapter
    on a base with the model's own config: another label count, depth or padding id); ``_reload_difference``
    measures exactly this load.  ``builtin``: the alias of rankalloc's packaged copy of ``base``; ``pairs``: the
    separator that joined a pair's two texts (a tokenizer without a pair template); ``as_named``: peft would
    rename this adapter's targets on loading (see :func:`rankalloc.rank_map.peft_as_named`), so the note says
    how to stop it."""
    import peft
    import transformers

    model_class = family.model_class().__name__
    keep_names = ("\n# peft renames this model type's MLP targets as if saved under transformers 4; these are transformers "
                  "5's:\nfrom peft.utils import transformers_weight_conversion\n"
                  "transformers_weight_conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None"
                  if as_named else "")
    offline = (f'\n# offline, rankalloc\'s packaged copy of it: from rankalloc.models import resolve_model_path; '
               f'resolve_model_path("{builtin}")' if builtin else "")
    joined = (f"\nThe two texts of a pair were joined into one before tokenizing, as `text + {pairs!r} + pair` (this "
              "tokenizer has no pair template); join them so too.\n" if pairs is not None else "")
    note = f"""
## Loading (written by rankalloc)

The base model was loaded in float32 with the config settings in `{BASE_MODEL_KWARGS}` (label count and
names, a cut depth, a padding id); load it so, then the adapter, and tokenize with the tokenizer saved here:
{joined}
```python
import json
import torch
from peft import PeftModel
from transformers import AutoTokenizer, {model_class}

adapter = "path/to/this/folder"
kwargs = json.load(open(f"{{adapter}}/{BASE_MODEL_KWARGS}"))
if "id2label" in kwargs:  # JSON keeps the class ids as strings
    kwargs["id2label"] = {{int(k): v for k, v in kwargs["id2label"].items()}}{offline}
base = {model_class}.from_pretrained("{base}", {dtype_kwarg()}=torch.float32, ignore_mismatched_sizes=True,
       **kwargs){keep_names}
model = PeftModel.from_pretrained(base, adapter)
tokenizer = AutoTokenizer.from_pretrained(adapter)
```
"""
    header = f"""---
base_model: {base}
library_name: peft
tags:
- base_model:adapter:{base}
- lora
- rankalloc
---

# LoRA adapter for {base}

A peft LoRA adapter ({family.describe()}) with a rank chosen per module by rankalloc: `adapter_config.json` holds
the ranks (`rank_pattern`), and the run folder's `metrics.json` and `rank_map.json` its evaluation and rank map.
Saved with peft {peft.__version__} and transformers {transformers.__version__}.
"""
    io.write_text(card, header + note)


def base_model_kwargs(folder: Path) -> dict[str, Any]:
    """The config settings an adapter folder records for its base (``base_model_kwargs.json``), with the
    class ids of ``id2label`` as integers again (JSON keeps them as strings)."""
    kwargs = json.loads((Path(folder) / BASE_MODEL_KWARGS).read_text())
    if "id2label" in kwargs:
        kwargs["id2label"] = {int(k): v for k, v in kwargs["id2label"].items()}
    return kwargs


def _reload_difference(cfg: RetrainConfig, task: TaskData, folder: Path, probe: dict[str, torch.Tensor],
                       logits: np.ndarray, device: torch.device) -> float:
    """Largest logit difference between the trained model and its saved adapter, loaded as its model card
    says: the base model in float32 with the recorded config settings, then the adapter."""
    from peft import PeftModel

    base = load_pretrained(task.family.model_class(), resolve_model_path(cfg.model.name), **base_model_kwargs(folder))
    with _quiet_peft(), peft_as_named():
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
    by its loader) does not match LoRA's ``rank_pattern`` key syntax, nor do fused expert weights' keys match
    the module names peft checks them against (it applies them: the reload's logits are compared)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
        warnings.filterwarnings("ignore", message=r".*(rank|alpha)_pattern keys did not match")
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
