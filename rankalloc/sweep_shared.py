"""The sweep's budgets (``--budgets 41k,83k`` or ``40k:400k:4``), the command line that reproduces a
stage, and the shared search that every rankalloc budget is re-exported from."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from . import io
from .budget import auto_r_max, candidate_r_max, check_budget, parse_budget
from .config import SearchConfig, SweepConfig, with_data_defaults
from .flags import stage_command, to_dict
from .errors import BudgetError, ConfigError

logger = logging.getLogger(__name__)

SHARED_SEARCH_FILE = "shared_search.json"


# --------------------------------------------------------------------------------------------------
# Budgets and commands
# --------------------------------------------------------------------------------------------------
def parse_budgets(items: list[str]) -> list[int]:
    """``["41k", "83k"]`` or ``["40k:400k:4"]`` (N log-spaced budgets from LO to HI) -> sorted parameter counts.

    Raises:
        BudgetError: an unparsable budget or range, or a percentage (a sweep's axis is parameter counts).
    """
    out: set[int] = set()
    for item in items:
        parts = str(item).split(":")
        if len(parts) == 3:
            lo, hi, n = _absolute(parts[0], item), _absolute(parts[1], item), parts[2].strip()
            if not n.isdigit() or int(n) < 1 or lo >= hi and int(n) > 1:
                raise BudgetError(f"--budgets {item}: a range is LO:HI:N with LO < HI and N >= 1 budgets, "
                                  "e.g. 40k:400k:4")
            n = int(n)
            out.update(lo if n == 1 else round(lo * (hi / lo) ** (i / (n - 1))) for i in range(n))
        elif len(parts) == 1:
            out.add(_absolute(parts[0], item))
        else:
            raise BudgetError(f"--budgets {item!r}: give budgets (41k,83k) or a range LO:HI:N (40k:400k:4)")
    return sorted(out)


def _absolute(text: str, item: str, flag: str = "--budgets") -> int:
    spec = parse_budget(text, flag)
    if spec.percent:
        raise BudgetError(f"--budgets {item}: give parameter counts (500k, 0.5M), not a share of the model")
    return int(spec.value)


# --------------------------------------------------------------------------------------------------
# The shared search
# --------------------------------------------------------------------------------------------------
@dataclass
class SharedSearch:
    path: str
    budget: int
    r_max: int
    wall_time_s: float
    command: str


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` held by this process (released by the kernel if it dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for the shared search that another worker is running (%s)", path.parent)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _target_costs(cfg: SweepConfig) -> list[int]:
    from .models import skeleton_targets

    return [t.cost_per_rank for t in skeleton_targets(cfg.model)]


def shared_budget(cfg: SweepConfig, budgets: list[int]) -> int:
    """The budget of the shared search.  Re-exports are trustworthy near the searched budget and the
    trust falls with the log-ratio either way (export.TRUSTED_RATIO is symmetric), so the geometric
    middle of the budgets minimises the largest ratio: every budget lies within sqrt(max/min) of it."""
    if cfg.shared_budget == "geomean":
        return int(round(math.sqrt(budgets[0] * budgets[-1])))
    if cfg.shared_budget == "max":
        return budgets[-1]
    try:
        return _absolute(cfg.shared_budget, cfg.shared_budget, "--shared_budget")
    except BudgetError as e:
        raise ConfigError(f"--shared_budget must be geomean, max or a budget such as 100k; {e}") from None


def check_shared_budgets(cfg: SweepConfig, budgets: list[int]) -> None:
    """Before anything runs: the shared search's budget must be searchable and every budget exportable from
    it (its candidate ranks come from the largest budget), or the sweep would stop after the search.

    Raises:
        BudgetError: naming the flag and the allowed range.
    """
    from .models import skeleton_targets

    targets = skeleton_targets(cfg.model)
    costs = [t.cost_per_rank for t in targets]
    caps = list(candidate_r_max(targets, budgets[-1], cfg.search.r_max).values())
    for flag, b in [("--shared_budget", shared_budget(cfg, budgets))] + [("--budgets", b) for b in budgets]:
        check_budget(b, costs, caps, flag=flag, full_ranks=[t.max_rank for t in targets])


def _shared_path(out: Path, recorded: str) -> Path:
    """The shared search's folder: recorded relative to the sweep folder (older records: as given)."""
    inside = out / recorded
    return inside if not Path(recorded).is_absolute() and (inside / "scores.json").is_file() else Path(recorded)


def check_shared_search(cfg: SweepConfig, out: Path, budgets: list[int]) -> None:
    """Refuse, before a study is opened, a sweep that the shared search already in ``out`` cannot serve
    (other settings, or a budget it cannot be exported at): a refused sweep leaves nothing behind.

    Raises:
        ConfigError, BudgetError: as :func:`run_shared_search` would.
    """
    if (out / SHARED_SEARCH_FILE).is_file():
        _check_exportable(*_recorded_shared_search(cfg, out, budgets), budgets)


def _recorded_shared_search(cfg: SweepConfig, out: Path, budgets: list[int]) -> tuple[SharedSearch, Any]:
    """The shared search recorded in ``out`` and its scores, checked to be the one this sweep asks for."""
    from .export import Scores

    shared = SharedSearch(**json.loads((out / SHARED_SEARCH_FILE).read_text()))
    shared.path = str(_shared_path(out, shared.path))
    scores = Scores.load(shared.path)
    cfg_dict = to_dict(dataclasses.replace(cfg, data=with_data_defaults(cfg.data)))  # as the search records it
    saved = scores.data["config"]
    for key in ("seed", "max_steps", "model", "data", "search"):
        old, new = saved[key], cfg_dict[key]
        if key == "search":  # r_max is the sweep's choice (from the largest budget): compared below
            old, new = {**old, "r_max": None}, {**new, "r_max": None}
        if old != new:
            raise ConfigError(f"the shared search in {shared.path} was run with other {key} settings; "
                              "use the same settings, another --out, or --overwrite")
    # a study may grow by budgets and reuse its search; settings the user gave must match it
    asked = {"--search.r_max": (cfg.search.r_max, shared.r_max)}
    if cfg.shared_budget not in ("geomean", "max"):
        asked["--shared_budget"] = (shared_budget(cfg, budgets), shared.budget)
    for flag, (given, ran) in asked.items():
        if given is not None and given != ran:
            raise ConfigError(f"the shared search in {shared.path} ran with {flag} {ran}, not {given}; use "
                              f"{flag} {ran}, another --out, or --overwrite")
    return shared, scores


def _check_exportable(shared: SharedSearch, scores: Any, budgets: list[int]) -> None:
    caps = [scores.r_max[t.name] for t in scores.targets]
    for b in budgets:
        try:
            check_budget(b, [t.cost_per_rank for t in scores.targets], caps,
                         full_ranks=[t.max_rank for t in scores.targets])
        except BudgetError as e:
            raise BudgetError(f"--budgets {b:,}: cannot be exported from the shared search in {shared.path} "
                              f"(r_max {shared.r_max}): {str(e).split(' is ', 1)[-1]}") from None


def run_shared_search(cfg: SweepConfig, out: Path, budgets: list[int]) -> SharedSearch:
    """Run the search every budget is re-exported from, once per sweep folder: a file lock makes
    concurrent workers wait for it, and a finished one (same settings) is reused.  Its largest rank
    is set from the *largest* budget, so that every budget can be exported from it.

    Raises:
        ConfigError: the folder holds a shared search run with other settings.
        BudgetError: a budget cannot be exported from it.
    """
    from .export import TRUSTED_RATIO, Scores
    from .search import run_search

    record = out / SHARED_SEARCH_FILE
    with _file_lock(out / ".shared_search.lock"):
        if record.is_file():
            shared, scores = _recorded_shared_search(cfg, out, budgets)
            far = [b for b in budgets if not TRUSTED_RATIO[0] <= b / shared.budget <= TRUSTED_RATIO[1]]
            if far:
                logger.warning("budgets %s lie beyond %gx-%gx of the shared search's %s parameters; their re-exports "
                               "are less trustworthy (see each export.md)", ", ".join(f"{b:,}" for b in far),
                               *TRUSTED_RATIO, f"{shared.budget:,}")
            logger.info("reusing the shared search in %s (budget %d, r_max %d)", shared.path, shared.budget,
                        shared.r_max)
        else:
            budget = shared_budget(cfg, budgets)
            r_max = cfg.search.r_max or auto_r_max(budgets[-1], _target_costs(cfg))
            search_cfg = SearchConfig(budget=str(budget), seed=cfg.seed, device=cfg.device,
                                      out=str(out / "search"), max_steps=cfg.max_steps,
                                      model=copy.deepcopy(cfg.model), data=copy.deepcopy(cfg.data),
                                      search=dataclasses.replace(cfg.search, r_max=r_max))
            from . import rundir

            folder = Path(search_cfg.out)
            if folder.is_dir() and any(folder.iterdir()) and (not (folder / rundir.CHECKPOINT).is_file()
                                                              or rundir.status_done(folder)):
                # a crashed start without a checkpoint holds nothing to keep; a search that finished just
                # before its record was written is run again (the old one kept aside until then)
                search_cfg.overwrite = True
            command = stage_command("search", search_cfg)
            logger.info("shared search at %d parameters (r_max %d) for budgets %s -> %s", budget, r_max,
                        ", ".join(f"{b:,}" for b in budgets), folder)
            t0 = time.time()
            run_search(search_cfg, command)
            shared = SharedSearch(str(folder), budget, r_max, time.time() - t0, command)
            # recorded relative to the sweep folder: a rerun from another directory, or another machine that
            # mounts the folder elsewhere, finds it
            io.write_json(record, {**dataclasses.asdict(shared), "path": "search"})
            scores = Scores.load(shared.path)
    _check_exportable(shared, scores, budgets)
    return shared
