"""Re-export a finished search at another budget or rank cap, in seconds and without a new search.

``python -m rankalloc.export --run RUN --budget 0.3M [--max-rank 16]`` reads the learned gate scores
that the search kept in ``RUN/scores.json`` and runs the same exact knapsack at the new budget.

When is a re-export trustworthy?  The scores were learned while the expected cost was held at the
searched budget, so they rank components well *near* that budget.  Far from it (we flag ratios
outside [0.5, 2]) the order of components that the search never had to choose between is weakly
determined; run a new search there if the point matters.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import io, rundir
from .budget import check_budget, parse_budget
from .config import ExportConfig
from .discretize import ROUNDINGS, discretize
from .errors import RankMapError, RunDirError
from .flags import checked_copy
from .targets import Target
from .rank_map import RankMap, checked_peft, peft_settings

SCORES = "scores.json"
TRUSTED_RATIO = (0.5, 2.0)
EXPORT_MARKER = ".rankalloc_export"  # written first, so that an export killed midway can be overwritten
EXPORT_MARKS = (EXPORT_MARKER, "export.md")  # an export folder holds one of these (a rank_map.json alone may be anyone's)

logger = logging.getLogger(__name__)


@dataclass
class Scores:
    """What a search leaves for the discretiser: per-module component scores and shapes."""

    targets: list[Target]
    r_max: dict[str, int]
    scores: dict[str, list[float]]
    data: dict[str, Any]

    @classmethod
    def load(cls, run: str | Path, flag: str = "--run") -> "Scores":
        """Raises: RunDirError (naming ``flag``) when ``run`` holds no finished search."""
        path = Path(run) / SCORES
        if not path.is_file():
            raise RunDirError(f"{flag} {run}: no {SCORES} there, so it is not a finished search folder")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunDirError(f"{flag} {run}: {SCORES} is not valid JSON ({e})") from None
        if not isinstance(data, dict) or data.get("format") != "rankalloc.scores" or data.get("version") not in (1, 2):
            data = data if isinstance(data, dict) else {}
            raise RunDirError(f"{flag} {run}: {SCORES} has format {data.get('format')!r} version "
                              f"{data.get('version')!r}; expected 'rankalloc.scores' version 1 or 2")
        missing = [key for key in ("modules", "base_params", "searched_budget", "scale", "base_model") if key not in data]
        if missing:
            raise RunDirError(f"{flag} {run}: {SCORES} is damaged (no {', '.join(missing)}); rerun the search or "
                              "restore the file")
        try:
            _check_scores(data)
            targets = [Target(m["name"], m["in_features"], m["out_features"], m["layer"], m["kind"],
                              m.get("experts", 0)) for m in data["modules"]]
            return cls(targets, {m["name"]: int(m["r_max"]) for m in data["modules"]},
                       {m["name"]: [float(x) for x in m["scores"]] for m in data["modules"]}, data)
        except RankMapError as e:
            raise RunDirError(f"{flag} {run}: {SCORES} is damaged ({e}); rerun the search or restore the file") \
                from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise RunDirError(f"{flag} {run}: {SCORES} is damaged ({type(e).__name__}: {e}); rerun the search "
                              "or restore the file") from None


def _check_scores(data: dict[str, Any]) -> None:
    """Raises: ValueError or TypeError where a field of scores.json has the wrong type or range."""
    def positive_int(value: Any, what: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{what} must be a positive integer, got {value!r}")

    if not isinstance(data["modules"], list) or not data["modules"]:
        raise ValueError("modules must be a non-empty list")
    for key in ("base_params", "searched_budget"):
        positive_int(data[key], key)
    if isinstance(data["scale"], bool) or not isinstance(data["scale"], (int, float)):
        raise TypeError(f"scale must be a number, got {data['scale']!r}")
    if not isinstance(data["base_model"], str) or not data["base_model"]:
        raise ValueError(f"base_model must name the model, got {data['base_model']!r}")
    if not isinstance(data.get("search", {}), dict):
        raise TypeError(f"search must be a mapping, got {data['search']!r}")
    rounding = data.get("search", {}).get("rounding")
    if rounding is not None and rounding not in ROUNDINGS:
        raise ValueError(f"search.rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    recorded = {"task_type": "peft_task_type", "modules_to_save": "modules_to_save", "fan_in_fan_out": "fan_in_fan_out"}
    checked_peft({"scale": data["scale"], **{k: data[key] for k, key in recorded.items() if key in data}},
                  SCORES)  # what the exported map's peft section will hold, checked as the map's loader does
    seen: set[str] = set()
    for m in data["modules"]:
        if not isinstance(m.get("name"), str) or not m["name"]:
            raise ValueError(f"every module needs a name, got {m.get('name')!r}")
        if m["name"] in seen:
            raise ValueError(f"module {m['name']!r} appears twice")
        seen.add(m["name"])
        for key in ("in_features", "out_features", "r_max") + (("experts",) if "experts" in m else ()):
            positive_int(m[key], f"{m['name']!r} {key}")
        scores = m["scores"]
        if not isinstance(scores, list) or len(scores) != m["r_max"] or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in scores):
            raise ValueError(f"{m['name']!r} scores must be a list of r_max = {m['r_max']} finite numbers")


def export_rank_map(scores: Scores, budget: int, max_rank: int | None = None,
                    budget_text: str | None = None, rounding: str | None = None) -> RankMap:
    """The exact knapsack over stored scores at ``budget``, every rank capped at ``max_rank``
    (``rounding``: see :func:`rankalloc.discretize.discretize`; default: the search's)."""
    rounding = rounding or scores.data.get("search", {}).get("rounding", "knapsack")
    caps = {t.name: min(scores.r_max[t.name], max_rank or scores.r_max[t.name]) for t in scores.targets}
    capped = max_rank is not None and any(max_rank < r for r in scores.r_max.values())
    check_budget(budget, [t.cost_per_rank for t in scores.targets], caps.values(), budget_text,
                 ("raise --max-rank, or " if capped else "") + "search again with a larger --search.r_max",
                 full_ranks=[t.max_rank for t in scores.targets])
    kept = [sorted(scores.scores[t.name], reverse=True)[:caps[t.name]] for t in scores.targets]
    ranks = discretize(kept, [t.cost_per_rank for t in scores.targets], budget, rounding=rounding)
    searched = scores.data["searched_budget"]
    search = dict(scores.data.get("search", {}))
    search.update({"exported_from_budget": searched, "export_ratio": budget / searched, "max_rank": max_rank,
                   "rounding": rounding})
    peft = peft_settings(scores.data.get("peft_task_type", "SEQ_CLS"), scores.data.get("modules_to_save") or [],
                         scores.data.get("fan_in_fan_out", False), scores.data["scale"])
    return RankMap.from_ranks(scores.targets, dict(zip((t.name for t in scores.targets), ranks)),
                              base_model=scores.data["base_model"], budget=budget, search=search, peft=peft)


def write_export(out: Path, run: str, scores: Scores, rm: RankMap, max_rank: int | None) -> None:
    """The export folder: ``rank_map.json`` (written last), ``adapter_config.json``, ``export.md``, ``ranks.png``."""
    from .figures import plot_rank_heatmap
    from .tables import markdown_rank_table

    budget = rm.budget
    ratio = budget / scores.data["searched_budget"]
    trusted = TRUSTED_RATIO[0] <= ratio <= TRUSTED_RATIO[1]
    out.mkdir(parents=True, exist_ok=True)
    (out / EXPORT_MARKER).touch()
    plot_rank_heatmap(out / "ranks.png", scores.targets, rm.ranks,
                      title=f"LoRA ranks at {rm.total_params:,} parameters (re-export)")
    io.write_text(out / "export.md", "\n".join([
        f"# Re-export of {run} at {budget:,} parameters", "",
        f"- searched budget: {scores.data['searched_budget']:,}; this budget is {ratio:.2f}x of it"
        + ("" if trusted else " - outside [0.5, 2]: scores learned far from here, consider a new search"),
        f"- rank cap: {max_rank or 'none'}; parameters used: {rm.total_params:,} "
        f"({100 * rm.total_params / budget:.2f}% of the budget)", "",
        markdown_rank_table(scores.targets, rm.ranks), "", "![ranks](ranks.png)", ""]))
    rm.write_adapter_config(out / "adapter_config.json")  # as the map records it (its peft section)
    rm.save(out / "rank_map.json")


def run_export(cfg: ExportConfig) -> tuple[Path, RankMap]:
    cfg = checked_copy(cfg, ExportConfig)  # built in Python: the command line's types and checks, on a copy
    scores = Scores.load(cfg.run)
    spec = parse_budget(cfg.budget) if cfg.budget else None
    budget = spec.resolve(scores.data["base_params"]) if spec else scores.data["searched_budget"]
    label = (spec.text if spec else str(budget)) + (f"-r{cfg.max_rank}" if cfg.max_rank else "") \
        + (f"-{cfg.rounding}" if cfg.rounding else "")
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / "exports" / label
    rm = export_rank_map(scores, budget, cfg.max_rank, spec.text if spec else None, cfg.rounding)
    rundir.check_out_outside(out, [("the search run of --run", cfg.run)])  # default: RUN/exports/LABEL
    rundir.check_out_path(out)
    replacing = _hold_export_folder(out, cfg.overwrite)
    try:
        write_export(out, cfg.run, scores, rm, cfg.max_rank)
    except BaseException:
        rundir.release(out)
        if replacing and rundir.restore_replaced(out):
            logger.warning("export failed; the previous export is back in %s", out)
        raise
    rundir.drop_replaced(out)
    rundir.release(out)
    return out, rm


def _is_export_folder(folder: Path) -> bool:
    """Whether ``folder`` is an export's: its marker, or an ``export.md`` as an export writes it."""
    if (folder / EXPORT_MARKER).is_file():
        return True
    try:
        return (folder / "export.md").read_text(errors="replace").startswith("# Re-export of ")
    except OSError:
        return False


def _hold_export_folder(out: Path, overwrite: bool) -> bool:
    """Hold ``out`` for this export (two exports, or an export and a run, never write one folder together),
    setting a previous export aside under ``overwrite``; return whether one was set aside.

    Raises:
        RunDirError: another process holds ``out``; it holds something without ``overwrite``; it holds a
            search or retrain run, or a folder that is not an export.  A lock file this made is removed then.
    """
    lock_was_there = (out / rundir.LOCK).exists()
    try:
        if out.is_dir():
            rundir.hold_writable(out)
        replacing = out.is_dir() and any(p.name != rundir.LOCK for p in out.iterdir())
        if replacing:
            if not overwrite:
                raise RunDirError(f"--out {out} exists; pass --overwrite to replace it")
            if rundir.is_run_folder(out, (rundir.STATUS, rundir.CHECKPOINT, SCORES)):  # they hold rank_map.json too
                raise RunDirError(f"--overwrite: --out {out} holds a search or retrain run, not an export; it is "
                                  "left as it is: choose another --out")
            if not _is_export_folder(out):
                raise RunDirError(f"--overwrite: {out} is not empty and holds no {EXPORT_MARKER} or export.md "
                                  "of an export, so it is not a rankalloc run folder; it is left as it is: choose "
                                  "a new or empty --out")
            rundir.set_aside(out, marks=EXPORT_MARKS, finished=lambda f: (f / "rank_map.json").is_file())
            rundir.release(out)  # the held lock file moved aside with the old export
        rundir.hold_writable(out)
    except BaseException:
        if not lock_was_there and out.is_dir() and rundir.holds(out):
            (out / rundir.LOCK).unlink(missing_ok=True)
        rundir.release(out)
        raise
    return replacing


DESCRIPTION = """Re-export a finished search at another budget or rank cap (no new search).

example:
  python -m rankalloc.export --run runs/my-search --budget 0.3M --max-rank 16
"""


def cli(argv: list[str] | None = None) -> int:
    from .flags import parse_args

    cfg, _ = parse_args(ExportConfig, argv, "rankalloc export", DESCRIPTION)
    out, rm = run_export(cfg)
    ratio = rm.search["export_ratio"]
    note = "" if TRUSTED_RATIO[0] <= ratio <= TRUSTED_RATIO[1] else " (far from the searched budget: see export.md)"
    print(f"rank map: {out / 'rank_map.json'}  ({rm.total_params:,} / {rm.budget:,} parameters, "
          f"{ratio:.2f}x the searched budget{note})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .cli import run_stage

    return run_stage("export", argv)


if __name__ == "__main__":
    sys.exit(main())
