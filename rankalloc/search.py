"""The bilevel, budgeted rank search: ``python -m rankalloc.search --budget 0.5M``.

Each iteration of :func:`search_loop`:

1. weight step - a batch of the weight split updates LoRA A, B and the task head (gates sampled,
   no gradient to them);
2. gate step   - a batch of the held-out gate split updates the gates on
   ``L_val + lam * (C - T)/B + rho * ((C - T)/B)^2`` (adapter weights frozen);
3. dual step   - ``lam <- clip(lam + eta * (C - T)/B, 0, lam_max)``;

and, once the target has reached ``B``, each gate step is followed by a projection onto ``C = B``
(one common shift of all gate logits, found by bisection): plain dual ascent overshoots and
oscillates around the budget (measured: C/B 0.81 -> 1.01 -> 0.97 over the last 80 steps at 0.5M).

where ``C`` is the expected adapter cost and ``T`` the cost target, which falls from the initial
expected cost to the budget ``B`` over the first part of the search and then stays at ``B``.
Then the gate scores go through the exact knapsack (:mod:`rankalloc.discretize`) to integer ranks.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import __version__, distributed, io, rundir
from .adapters import GatedModel, trainable_only
from .budget import candidate_r_max, check_budget, parse_budget
from .config import SearchConfig, SearchParams, with_data_defaults
from .flags import checked_copy, stage_command, to_dict
from .data import EpochSampler, TaskData, prepare_task
from .discretize import discretize
from .errors import ConfigError, RunDirError
from .export import SCORES
from .gate_optimizer import make_gate_optimizer
from .gates import GATE_KINDS
from .lagrangian import Lagrangian
from .models import BUILTIN_MODELS, count_parameters, load_model, load_model_config, load_tokenizer, resolve_device
from .targets import Target, find_targets, head_modules, stores_fan_in_fan_out
from .rank_map import RankMap, peft_settings
from .search_checkpoint import SearchState, load_checkpoint, save_checkpoint
from .tasks import recorded_data
from .training import check_finite, evaluate, grads_finite, keeps_caller_rng, rng_state, set_seed, to_device

logger = logging.getLogger(__name__)

GAP_DRAWS = 4  # sampled-gate evaluations averaged for the relaxed side of the discretisation gap
GAP_SEED = 0

@dataclass
class SearchResult:
    out: Path
    rank_map: RankMap
    history: list[dict[str, Any]]
    gap: dict[str, float]
    summary: dict[str, Any]


# --------------------------------------------------------------------------------------------------
# The three steps
# --------------------------------------------------------------------------------------------------
def weight_step(gated: GatedModel, batch: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler | None = None,
                dist_info: distributed.DistInfo = distributed.DistInfo()) -> torch.Tensor:
    """One update of adapter weights and head on a training batch; gates are sampled but fixed."""
    opt.zero_grad(set_to_none=True)
    with trainable_only(gated.weight_parameters(), gated.gate_parameters()):
        out = gated(**batch)
        loss = distributed.token_weighted(out.loss, out.weight, dist_info)
        loss.backward()
    distributed.average_gradients(gated.weight_parameters(), dist_info)
    _refuse_non_finite(gated.weight_parameters(), opt, loss)
    opt.step()
    if sched is not None:
        sched.step()
    return loss.detach()


def gate_step(gated: GatedModel, batch: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
              lagrangian: Lagrangian | None, target: float,
              dist_info: distributed.DistInfo = distributed.DistInfo()) -> tuple[torch.Tensor, torch.Tensor]:
    """One update of the gates on a held-out batch; returns (held-out loss, expected cost).

    ``lagrangian`` None: the gate loss is the held-out loss alone (a projection holds the budget)."""
    opt.zero_grad(set_to_none=True)
    with trainable_only(gated.gate_parameters(), gated.weight_parameters()):
        out = gated(**batch)
        val_loss = distributed.token_weighted(out.loss, out.weight, dist_info)
        cost = gated.expected_cost()  # identical on every rank: the gates are
        gate_loss = val_loss if lagrangian is None else val_loss + lagrangian.term(cost, target)
        gate_loss.backward()
    distributed.average_gradients(gated.gate_parameters(), dist_info)
    _refuse_non_finite(gated.gate_parameters(), opt, val_loss)
    opt.step()
    gated.clamp_gates_()
    return val_loss.detach(), gated.expected_cost().detach()


def _refuse_non_finite(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """Never apply a non-finite update: drop the gradients and report the step as diverged."""
    if not (torch.isfinite(loss) and grads_finite(params)):
        opt.zero_grad(set_to_none=True)
        raise NonFiniteStep(float(loss.detach()))


class NonFiniteStep(FloatingPointError):
    """A step produced a non-finite loss or gradient (turned into DivergenceError by the loop)."""

    def __init__(self, loss: float) -> None:
        super().__init__(loss)
        self.loss = loss


def cost_target(step: int, initial: float, budget: float, start: int, ramp: int) -> float:
    """The cost target T: the initial expected cost until ``start``, linear to B over ``ramp`` steps."""
    if step < start:
        return initial
    if ramp <= 0 or step >= start + ramp:
        return float(budget)
    return initial + (budget - initial) * (step - start) / ramp


def _first_gate_step_at_budget(step: int, gate_every: int, warmup: int, initial: float, budget: float,
                               ramp: int) -> bool:
    """Whether the gate step after weight step ``step`` is the first whose cost target is the budget (a
    function of the step, so a resumed run restarts the gate moments at the same step)."""
    before = step - gate_every
    return before >= warmup and cost_target(before, initial, budget, warmup, ramp) != budget


def gate_temperature(step: int, p: SearchParams, steps: int, warmup: int | None = None) -> float:
    """The gate temperature at weight step ``step``: ``temperature`` until the first gate step (``warmup``,
    default ``p.warmup_steps``), then geometric to ``temperature_final`` at the last step (constant when
    that is null)."""
    if p.temperature_final is None:
        return p.temperature
    warmup = p.warmup_steps if warmup is None else warmup
    span = max(1, steps - 1 - warmup)
    frac = min(1.0, max(0.0, (step - warmup) / span))
    return p.temperature * (p.temperature_final / p.temperature) ** frac


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
def search_loop(cfg: SearchConfig, gated: GatedModel, task: TaskData, budget: int, device: torch.device,
                out: Path, state: SearchState, opts: dict[str, Any],
                on_step: Callable[[dict[str, Any]], None] | None = None,
                dist_info: distributed.DistInfo = distributed.DistInfo()) -> SearchState:
    """Alternate weight, gate and dual steps from ``state.step`` to the last step; checkpoint."""
    p = cfg.search
    steps, warmup = cfg.steps(), cfg.warmup_steps()
    weight_opt, gate_opt, sched = opts["weight_opt"], opts["gate_opt"], opts["sched"]
    lagr, weight_batches, gate_batches = opts["lagrangian"], opts["weight_sampler"], opts["gate_sampler"]
    initial_cost = p.gate_init * gated.max_cost()  # the expected cost before any gate step, either gates
    ramp = int(p.budget_warmup * steps)
    last_ckpt = str(out / rundir.CHECKPOINT) if (out / rundir.CHECKPOINT).is_file() else None
    data_fingerprint = task.fingerprint()  # a resume checks that it runs on the same examples
    gated.train()
    gated.set_gate_mode("sample")
    first_step = state.step  # of this process (a resume starts later)
    while state.step < steps:
        step = state.step
        gated.set_temperature(gate_temperature(step, p, steps, warmup))  # a function of the step: resumes exactly
        batch = to_device(task.weight.batch(distributed.shard(weight_batches.next(), dist_info)), device)
        try:
            loss = distributed.mean(weight_step(gated, batch, weight_opt, sched, dist_info), dist_info)
        except NonFiniteStep as e:
            check_finite(float("nan"), f"a weight step (loss {e.loss}) had a non-finite gradient; it", step,
                         last_ckpt)
        row = {"step": step + 1, "train_loss": float(loss), "val_loss": None, "lam": lagr.lam}
        if step >= warmup and (step + 1) % p.gate_every == 0:
            target = cost_target(step, initial_cost, budget, warmup, ramp)
            priced = p.lagrangian_at_budget or target != budget  # else the projection alone holds C = B
            if not priced and _first_gate_step_at_budget(step, p.gate_every, warmup, initial_cost, budget, ramp):
                gate_opt.state.clear()  # moments of cost-dominated gradients would freeze the loss-only steps
            gbatch = to_device(task.gate.batch(distributed.shard(gate_batches.next(), dist_info)), device)
            try:
                val_loss, cost = gate_step(gated, gbatch, gate_opt, lagr if priced else None, target, dist_info)
            except NonFiniteStep as e:
                check_finite(float("nan"), f"a gate step (held-out loss {e.loss}) had a non-finite gradient; it",
                             step, last_ckpt)
            val_loss = distributed.mean(val_loss, dist_info)
            check_finite(val_loss, "held-out loss", step, last_ckpt)
            if p.project_cost and (target == budget or p.project_ramp):  # projected gradient: C on target
                gated.project_cost_(target)
                cost = gated.expected_cost().detach()
            if priced:
                lagr.dual_step(float(cost), target)
            row.update(val_loss=float(val_loss), lam=lagr.lam, target_ratio=target / budget)
        row.setdefault("target_ratio", cost_target(step, initial_cost, budget, warmup, ramp) / budget)
        row["cost_ratio"] = float(gated.expected_cost().detach()) / budget
        state.history.append(row)
        state.step += 1
        if state.step % p.log_every == 0 or state.step == steps:
            logger.info("step %d/%d  loss %.4f  held-out %s  C/B %.3f  target/B %.3f  lambda %.4f",
                        state.step, steps, row["train_loss"],
                        "-" if row["val_loss"] is None else f"{row['val_loss']:.4f}",
                        row["cost_ratio"], row["target_ratio"], row["lam"])
        if on_step is not None:
            on_step(row)
        if (p.checkpoint_every and state.step % p.checkpoint_every == 0) or state.step == steps:
            rngs = distributed.gather(dist_info, rng_state())  # every rank's own random stream
            if dist_info.is_main:
                save_checkpoint(out, cfg, gated, state, opts, rngs, data_fingerprint)
            last_ckpt = str(out / rundir.CHECKPOINT)
    gated.set_temperature(gate_temperature(steps - 1, p, steps, warmup))  # scores are read at the final temperature
    if state.step > first_step:
        gated.warn_idle_targets()
    return state


# --------------------------------------------------------------------------------------------------
# Setup, checkpoints, discretisation and outputs
# --------------------------------------------------------------------------------------------------
def make_optimizers(cfg: SearchConfig, gated: GatedModel, budget: int, task: TaskData,
                    world_size: int = 1) -> dict[str, Any]:
    """Optimizers of the three parameter groups, and samplers of global batches (all ranks together)."""
    p = cfg.search
    global_batch = cfg.data.batch_size * world_size
    weight_opt = torch.optim.AdamW(gated.weight_parameters(), lr=p.weight_lr, weight_decay=0.0)
    warm = max(1, cfg.warmup_steps())
    sched = torch.optim.lr_scheduler.LambdaLR(weight_opt, lambda s: min(1.0, (s + 1) / warm))
    gate_opt = make_gate_optimizer(p.gate_optimizer, gated.gate_parameters(), p.gate_lr)
    return {"weight_opt": weight_opt, "gate_opt": gate_opt, "sched": sched,
            "lagrangian": Lagrangian(budget, p.lambda_lr, p.penalty),
            "weight_sampler": EpochSampler(len(task.weight), global_batch, cfg.seed, world_size),
            "gate_sampler": EpochSampler(len(task.gate), global_batch, cfg.seed + 1, world_size)}


def rank_scores(gated: GatedModel) -> list[list[float]]:
    return [gated.layers[t.name].gates.keep_prob().detach().cpu().tolist() for t in gated.targets]


def discretisation_gap(gated: GatedModel, task: TaskData, ranks: dict[str, int], examples: int,
                       batch_size: int, device: torch.device, draws: int = GAP_DRAWS) -> dict[str, float]:
    """Loss on the gate split under the search's own objective (gates sampled as in a gate step, the
    mean of ``draws`` draws with a fixed seed) vs with the hard rank map.

    The gate split is held out from the weight steps, not from the gate steps."""
    size = min(len(task.gate), examples)

    def gate_batches():
        for i in range(0, size, batch_size):
            yield task.gate.batch(np.arange(i, min(i + batch_size, size)))

    gated.set_hard_ranks(ranks)
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), gated.gate_mode("sample"):  # the search's RNG stream is left as it was
        torch.manual_seed(GAP_SEED)
        sampled = float(np.mean([evaluate(gated, gate_batches(), device)["loss"] for _ in range(draws)]))
    with gated.gate_mode("hard"):
        hard = evaluate(gated, gate_batches(), device)["loss"]
    return {"continuous_loss": sampled, "hard_loss": hard, "gap": hard - sampled, "examples": size,
            "draws": draws}


@keeps_caller_rng
def run_search(cfg: SearchConfig, command: str | None = None,
               on_step: Callable[[dict[str, Any]], None] | None = None) -> SearchResult | None:
    """Run a whole search into ``cfg.out`` and write the rank map, peft config and report.

    Under ``torchrun`` every rank runs this; rank 0 alone writes and returns the result (others: None).

    Raises:
        RankallocError: bad budget, data, model, config or run folder (one-line messages).
    """
    t0 = time.time()
    cfg = checked_copy(cfg, SearchConfig)  # built in Python: the command line's types and checks, on a copy
    spec = parse_budget(cfg.budget)  # a malformed budget is refused before any model work
    resolve_device(cfg.device)  # a device this machine lacks is refused before any model work
    command = command or stage_command("search", cfg)
    cfg.data = with_data_defaults(cfg.data)  # after the command, which says what was asked
    if cfg.resume and not cfg.out:
        raise RunDirError("--resume needs --out, the folder of the run to continue (without --out every run "
                          "gets a new folder, runs/search-BUDGET-seedN-TIME)")
    out = Path(cfg.out) if cfg.out else rundir.default_out("search", spec.text, cfg.seed)
    rundir.check_out_path(out)  # before any model work
    dist_info = distributed.init(cfg.device)
    command = distributed.launched_command(command, dist_info)
    set_seed(cfg.seed)  # the same seed on every rank: sampled gates agree across ranks
    tokenizer = load_tokenizer(cfg.model)
    task = prepare_task(cfg.data, tokenizer, cfg.seed, load_model_config(cfg.model))
    model = load_model(cfg.model, task.num_labels, task.family, tokenizer.pad_token_id, task.label_names)
    targets = find_targets(model, cfg.model)
    base_params = count_parameters(model)
    budget = spec.resolve(base_params)
    r_max = candidate_r_max(targets, budget, cfg.search.r_max)
    check_budget(budget, [t.cost_per_rank for t in targets], r_max.values(), spec.text,
                 full_ranks=[t.max_rank for t in targets])
    device = distributed.device_for(dist_info, resolve_device(cfg.device))
    p = cfg.search
    fused = [t.name for t in targets if t.experts]
    if fused and p.lora_dropout:
        raise ConfigError(f"--search.lora_dropout {p.lora_dropout} with fused expert weights ({fused[0]}, ...): "
                          "their update is added to the weight, where dropout on the input cannot act (nor can "
                          "peft's target_parameters); set it to 0, or leave them out with --model.target_regex")
    gated = GatedModel(model, targets, r_max, p.scale, p.lora_dropout, p.gate_init, p.temperature,
                       task.family, p.gates).to(device)
    opts = make_optimizers(cfg, gated, budget, task, dist_info.world_size)
    out, state = distributed.open_run_on_all(
        dist_info, out, overwrite=cfg.overwrite, resume=cfg.resume, command=command,
        load=lambda folder: load_checkpoint(folder, cfg, gated, opts, dist_info, task.fingerprint()),
        step_of=lambda s: s.step)
    state = state or SearchState()
    state.clock.started, state.clock.device = t0, device  # this process's share of the run
    logger.info("search: %d targets, budget %s = %d parameters, r_max %d, %d steps, device %s, out %s",
                len(targets), spec.text, budget, max(r_max.values()), cfg.steps(), device, out)
    try:
        state = search_loop(cfg, gated, task, budget, device, out, state, opts, on_step, dist_info)
        result = distributed.on_main(  # rank 0 alone discretises and writes; the others wait for its files
            dist_info, lambda: finish(cfg, gated, task, targets, r_max, budget, base_params, device, out, state,
                                      opts, command, dist_info.world_size),
            "rank 0 stopped while writing the results (its error says why); this rank stops with it")
        if not dist_info.is_main:
            return None
    except BaseException as e:
        if dist_info.is_main:
            rundir.fail_run(out, e, command=command)
        raise
    rundir.finish_run(out, command=command)
    return result


def finish(cfg: SearchConfig, gated: GatedModel, task: TaskData, targets: list[Target], r_max: dict[str, int],
           budget: int, base_params: int, device: torch.device, out: Path, state: SearchState, opts: dict[str, Any],
           command: str, world_size: int = 1) -> SearchResult:
    """Discretise, measure the gap (on ``gap_batches`` global batches), and write scores, rank map, peft
    config and report."""
    scores = rank_scores(gated)
    ranks_list = discretize(scores, [t.cost_per_rank for t in targets], budget, rounding=cfg.search.rounding)
    ranks = {t.name: r for t, r in zip(targets, ranks_list)}
    gap = discretisation_gap(gated, task, ranks, cfg.search.gap_batches * cfg.data.batch_size * world_size,
                             cfg.data.eval_batch_size, device)
    lam = opts["lagrangian"].lam
    final_ratio = state.history[-1]["cost_ratio"] if state.history else float("nan")
    base_model = io.recorded_location(cfg.model.name, BUILTIN_MODELS)
    heads = sorted(head_modules(gated.model))
    fan_in_fan_out = stores_fan_in_fan_out(gated.model, targets)
    rm = RankMap.from_ranks(targets, ranks, base_model=base_model, budget=budget, peft=peft_settings(
        task.family.peft_task_type, heads, fan_in_fan_out, cfg.search.scale), search={
        "task": task.name, "family": task.family.name, "seed": cfg.seed, "steps": state.step, "final_lambda": lam,
        "final_cost_ratio": final_ratio, "r_max": max(r_max.values()), "scale": cfg.search.scale,
        "rounding": cfg.search.rounding, "gates": cfg.search.gates,
        "num_layers": cfg.model.num_layers, "rankalloc_version": __version__,
        "data": recorded_data(cfg.data)})
    io.write_json(out / SCORES, {
        "format": "rankalloc.scores", "version": 2 if any(t.experts for t in targets) else 1, "base_model": base_model,
        "model_fingerprint": rm.model_fingerprint, "searched_budget": budget, "base_params": base_params, "scale": cfg.search.scale,
        "modules_to_save": heads, "peft_task_type": task.family.peft_task_type, "search": rm.search,
        "fan_in_fan_out": fan_in_fan_out,
        "config": to_dict(cfg),
        "modules": [{"name": t.name, "in_features": t.in_features, "out_features": t.out_features,
                     "layer": t.layer, "kind": t.kind, "r_max": r_max[t.name], "scores": s,
                     **({"experts": t.experts} if t.experts else {})}
                    for t, s in zip(targets, scores)]})
    io.write_json(out / "history.json", state.history)
    from .report import write_search_report

    summary = {"budget": budget, "total_params": rm.total_params,
               "head_params": sum(p.numel() for m in head_modules(gated.model).values() for p in m.parameters()),
               "base_model": cfg.model.name, "task": task.name, "label_names": list(task.label_names),
               "seed": cfg.seed, "world_size": world_size, "steps": state.step, "warmup_steps": cfg.warmup_steps(),
               "final_lambda": lam, "final_cost_ratio": final_ratio, "wall_time_s": state.clock.elapsed(),
               "resumed_from_step": state.clock.resumed_from,
               "gap": gap, "command": command, "r_max": max(r_max.values()),
               "gates": GATE_KINDS[cfg.search.gates].description, "peak_memory_mb": state.clock.peak(),
               "gate_loss_at_budget": ("held-out loss + Lagrangian" if cfg.search.lagrangian_at_budget else
                                       "held-out loss alone (λ frozen from the first step at the budget)")}
    write_search_report(out, targets=targets, ranks=ranks, r_max=r_max, history=state.history, summary=summary)
    rm.write_adapter_config(out / "adapter_config.json")  # as the map records it (its peft section)
    io.write_json(out / "summary.json", summary)
    rm.save(out / "rank_map.json")  # last: its presence means every other output is there
    logger.info("rank map: %d / %d parameters (%.2f%% of the budget), gap %.4f -> %s",
                rm.total_params, budget, 100 * rm.total_params / budget, gap["gap"], out / "rank_map.json")
    return SearchResult(out, rm, state.history, gap, summary)


DESCRIPTION = """Learn per-layer LoRA ranks under a parameter budget and write a rank map.

example:
  python -m rankalloc.search --budget 0.5M
  python -m rankalloc.search --config configs/search/smoke.yaml --budget 20k --out runs/smoke
"""


def cli(argv: list[str] | None = None) -> int:
    from .cli import command_line, progress_bar
    from .flags import parse_args

    cfg, _ = parse_args(SearchConfig, argv, "rankalloc search", DESCRIPTION)
    main_rank = os.environ.get("RANK", "0") == "0"
    bar, on_step = progress_bar(cfg.steps(), "search", enabled=sys.stderr.isatty() and main_rank)
    try:
        result = run_search(cfg, command_line("search", argv), on_step)
    finally:
        bar.close()
    if result is None:
        return 0
    rm = result.rank_map
    print(f"rank map: {result.out / 'rank_map.json'}  ({rm.total_params:,} / {rm.budget:,} parameters, "
          f"{100 * rm.total_params / rm.budget:.2f}% of the budget; report: {result.out / 'report.md'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .cli import run_stage

    return run_stage("search", argv)


if __name__ == "__main__":
    sys.exit(main())
