"""Small pieces shared by the search and the retrain loops: seeding, RNG state, batches, evaluation."""
from __future__ import annotations

import functools
import math
import random
import resource
import time
from typing import Any, Callable, Iterable, TypeVar

import numpy as np
import torch
from torch import nn

from .errors import DivergenceError

T = TypeVar("T")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from, so a resumed run continues the same random stream."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def keeps_caller_rng(stage: Callable[..., T]) -> Callable[..., T]:
    """``stage`` (which seeds the global RNGs from its config) leaves its caller's random streams as they were."""
    @functools.wraps(stage)
    def run(*args: Any, **kwargs: Any) -> T:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        try:
            return stage(*args, **kwargs)
        finally:
            set_rng_state(state)
    return run


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def check_finite(value: torch.Tensor | float, what: str, step: int, last_checkpoint: str | None) -> None:
    """Stop with one line naming the step, the value and the last good checkpoint."""
    v = float(value)
    if not math.isfinite(v):
        where = f"; last good checkpoint: {last_checkpoint}" if last_checkpoint else "; no checkpoint yet"
        raise DivergenceError(f"{what} became {v} at step {step}{where} (rerun with lower learning rates, "
                              "with --overwrite or another --out: a resume keeps the settings)")


def grads_finite(params: Iterable[nn.Parameter]) -> bool:
    """True when every gradient is finite; one device sync for all of them, not one per tensor."""
    checks = [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
    return bool(torch.stack(checks).all()) if checks else True


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device) -> dict[str, Any]:
    """Mean loss over ``batches`` (model in eval mode; ``model(**batch).loss``), weighted by examples, or
    by what the loss averages over when the output says (answer tokens of a causal LM)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        for batch in batches:
            batch = to_device(batch, device)
            out = model(**batch)
            k = out.weight if getattr(out, "weight", None) is not None else batch["input_ids"].shape[0]
            total += float(out.loss) * k
            n += k
    finally:
        model.train(was_training)
    return {"loss": total / max(n, 1), "n": n}


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak memory of this process so far, in MiB: resident set size, and CUDA allocations on a GPU."""
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    peak = {"cpu_rss": rss_kb / 1024}
    if device.type == "cuda":
        peak["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


class RunClock:
    """Wall time and peak memory of a run that may span several processes (killed, then resumed): what the
    earlier processes spent up to their last checkpoint, plus this process since ``started``.  A
    checkpoint carries :meth:`state`; :meth:`resume` takes it back."""

    def __init__(self, started: float | None = None, device: torch.device | None = None):
        self.started = time.time() if started is None else started
        self.device = device or torch.device("cpu")
        self.earlier_s = 0.0
        self.earlier_peak: dict[str, float] = {}
        self.resumed_from: int | None = None

    def resume(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("clock") or {}  # absent from checkpoints written before it was kept
        self.earlier_s = float(saved.get("elapsed_s", 0.0))
        self.earlier_peak = dict(saved.get("peak_memory_mb", {}))
        self.resumed_from = int(checkpoint["step"])

    def elapsed(self) -> float:
        return self.earlier_s + time.time() - self.started

    def peak(self) -> dict[str, float]:
        now = peak_memory(self.device)
        return {k: max(now.get(k, 0.0), self.earlier_peak.get(k, 0.0)) for k in {**self.earlier_peak, **now}}

    def state(self) -> dict[str, Any]:
        return {"elapsed_s": self.elapsed(), "peak_memory_mb": self.peak()}
