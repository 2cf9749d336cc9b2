"""Retrain: fixed-rank peft adapters from a rank map, and the baselines, under one recipe.

``python -m rankalloc.retrain --rank-map RUN/rank_map.json`` builds ``LoraConfig(rank_pattern=...)``
from the rank map - layer ``l`` gets a plain LoRA of rank ``r_l``, ``W x + (alpha/r) B A x`` with
``alpha = scale * r`` - trains it from a fresh initialisation on every training example of the task
(the search's weight and gate splits together) and evaluates it on the task's evaluation split, which
the search never saw.  ``--baseline uniform|random|gradient|adalora --budget B`` trains the baselines with the very
same recipe (:class:`~rankalloc.config.TrainParams`); only the adapter shape differs (AdaLoRA also
keeps its own learning rate and budget schedule, as its authors tune it).

Outputs in ``--out``: ``adapter/`` (an ordinary peft adapter), ``metrics.json``, ``history.json``, ``rank_map.json``
(the ranks trained; for AdaLoRA the ranks it kept), ``merged/`` with ``--merge``, and ``status.json``; the
adapter and merged model are written and checked by :mod:`rankalloc.retrain_outputs`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import time
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import __version__, distributed, io, rundir
from .baselines import adalora_config, gradient_ranks, install_param_budget, random_ranks, uniform_rank
from .budget import parse_budget
from .config import DATASET_FIELDS, DEFAULT_TASK, SPLIT_FIELDS, DataConfig, RetrainConfig, with_data_defaults
from .flags import checked_copy, coerce, stage_command, to_dict
from .data import Split, prepare_task
from .tasks import recorded_data
from .errors import ConfigError, ModelError, RankMapError, RunDirError, first_line
from .families import Classification, Family
from .models import BUILTIN_MODELS, count_parameters, load_model, load_model_config, load_tokenizer, resolve_device
from .targets import Target, find_targets, fused_expert_weights, head_modules, stores_fan_in_fan_out
from .rank_map import RankMap, peft_as_named, peft_settings
from .retrain_loop import load_resumable, predict, train
from .sensitivity import gradient_spectra
from .training import RunClock, keeps_caller_rng, set_seed
from .retrain_outputs import describe_adapter, save_outputs
from .warm_start import warm_start

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "minilm-l6"


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
    from peft import LoraConfig

    heads = sorted(head_modules(model))
    p = cfg.train
    family = family or Classification()
    base = io.recorded_location(cfg.model.name, BUILTIN_MODELS)
    if cfg.baseline == "adalora":
        peft_model = _peft_model(model, adalora_config(targets, budget, steps, p, heads, budget_text,
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
    rank_map.peft = peft_settings(family.peft_task_type, heads, stores_fan_in_fan_out(model, targets),  # trained
                                  p.scale)
    lora = LoraConfig(**rank_map.lora_config(dropout=p.lora_dropout))
    peft_model = _peft_model(model, lora)
    rank_map.check_built(peft_model)
    return peft_model, rank_map


def _peft_model(model: nn.Module, config: Any) -> nn.Module:
    """``get_peft_model(model, config)``, with peft's refusal (a module its LoRA does not support on this
    architecture, a config it cannot build) as one line.

    Raises:
        ModelError: peft refused to build the adapter.
    """
    from peft import get_peft_model

    try:
        with warnings.catch_warnings(), peft_as_named():
            if getattr(config, "target_parameters", None):  # peft checks these keys against module names only,
                # not fused expert weights' names; check_built checks every rank peft applied
                warnings.filterwarnings("ignore", message=r".*(rank|alpha)_pattern keys did not match")
            return get_peft_model(model, config)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise ModelError(f"peft cannot build this adapter on {type(model).__name__}: {first_line(e)}") from None


FAMILY_COLUMNS = ("family", "text_pair_column", "choice_columns", "answer_column")  # what one family's data needs


def _task_from(rank_map: RankMap | None, data: DataConfig) -> None:
    """``--task`` not given: the task the rank map was searched on, with its columns (those fields still at
    their defaults); without a rank map, or with one that records no task, the built-in default."""
    recorded = rank_map.search.get("data") if rank_map else None
    if not recorded:
        data.task = DEFAULT_TASK
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
    _validate_from_map(data, "search.data")
    logger.info("task from the rank map: %s", data.task)


def _split_from(rank_map: RankMap, data: DataConfig) -> None:
    """``--task`` names the map's own task: its split settings not given are the search's."""
    recorded = rank_map.search.get("data")
    if isinstance(recorded, dict) and recorded.get("task") == recorded_data(data)["task"]:
        hints = typing.get_type_hints(DataConfig)
        for key in SPLIT_FIELDS:
            if getattr(data, key) is None and recorded.get(key) is not None:
                setattr(data, key, coerce(recorded[key], hints[key], f"rank map search.data.{key}"))
        _validate_from_map(data, "search.data")


def _validate_from_map(section: Any, where: str) -> None:
    """``section.validate()`` once values of the rank map are in: the flags given were checked already, so
    a value out of range came from the map, and the message says so.

    Raises:
        RankMapError: naming the map's field (``where``) and the flag that overrides it.
    """
    try:
        section.validate()
    except ConfigError as e:
        raise _as_the_maps(where, e, "the flag") from None


def _as_the_maps(field: str, error: Exception, flag: str) -> RankMapError:
    """``error``, caused by a value the rank map's ``field`` gave, named as the map's (``flag`` overrides it)."""
    return RankMapError(f"rank map {field}: {error} (a value recorded in the rank map; give {flag} to override it)")


def _warn_other_split(recorded: Any, data: DataConfig) -> None:
    """The map's task split with other settings: a task without its own evaluation split then holds out other
    examples, some of which the search trained on."""
    if not isinstance(recorded, dict):
        return
    differ = [f"--data.{k} {getattr(data, k)} (searched with {recorded[k]})" for k in SPLIT_FIELDS
              if k in recorded and recorded[k] != getattr(data, k)]
    if differ:
        logger.warning("this retrain splits the rank map's task otherwise than its search: %s; without an "
                       "evaluation split of its own the task's evaluation examples may include some the search "
                       "trained on (give the search's values to evaluate on examples it never saw)", ", ".join(differ))


def _record_trained_task(trained: RankMap, task: Any, cfg: RetrainConfig) -> None:
    """The retrain's rank map names the task it trained on (a baseline's map names none otherwise), so that a
    retrain from it takes that task and its columns; a map searched on another task keeps that one as
    ``searched_on``."""
    search = trained.search
    if search.get("task") not in (None, task.name):
        search["searched_on"] = {"task": search["task"], "data": search.get("data")}
    search.update({"task": task.name, "family": task.family.name, "data": recorded_data(cfg.data)})


def retrain_targets(model: nn.Module, cfg: RetrainConfig, rank_map: RankMap | None) -> list[Target]:
    """The modules to build adapters on.  A rank map names its own, whatever targeting flags its search
    was given; the retrain's own ``--model.target_*`` flags, when given, are checked against the map."""
    if rank_map is None:
        return find_targets(model, cfg.model)
    if cfg.model.target_modules is not None or cfg.model.target_regex is not None:
        targets = find_targets(model, cfg.model)
        chosen, flag = {t.name for t in targets}, ("--model.target_modules" if cfg.model.target_modules is not None
                                                   else "--model.target_regex")
        model_modules = {name for name, _ in model.named_modules()} | {n for n, _, _ in fused_expert_weights(model)}
        left_out = [name for name in rank_map.modules if name not in chosen and name in model_modules]
        if left_out:
            raise RankMapError(f"{flag} leaves out {left_out[0]}, which the rank map --rank-map {cfg.rank_map} "
                               f"gives rank {rank_map.modules[left_out[0]]['rank']} ({len(left_out)} such module(s)); "
                               "drop the flag: a rank map names its own modules")
        return targets
    named = dataclasses.replace(cfg.model, target_regex="|".join(re.escape(name) for name in rank_map.modules))
    try:
        return find_targets(model, named)
    except ModelError:  # none of the map's modules exist here: check_against names the first one
        return find_targets(model, cfg.model)


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------
@keeps_caller_rng
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
    from_map: dict[str, str] = {}  # flag -> the rank map's field it was taken from, for the messages
    if cfg.model.name == "auto":
        cfg.model.name = rank_map.base_model if rank_map else DEFAULT_MODEL
        from_map.update({"--model": "base_model"} if rank_map else {})
    if rank_map and cfg.model.num_layers is None:
        cfg.model.num_layers = coerce(rank_map.search.get("num_layers"), int | None, "rank map search.num_layers")
        _validate_from_map(cfg.model, "search.num_layers")
        from_map["--model.num_layers"] = "search.num_layers"
    elif rank_map and "num_layers" in rank_map.search:
        searched = coerce(rank_map.search["num_layers"], int | None, "rank map search.num_layers")
        deeper = searched is not None and (cfg.model.num_layers is None or cfg.model.num_layers > searched)
        if deeper:  # the blocks beyond the map's get no adapter (fewer: the check names a missing module)
            logger.warning("the rank map was searched on the first %d blocks, this retrain runs %s "
                           "(--model.num_layers): only the map's modules get adapters", searched,
                           f"the first {cfg.model.num_layers} blocks" if cfg.model.num_layers else "every block")
    if cfg.data.task == "auto":
        _task_from(rank_map, cfg.data)
    elif rank_map is not None:
        _split_from(rank_map, cfg.data)
    cfg.data = with_data_defaults(cfg.data)
    method = cfg.baseline or "rank_map"

    dist_info = distributed.init(cfg.device)
    command = distributed.launched_command(command, dist_info)
    set_seed(cfg.seed)
    try:
        tokenizer = load_tokenizer(cfg.model)
        task = prepare_task(cfg.data, tokenizer, cfg.seed, load_model_config(cfg.model), gate_split=False)
        model = load_model(cfg.model, task.num_labels, task.family, tokenizer.pad_token_id, task.label_names)
    except ModelError as e:  # a model setting the rank map gave: named as the map's
        flag = next((f for f in from_map if str(e).startswith(f + " ")), None)
        if flag is None:
            raise
        raise _as_the_maps(from_map[flag], e, flag) from None
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
            _warn_other_split(rank_map.search.get("data"), cfg.data)
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
    clock = RunClock(t0, device)  # the run's time and memory, over the processes of a resumed run
    if resume:
        clock.resume(resume)
    lr = cfg.train.adalora_lr if method == "adalora" else cfg.train.lr
    logger.info("retrain %s: %d targets, budget %d, %d steps (%d epochs of %d examples), lr %g, device %s, out %s",
                method, len(targets), budget, steps, cfg.train.epochs, len(task.train), lr, device, out)
    try:
        t = time.time()
        history = train(peft_model, task.train, steps, lr, cfg, device, method == "adalora", on_step, dist_info,
                        task.family, checkpoint=out / rundir.CHECKPOINT, resume=resume, meta=meta, clock=clock)
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
            _record_trained_task(trained, task, cfg)
            trained.save(out / "rank_map.json")
            wall["save"] = time.time() - t
            wall["total"] = clock.elapsed()  # with the earlier processes of a resumed run, up to its checkpoint
            if clock.resumed_from is not None:
                wall["earlier_processes"] = clock.earlier_s

            metrics = {
                "method": method, "task": task.name, "family": task.family.name, "base_model": cfg.model.name,
                "label_names": list(task.label_names), **scores,
                "eval_examples": int(len(labels)), "train_examples": len(task.train), "steps": steps,
                "final_train_loss": float(np.mean([r["train_loss"] for r in history[-cfg.train.log_every:]])),
                **adapter, "budget": int(budget), "budget_used": adapter["adapter_params"] / budget,
                "ranks": trained.ranks, "warm_start": warm,
                "resumed_from_step": clock.resumed_from,
                "checks": checks, "wall_time_s": wall, "peak_memory_mb": clock.peak(),
                "device": str(device), "seed": cfg.seed, "world_size": dist_info.world_size,
                "recipe": to_dict(cfg.train) | {"lr_used": lr, "batch_size": cfg.data.batch_size,
                                                "max_length": cfg.data.max_length, "optimizer": "AdamW",
                                                "max_steps": cfg.max_steps,  # a cap that cuts the epochs short
                                                "schedule": "linear warm-up, then linear decay to 0"},
                "config": to_dict(cfg), "rankalloc_version": __version__, "command": command,
            }
            io.write_json(out / "history.json", history)
            io.write_json(out / "metrics.json", metrics)
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
    # the adapter holds the result now: its checkpoint goes, but only once the status says done (killed
    # before that, the run resumes from it and ends the same, where a rerun could replace the result)
    rundir.finish_run(out, command=command, drop=(rundir.CHECKPOINT,))
    return RetrainResult(out, metrics, logits, labels)


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
