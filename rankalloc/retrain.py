"""Retrain: fixed-rank peft adapters from a rank map, and the baselines, under one recipe.

``python -m rankalloc.retrain --rank-map RUN/rank_map.json`` builds ``LoraConfig(rank_pattern=...)``
from the rank map - layer ``l`` gets a plain LoRA of rank ``r_l``, ``W x + (alpha/r) B A x`` with
``alpha = scale * r`` - trains it from a fresh initialisation on every training example of the task
(the search's weight and gate splits together) and evaluates it on the task's evaluation split, which
the search never saw.  ``--baseline uniform|random|gradient|adalora --budget B`` trains the baselines with the very
same recipe (:class:`~rankalloc.config.TrainParams`); only the adapter shape differs (AdaLoRA also
keeps its own learning rate and budget schedule, as its authors tune it).

Outputs in ``--out``: ``adapter/`` (an ordinary peft adapter), ``metrics.json``, ``history.json``, ``rank_map.json``
(the ranks trained; for AdaLoRA the ranks it kept), ``merged/`` with ``--merge``, and ``status.json``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import shutil
import sys
import time
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from . import __version__, distributed, io, rundir
from .baselines import (adalora_config, adalora_summary, gradient_ranks, install_param_budget, random_ranks,
                        uniform_rank)
from .budget import parse_budget
from .config import DATASET_FIELDS, DataConfig, RetrainConfig
from .flags import checked_copy, coerce, stage_command, to_dict
from .data import Split, TaskData, prepare_task
from .errors import ModelError, RankMapError, RunDirError
from .families import Classification, Family
from .models import BUILTIN_MODELS, count_parameters, load_model, load_model_config, load_tokenizer, resolve_device
from .targets import Target, find_targets, head_modules, stores_fan_in_fan_out
from .rank_map import RankMap
from .retrain_loop import load_resumable, predict, train
from .sensitivity import gradient_spectra
from .training import peak_memory, set_seed, to_device
from .warm_start import warm_start

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "minilm-l6"
RELOAD_TOLERANCE = 1e-3  # largest logit difference of the saved adapter (or merged model) before a warning


@dataclass
class RetrainResult:
    out: Path
    metrics: dict[str, Any]
    logits: np.ndarray  # the trained model's logits on the evaluation split
    labels: np.ndarray


# --------------------------------------------------------------------------------------------------
# Building the adapter of each method
# --------------------------------------------------------------------------------------------------
def build_adapter(cfg: RetrainConfig, model: nn.Module, targets: list[Target], rank_map: RankMap | None,
                  budget: int, budget_text: str | None, steps: int, family: Family | None = None,
                  train_split: Split | None = None,
                  device: torch.device = torch.device("cpu")) -> tuple[nn.Module, RankMap | None]:
    """Wrap ``model`` in peft: LoRA with the rank map's (or a baseline's) ranks, or AdaLoRA at ``budget``.

    ``--baseline gradient`` scores on ``train_split`` (on ``device``) before the adapter exists.
    """
    from peft import LoraConfig, get_peft_model

    heads = sorted(head_modules(model))
    p = cfg.train
    family = family or Classification()
    base = io.recorded_location(cfg.model.name, BUILTIN_MODELS)
    if cfg.baseline == "adalora":
        peft_model = get_peft_model(model, adalora_config(targets, budget, steps, p, heads, budget_text,
                                                          family.peft_task_type))
        install_param_budget(peft_model, budget)
        return peft_model, None
    if cfg.baseline == "uniform":
        r = uniform_rank(targets, budget, budget_text)
        rank_map = RankMap.from_ranks(targets, {t.name: r for t in targets}, base_model=base,
                                      budget=budget, search={"baseline": "uniform", "uniform_rank": r,
                                                             "num_layers": cfg.model.num_layers})
    elif cfg.baseline == "random":
        ranks = random_ranks(targets, budget, cfg.seed, budget_text)
        rank_map = RankMap.from_ranks(targets, ranks, base_model=base, budget=budget,
                                      search={"baseline": "random", "seed": cfg.seed,
                                              "num_layers": cfg.model.num_layers})
    elif cfg.baseline == "gradient":
        if train_split is None:
            raise ValueError("--baseline gradient needs the training split to score on")
        logger.info("gradient baseline: scoring %d targets on the mean loss gradient of %d training batches",
                    len(targets), p.gradient_batches)
        spectra = gradient_spectra(model.to(device), targets, train_split, family, p.gradient_batches,
                                   cfg.data.batch_size, cfg.seed, device)
        ranks = gradient_ranks(targets, spectra, budget, budget_text)
        rank_map = RankMap.from_ranks(targets, ranks, base_model=base, budget=budget,
                                      search={"baseline": "gradient", "seed": cfg.seed,
                                              "gradient_batches": p.gradient_batches,
                                              "num_layers": cfg.model.num_layers})
    lora = LoraConfig(**rank_map.lora_config(p.scale, task_type=family.peft_task_type, modules_to_save=heads,
                                             dropout=p.lora_dropout,
                                             fan_in_fan_out=stores_fan_in_fan_out(model, targets)))
    peft_model = get_peft_model(model, lora)
    rank_map.check_built(peft_model)
    return peft_model, rank_map


FAMILY_COLUMNS = ("family", "text_pair_column", "choice_columns", "answer_column")  # what one family's data needs


def _task_from(rank_map: RankMap | None, data: DataConfig) -> None:
    """``--task`` not given: the task the rank map was searched on, with its columns (those fields still at
    their defaults); without a rank map, or with one that records no task, the built-in default."""
    recorded = rank_map.search.get("data") if rank_map else None
    if not recorded:
        data.task = DataConfig().task
        return
    if not isinstance(recorded, dict):
        raise RankMapError(f"rank map: search.data must be a mapping of data settings, got {recorded!r}")
    default, hints = DataConfig(), typing.get_type_hints(DataConfig)
    other_family = data.family != default.family and recorded.get("family") not in (None, data.family)
    for key in DATASET_FIELDS:
        if other_family and key in FAMILY_COLUMNS:  # the map's columns of another family would not apply
            continue
        if key in recorded and (key == "task" or getattr(data, key) == getattr(default, key)):
            setattr(data, key, coerce(recorded[key], hints[key], f"rank map search.data.{key}"))
    data.validate()
    logger.info("task from the rank map: %s", data.task)


def retrain_targets(model: nn.Module, cfg: RetrainConfig, rank_map: RankMap | None) -> list[Target]:
    """The modules to build adapters on.  A rank map names its own, whatever targeting flags its search
    was given; the retrain's own ``--model.target_*`` flags, when given, are checked against the map."""
    if rank_map is None or cfg.model.target_modules is not None or cfg.model.target_regex is not None:
        return find_targets(model, cfg.model)
    named = dataclasses.replace(cfg.model, target_regex="|".join(re.escape(name) for name in rank_map.modules))
    try:
        return find_targets(model, named)
    except ModelError:  # none of the map's modules exist here: check_against names the first one
        return find_targets(model, cfg.model)


def saved_adapter_params(folder: Path) -> int:
    """Adapter parameters stored in ``folder/adapter_model.safetensors`` (LoRA/AdaLoRA tensors only)."""
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if "lora_" in k)


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------
def run_retrain(cfg: RetrainConfig, command: str | None = None,
                on_step: Callable[[dict[str, Any]], None] | None = None) -> RetrainResult | None:
    """Train and evaluate one adapter into ``cfg.out`` (under torchrun: rank 0 returns it, others None).

    The rank map is checked against the model before any training; nothing is written when it does
    not fit.

    Raises:
        RankallocError: bad rank map, budget, data, model, config or run folder (one-line messages).
    """
    t0 = time.time()
    cfg = checked_copy(cfg, RetrainConfig)  # built in Python: the command line's types and checks, on a copy
    command = command or stage_command("retrain", cfg)
    rank_map = RankMap.load(cfg.rank_map) if cfg.rank_map else None  # format errors before any model work
    resolve_device(cfg.device)  # a device this machine lacks is refused before any model work
    if cfg.out:
        rundir.check_out_path(cfg.out)
        inputs = [("the run of --rank-map", Path(cfg.rank_map).parent)] if cfg.rank_map else []
        inputs += [("the run of --init-from", cfg.init_from)] if cfg.init_from else []
        rundir.check_out_outside(cfg.out, inputs)  # --overwrite would delete the search it reads
    elif cfg.resume:
        raise RunDirError("--resume needs --out, the folder of the run to continue (without --out every run "
                          "gets a new folder, runs/retrain-METHOD-BUDGET-seedN-TIME)")
    spec = parse_budget(cfg.budget) if cfg.budget else None
    if cfg.model.name == "auto":
        cfg.model.name = rank_map.base_model if rank_map else DEFAULT_MODEL
    if rank_map and cfg.model.num_layers is None:
        cfg.model.num_layers = coerce(rank_map.search.get("num_layers"), int | None, "rank map search.num_layers")
        cfg.model.validate()
    if cfg.data.task == "auto":
        _task_from(rank_map, cfg.data)
    method = cfg.baseline or "rank_map"

    dist_info = distributed.init(cfg.device)
    command = distributed.launched_command(command, dist_info)
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    task = prepare_task(cfg.data, tokenizer, cfg.seed, load_model_config(cfg.model), gate_split=False)
    model = load_model(cfg.model, task.num_labels, task.family, tokenizer.pad_token_id, task.label_names)
    targets = retrain_targets(model, cfg, rank_map)
    if rank_map is not None:
        rank_map.check_against(targets, source=f"--rank-map {cfg.rank_map}")
        searched_scale = rank_map.search.get("scale")
        if isinstance(searched_scale, (int, float)) and searched_scale != cfg.train.scale:
            logger.warning("the rank map was searched with --search.scale %s; retraining with --train.scale %s "
                           "(give --train.scale %s to train as searched)", searched_scale, cfg.train.scale,
                           searched_scale)
        budget, budget_text = rank_map.budget, None
        if rank_map.search.get("task") not in (None, task.name):
            logger.warning("the rank map was searched on task %s, retraining on %s", rank_map.search["task"],
                           task.name)
    else:
        budget, budget_text = spec.resolve(count_parameters(model)), spec.text
    steps = cfg.train.epochs * (len(task.train) // (cfg.data.batch_size * dist_info.world_size))
    steps = steps if cfg.max_steps is None else min(steps, cfg.max_steps)
    device = distributed.device_for(dist_info, resolve_device(cfg.device))
    set_seed(cfg.seed)
    t = time.time()
    peft_model, rank_map = build_adapter(cfg, model, targets, rank_map, budget, budget_text, steps, task.family,
                                         task.train, device)
    build_s = time.time() - t
    warm = warm_start(peft_model, cfg.init_from, rank_map) if cfg.init_from else None
    peft_model.to(device)

    out = Path(cfg.out) if cfg.out else rundir.default_out("retrain", f"{method}-{budget}", cfg.seed)
    meta = {"method": method, "budget": int(budget), "seed": cfg.seed, "steps": steps,
            "ranks": rank_map.ranks if rank_map else None, "world_size": dist_info.world_size,
            "init_from": str(Path(cfg.init_from).resolve()) if cfg.init_from else None,
            "data_fingerprint": task.fingerprint(),
            **{section: to_dict(getattr(cfg, section)) for section in ("model", "data", "train")}}

    out, resume = distributed.open_run_on_all(
        dist_info, out, overwrite=cfg.overwrite, resume=cfg.resume, command=command,
        load=lambda folder: load_resumable(folder / rundir.CHECKPOINT, meta, method, dist_info),
        step_of=lambda checkpoint: checkpoint["step"])
    wall = {"load": time.time() - t0 - build_s, "build": build_s}
    lr = cfg.train.adalora_lr if method == "adalora" else cfg.train.lr
    logger.info("retrain %s: %d targets, budget %d, %d steps (%d epochs of %d examples), lr %g, device %s, out %s",
                method, len(targets), budget, steps, cfg.train.epochs, len(task.train), lr, device, out)
    try:
        t = time.time()
        history = train(peft_model, task.train, steps, lr, cfg, device, method == "adalora", on_step, dist_info,
                        task.family, checkpoint=out / rundir.CHECKPOINT, resume=resume, meta=meta)
        wall["train"] = time.time() - t

        def evaluate_and_save() -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
            """Rank 0 alone (identical weights on every rank): evaluate, save, write the metrics."""
            t = time.time()
            logits, labels = predict(peft_model, task.eval, cfg.data.eval_batch_size, device, task.family)
            metric = task.family.primary_metric
            scores = {"metric": metric, **task.family.metrics(logits, labels, task.num_labels)}
            scores["score"] = scores[metric]
            wall["eval"] = time.time() - t
            logger.info("eval on %d examples: %s", len(labels),
                        "  ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float)))

            t = time.time()
            trained, adapter = describe_adapter(peft_model, method, targets, rank_map, budget, cfg)
            checks = save_outputs(out, cfg, peft_model, tokenizer, task, logits, device)
            trained.save(out / "rank_map.json")
            wall["save"] = time.time() - t
            wall["total"] = time.time() - t0

            metrics = {
                "method": method, "task": task.name, "family": task.family.name, "base_model": cfg.model.name,
                "label_names": list(task.label_names), **scores,
                "eval_examples": int(len(labels)), "train_examples": len(task.train), "steps": steps,
                "final_train_loss": float(np.mean([r["train_loss"] for r in history[-cfg.train.log_every:]])),
                **adapter, "budget": int(budget), "budget_used": adapter["adapter_params"] / budget,
                "ranks": trained.ranks, "warm_start": warm,
                "resumed_from_step": resume["step"] if resume else None,
                "checks": checks, "wall_time_s": wall, "peak_memory_mb": peak_memory(device),
                "device": str(device), "seed": cfg.seed, "world_size": dist_info.world_size,
                "recipe": to_dict(cfg.train) | {"lr_used": lr, "batch_size": cfg.data.batch_size,
                                                "max_length": cfg.data.max_length, "optimizer": "AdamW",
                                                "schedule": "linear warm-up, then linear decay to 0"},
                "config": to_dict(cfg), "rankalloc_version": __version__, "command": command,
            }
            io.write_json(out / "history.json", history)
            io.write_json(out / "metrics.json", metrics)
            (out / rundir.CHECKPOINT).unlink(missing_ok=True)  # the adapter holds the result now
            return metrics, logits, labels

        done = distributed.on_main(dist_info, evaluate_and_save, "rank 0 stopped while evaluating and saving "
                                   "(its error says why); this rank stops with it")
        if not dist_info.is_main:  # the others return once rank 0's outputs exist
            return None
        metrics, logits, labels = done
    except BaseException as e:
        if dist_info.is_main:
            rundir.fail_run(out, e, command=command)
        raise
    finally:
        distributed.shutdown(dist_info)
    rundir.finish_run(out, command=command)
    return RetrainResult(out, metrics, logits, labels)


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


DESCRIPTION = """Train a fixed-rank peft adapter from a rank map (or a baseline at the same budget) and evaluate it.

--model defaults to the rank map's base_model (minilm-l6 for baselines); --model.num_layers to the
searched one; --task (with its --data columns) to the task the rank map was searched on (tweets for
baselines).  A killed retrain resumes from its last checkpoint when rerun (--train.checkpoint_every).

examples:
  python -m rankalloc.retrain --rank-map runs/my-search/rank_map.json --merge
  python -m rankalloc.retrain --baseline uniform --budget 82944
  python -m rankalloc.retrain --baseline adalora --budget 82944 --config configs/retrain/default.yaml
"""


def cli(argv: list[str] | None = None) -> int:
    from .cli import command_line, progress_bar
    from .flags import parse_args

    cfg, _ = parse_args(RetrainConfig, argv, "rankalloc retrain", DESCRIPTION)
    bar, on_step = progress_bar(0, "retrain", enabled=sys.stderr.isatty() and os.environ.get("RANK", "0") == "0")

    def advance(row: dict[str, Any]) -> None:
        if not bar.total:  # the step count is known once the data is loaded
            bar.total = row["total_steps"]
        on_step(row)

    try:
        result = run_retrain(cfg, command_line("retrain", argv), advance)
    finally:
        bar.close()
    if result is None:  # a non-zero rank under torchrun
        return 0
    m = result.metrics
    print(f"{m['method']}: {m['metric']} {m['score']:.4f} with {m['adapter_params']:,} "
          f"adapter parameters ({100 * m['budget_used']:.2f}% of {m['budget']:,}); "
          f"adapter: {result.out / 'adapter'}, metrics: {result.out / 'metrics.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .cli import run_stage

    return run_stage("retrain", argv)


if __name__ == "__main__":
    sys.exit(main())
