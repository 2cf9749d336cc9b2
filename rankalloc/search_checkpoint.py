"""The search's checkpoint: everything a killed search needs to continue the very same run (adapters,
gates, heads, the three optimisers, the schedule, the multiplier, both samplers and every rank's RNG
state), written atomically by rank 0 and checked against the settings of the run that resumes it."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import distributed, io, rundir
from .adapters import GatedModel
from .budget import parse_budget
from .config import SearchConfig
from .errors import RunDirError
from .flags import to_dict
from .targets import head_modules
from .training import RunClock, rng_state, set_rng_state

logger = logging.getLogger(__name__)


@dataclass
class SearchState:
    """Everything that changes during the search and is saved in a checkpoint."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    clock: RunClock = field(default_factory=RunClock)  # wall time and peak memory over every process of the run
    last_train_loss: float = float("nan")


def save_checkpoint(out: Path, cfg: SearchConfig, gated: GatedModel, state: SearchState,
                    opts: dict[str, Any], rngs: list[dict[str, Any]] | None = None,
                    data_fingerprint: str | None = None) -> None:
    """``rngs``: every rank's RNG state, in rank order (default: this process's, a single-process run);
    ``data_fingerprint``: the examples the run trains on, checked when it resumes."""
    rngs = rngs or [rng_state()]
    heads = {name: m.state_dict() for name, m in head_modules(gated.model).items()}
    io.save_torch(out / rundir.CHECKPOINT, {
        "config": to_dict(cfg), "step": state.step, "history": state.history,
        "adapters": gated.adapter_state(), "heads": heads,
        "weight_opt": opts["weight_opt"].state_dict(), "gate_opt": opts["gate_opt"].state_dict(),
        "sched": opts["sched"].state_dict(), "lagrangian": opts["lagrangian"].state_dict(),
        "weight_sampler": opts["weight_sampler"].state_dict(),
        "gate_sampler": opts["gate_sampler"].state_dict(), "rng": rngs, "world_size": len(rngs),
        "data_fingerprint": data_fingerprint, "clock": state.clock.state()})


def _budget_key(text: Any) -> tuple[float, bool]:
    spec = parse_budget(text)
    return spec.value, spec.percent


def load_checkpoint(out: Path, cfg: SearchConfig, gated: GatedModel, opts: dict[str, Any],
                    dist_info: distributed.DistInfo = distributed.DistInfo(),
                    data_fingerprint: str | None = None) -> SearchState:
    """The checkpoint in ``out`` restored into ``gated`` and ``opts``, checked to belong to this very run
    (``data_fingerprint``: :meth:`TaskData.fingerprint` of the examples it runs on).

    Raises:
        RunDirError: it was written with other settings, examples or number of processes, cannot be
            read, or this process cannot see the checkpoint rank 0 resumes from.
    """
    path = out / rundir.CHECKPOINT
    if not path.is_file():
        raise RunDirError(f"--resume: process {dist_info.rank} cannot see {path}, which process 0 resumes from; "
                          "give every process one shared --out")
    ckpt = rundir.read_checkpoint(path, ("config", "step", "adapters"), "search")
    saved = ckpt["config"]
    if "world_size" in ckpt:  # not recorded before per-rank RNG states were kept
        distributed.check_world_size(dist_info, ckpt["world_size"], out)
    for key, value_of in (("budget", _budget_key), ("seed", int)):  # 0.5M and 500k are the same budget
        if value_of(saved[key]) != value_of(getattr(cfg, key)):
            raise RunDirError(f"--resume: the run in {out} was started with --{key} {saved[key]}, not "
                              f"{getattr(cfg, key)}; use another --out or --overwrite")
    for section in ("model", "data", "search"):
        if saved[section] != to_dict(cfg)[section]:
            raise RunDirError(f"--resume: the run in {out} was started with other {section} settings; "
                              "use the same config, another --out, or --overwrite")
    saved_data = ckpt.get("data_fingerprint")  # older checkpoints did not record it
    if saved_data is not None and data_fingerprint is not None and saved_data != data_fingerprint:
        raise RunDirError(f"--resume: the run in {out} was started on other examples (the task's data changed "
                          "since); restore them, or use another --out or --overwrite")
    saved_max = saved.get("max_steps")
    saved_steps = saved["search"]["steps"] if saved_max is None else min(saved["search"]["steps"], saved_max)
    if saved_steps != cfg.steps():  # the budget ramp and the temperature schedule are fractions of the length
        raise RunDirError(f"--resume: the run in {out} was started for {saved_steps} steps, this one asks for "
                          f"{cfg.steps()}; give the same --max-steps, another --out, or --overwrite")
    shapes = {key: tuple(t.shape) for key, t in gated.adapter_state().items()}
    saved_shapes = {key: tuple(t.shape) for key, t in ckpt["adapters"].items()}
    if shapes != saved_shapes:  # a rankalloc whose targeting rules differ (fused experts, routers) from the run's
        differs = sorted({k.rsplit(".", 1)[0] for k in shapes.keys() | saved_shapes.keys()
                          if shapes.get(k) != saved_shapes.get(k)})
        raise RunDirError(f"--resume: the run in {out} adapted other targets than this rankalloc finds on the model "
                          f"(e.g. {differs[0]}); the targeting rules changed since it started: use another --out "
                          "or --overwrite")
    with torch.no_grad():
        for name, layer in gated.layers.items():
            layer.lora_A.copy_(ckpt["adapters"][f"{name}.lora_A"])
            layer.lora_B.copy_(ckpt["adapters"][f"{name}.lora_B"])
            layer.gates.log_alpha.copy_(ckpt["adapters"][f"{name}.log_alpha"])
    for name, module in head_modules(gated.model).items():
        module.load_state_dict(ckpt["heads"][name])
    for key in ("weight_opt", "gate_opt", "sched", "lagrangian", "weight_sampler", "gate_sampler"):
        opts[key].load_state_dict(ckpt[key])
    set_rng_state(distributed.own_rng_state(ckpt["rng"], dist_info))
    logger.info("resumed %s at step %d", out, ckpt["step"])
    clock = RunClock()
    clock.resume(ckpt)
    return SearchState(step=ckpt["step"], history=ckpt["history"], clock=clock)
