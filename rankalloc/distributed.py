"""Data parallelism through ``torch.distributed``, for runs launched by ``torchrun`` or ``accelerate launch``.

The launcher sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; without them everything here is a no-op
and a run is a plain single process.  The scheme keeps the search loop unchanged:

* every rank draws the same *global* batch of ``world_size * b`` examples (the samplers share a seed)
  and takes its own slice of ``b``; gradients are averaged with one ``all_reduce`` per step, so a run
  with N processes and per-rank batch b takes the same steps as one process with batch N*b (a loss that
  averages answer tokens is first weighted by the rank's share of the tokens: ``token_weighted``);
* the weights, gates and the multiplier, updated from identical averaged gradients and costs, stay
  identical on every rank; every rank seeds its RNG alike, but dropout and gate samples may differ
  between ranks (a rank's slice is padded to its own length), which only adds Monte Carlo samples;
* only rank 0 writes files and shows progress, and decides whether to resume; a checkpoint keeps every
  rank's RNG state, so a resumed run continues each rank's own random stream.

We all-reduce gradients ourselves rather than wrap the model in ``DistributedDataParallel``: the
search alternates two parameter groups with different batches, which DDP's single-graph bucketing
(``find_unused_parameters``, ``no_sync``) handles only awkwardly.
"""
from __future__ import annotations

import atexit
import datetime
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import torch
import torch.distributed as dist

from . import rundir
from .errors import ConfigError, RunDirError

logger = logging.getLogger(__name__)
T = TypeVar("T")


TIMEOUT_ENV = "RANKALLOC_DIST_TIMEOUT_S"  # seconds a rank waits in a collective (rank 0 alone writes outputs)
DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device_spec: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """Join the process group if a launcher started us; pick gloo on CPU and NCCL on GPU.

    The group stays for the rest of the process (ended at exit), so that a script may run one stage
    after another on every rank: ending a group and starting the next on the same launcher store races.
    A group the caller made is used as it is.  ``timeout_s`` (default ``$RANKALLOC_DIST_TIMEOUT_S``, else
    30 minutes) bounds every wait, including the other ranks' wait while rank 0 alone evaluates and writes.

    Raises:
        ConfigError: ``$RANKALLOC_DIST_TIMEOUT_S`` is not a positive number.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_spec != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s or _timeout_from_env()))
        atexit.register(_end_group)
    info = DistInfo(rank, world, local)
    quiet = logging.getLogger("rankalloc")
    if not info.is_main and quiet.getEffectiveLevel() < logging.WARNING:  # one voice: rank 0 logs, the
        quiet.setLevel(logging.WARNING)  # others only warn, for as long as the process (and its group) lasts
    logger.info("distributed: %d processes, backend %s", world, dist.get_backend())
    return info


def _timeout_from_env() -> float:
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise ConfigError(f"${TIMEOUT_ENV}={text!r} is not a timeout; allowed: a positive number of seconds")
    return seconds


def _end_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def launched_command(command: str, info: DistInfo) -> str:
    """``command`` (``python -m rankalloc.STAGE ...``) as the launcher ran it: under torchrun, with its
    process count, since the global batch and each process's random stream depend on it."""
    if not info.enabled or not command.startswith("python -m "):
        return command
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    nodes = f"--nnodes {info.world_size // per_node} " if per_node != info.world_size else ""
    return f"torchrun {nodes}--nproc_per_node {per_node} -m " + command[len("python -m "):]


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """On GPU, rank r uses the local GPU ``LOCAL_RANK``."""
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def shard(indices, info: DistInfo):
    """This rank's slice of a global batch of indices (equal slices; the global batch divides evenly)."""
    if not info.enabled:
        return indices
    per = len(indices) // info.world_size
    return indices[info.rank * per:(info.rank + 1) * per]


def average_gradients(params: Iterable[torch.nn.Parameter], info: DistInfo) -> None:
    """Average the gradients of ``params`` over ranks with a single flattened all-reduce."""
    if not info.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def token_weighted(loss: torch.Tensor, weight: float | None, info: DistInfo) -> torch.Tensor:
    """This rank's ``loss``, a mean over its ``weight`` units (answer tokens), rescaled by its share of all
    ranks' units: averaging the rescaled losses (and their gradients) over ranks then gives the mean over every
    unit of the global batch, as one process would, not a mean of the ranks' means.  A loss that averages
    examples (``weight`` None: every rank holds the same number) is returned as it is."""
    if not info.enabled or weight is None:
        return loss
    total = torch.tensor([float(weight)], dtype=torch.float64, device=loss.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    if total.item() <= 0:
        return loss
    return loss * (float(weight) * info.world_size / total.item())


def mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a scalar over ranks (for logging losses)."""
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def on_main(info: DistInfo, fn: Callable[[], T],
            others: str = "rank 0 stopped before training (its error says why); this rank stops with it") -> T | None:
    """Run ``fn`` on rank 0 alone (e.g. open the run folder) and return its result there (None elsewhere).

    Every rank learns whether it succeeded, so that when rank 0 fails with a user error (a refused
    ``--out``) the others stop at once with ``others``, instead of waiting at a barrier for the
    process-group timeout.  Doubles as the barrier after ``fn``: no rank returns before rank 0's outputs
    exist (a script that runs the next stage on every rank finds them).
    """
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except Exception as e:  # re-raised below, after the other ranks have been told
            error = e
    stop_together(info, error, others)
    return result


def stop_together(info: DistInfo, error: Exception | None,
                  others: str = "another rank stopped (its error says why); this rank stops with it") -> None:
    """Raise on every rank when any rank has ``error``: its own error where there is one, else ``others``.

    A collective: every rank calls it at the same point."""
    if info.enabled:
        device = torch.device("cuda", info.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
        failed = torch.tensor([0.0 if error is None else 1.0], device=device)
        dist.all_reduce(failed)
        if failed.item() and error is None:
            raise RunDirError(others)
    if error is not None:
        raise error


def broadcast(info: DistInfo, value: T) -> T:
    """Rank 0's ``value`` on every rank (decisions only rank 0 may take, such as whether to resume)."""
    if not info.enabled:
        return value
    box = [value if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(info: DistInfo, value: T) -> list[T]:
    """Every rank's ``value``, in rank order, on every rank (e.g. each rank's RNG state for a checkpoint)."""
    if not info.enabled:
        return [value]
    values: list = [None] * info.world_size
    dist.all_gather_object(values, value)
    return values


def check_world_size(info: DistInfo, saved: int, out: Any) -> None:
    """Raises: RunDirError when a checkpoint in ``out`` was written by another number of processes."""
    if int(saved) != info.world_size:
        raise RunDirError(f"--resume: the run in {out} was started on {saved} process(es), this one has "
                          f"{info.world_size}; resume with {saved} (the global batch and each process's random "
                          "stream depend on it), another --out, or --overwrite")


def check_same_step(info: DistInfo, step: int, out: Any) -> None:
    """Raises on every rank: RunDirError when the ranks resumed from different steps (a collective)."""
    steps = gather(info, int(step))
    if len(set(steps)) > 1:
        raise RunDirError(f"--resume: the processes found checkpoints of different steps in {out} ({steps}); "
                          "give every process one shared --out")


def own_rng_state(saved: Any, info: DistInfo) -> Any:
    """This rank's RNG state from a checkpoint's ``rng``: one state per rank (a list), or one for all."""
    return saved[info.rank] if isinstance(saved, list) else saved


def open_run_on_all(info: DistInfo, out: Path, *, overwrite: bool, resume: bool, command: str,
                    load: Callable[[Path], T], step_of: Callable[[T], int]) -> tuple[Path, T | None]:
    """Open the run folder ``out`` for every rank and mark the run started; return it and the loaded
    checkpoint (None for a fresh run).

    Rank 0 alone opens the folder (``rundir.open_run``) and decides whether to resume; then every rank
    loads the shared checkpoint with ``load`` (all stop if one cannot, or if they found different steps),
    and only then does rank 0 mark the run running, so a refused resume leaves the folder's status as it
    was.  Rank 0 lets go of the folder if any of this fails.
    """
    opened = on_main(info, lambda: rundir.open_run(out, overwrite=overwrite, resume=resume))
    has_checkpoint = None
    if info.is_main:
        out, has_checkpoint = opened
    try:
        loaded = None
        if broadcast(info, has_checkpoint):  # rank 0 decides
            error = None
            try:
                loaded = load(out)
            except Exception as e:  # e.g. a refused or unreadable checkpoint on one node: all stop, not hang
                error = e
            stop_together(info, error)
            check_same_step(info, step_of(loaded), out)
        on_main(info, lambda: rundir.start_run(out, command=command))  # a folder in use stops every rank
    except BaseException:
        if info.is_main:
            rundir.release(out)
        raise
    return out, loaded

