"""A sweep's reports: the trials as rows with their Pareto fronts, ``pareto.csv``/``trials.csv``,
``pareto.md``, ``pareto.png``, ``sweep.json`` and optuna's HTML plots."""
from __future__ import annotations

import csv
import dataclasses
import io as _io
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import io
from .config import SweepConfig
from .sweep_study import RANKALLOC, first_line, point_of, point_order, quiet_optuna, storage_name

if TYPE_CHECKING:
    from .sweep import Sweep

logger = logging.getLogger(__name__)


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """Every complete trial as a row, with ``front`` (non-dominated among its method's trials) and
    ``global_front`` (non-dominated among all trials)."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        u = t.user_attrs
        method, budget = point_of(t) or (u.get("method", RANKALLOC), u.get("budget"))
        params = {k: v for k, v in t.params.items() if k not in ("budget", "method")}
        rows.append({"trial": t.number, "method": method, "budget": budget, "adapter_params": int(t.values[0]),
                     "score": t.values[1], "metric": u.get("metric", "accuracy"), "macro_f1": u.get("macro_f1"), "budget_used": u.get("budget_used"),
                     "trial_s": (u.get("wall_time_s") or {}).get("trial_s"), "params": params,
                     "rank_map": u.get("rank_map"), "adapter": u.get("adapter"), "metrics": u.get("metrics"),
                     "commands": u.get("commands", [])})
    for row in rows:
        row["front"] = not any(_dominates(o, row) for o in rows if o["method"] == row["method"])
        row["global_front"] = not any(_dominates(o, row) for o in rows)
    return sorted(rows, key=lambda r: (*point_order((r["method"], r["adapter_params"])), r["trial"]))


def _dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
    no_worse = a["adapter_params"] <= b["adapter_params"] and a["score"] >= b["score"]
    return no_worse and (a["adapter_params"] < b["adapter_params"] or a["score"] > b["score"])


CSV_COLUMNS = ["trial", "method", "budget", "adapter_params", "metric", "score", "macro_f1", "budget_used", "front",
               "global_front", "trial_s", "params", "rank_map", "adapter", "metrics", "commands"]


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, "params": json.dumps(r["params"]) if r["params"] else "",
                         "commands": " && ".join(r["commands"])})
    return buf.getvalue()


def write_reports(study: Any, sweep: Sweep, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """pareto.csv, trials.csv, pareto.md, pareto.png, sweep.json and optuna's HTML plots (with plotly)."""
    from .figures import plot_pareto
    from .tables import human_params

    out = sweep.out
    rows = trial_rows(study)
    front = [r for r in rows if r["front"]]
    metric = rows[0]["metric"] if rows else "accuracy"  # the task family's metric, held in "score"
    io.write_text(out / "pareto.csv", _csv(front))
    io.write_text(out / "trials.csv", _csv(rows))
    plot_pareto(out / "pareto.png", [{"method": r["method"], "params": r["adapter_params"],
                                      "score": r["score"], "front": r["front"]} for r in rows],
                title=f"{sweep.cfg.model.name} on {sweep.cfg.data.task}: {metric} vs adapter parameters", metric=metric)
    summary = {**summary, "trials_complete": len(rows), "front": [r["trial"] for r in front]}
    io.write_json(out / "sweep.json", summary)

    def table(rs: list[dict[str, Any]]) -> list[str]:
        lines = [f"| trial | method | budget | adapter params | {metric} | macro F1 | front | params |",
                 "|---:|---|---:|---:|---:|---:|:---:|---|"]
        for r in rs:
            mark = "**all**" if r["global_front"] else ("method" if r["front"] else "")
            hp = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items())
            lines.append(f"| {r['trial']} | {r['method']} | {r['budget']:,} | {r['adapter_params']:,} "
                         f"({human_params(r['adapter_params'])}) | {r['score']:.4f} | "
                         f"{_num(r['macro_f1'])} | {mark} | {hp} |")
        return lines

    shared = summary.get("shared_search")
    lines = [f"# Sweep {sweep.cfg.study_name!r}: {metric} vs adapter parameters", "",
             f"{sweep.cfg.model.name} on {sweep.cfg.data.task}; storage {summary['storage']}; "
             f"{len(rows)} complete trial(s). Objectives: adapter parameters (down), {metric} on the "
             "evaluation split (up).", "",
             "## Pareto front", "",
             "Non-dominated within each method (front = `method`); **all** = also non-dominated across methods.",
             "", *table(front), "", "![pareto](pareto.png)", "", "## Time", "",
             f"- this worker: {summary['wall_time_s']:.0f} s wall; all complete trials together: "
             f"{summary['trial_time_s']:.0f} s"]
    if shared:
        lines.append(f"- shared search at {shared['budget']:,} parameters (r_max {shared['r_max']}): "
                     f"{shared['wall_time_s']:.0f} s, reused by {summary['rankalloc_budgets']} budget(s); one full "
                     f"search per budget would have cost about {summary['full_search_estimate_s']:.0f} s "
                     f"({summary['rankalloc_budgets']} x the shared search)")
    lines += ["", "## Commands that reproduce each point of the front", "",
              "Run from the folder the sweep ran in; they write into the sweep's own folders (change `--out`, "
              "or add `--overwrite`, to run them again).", ""]
    for r in front:
        lines += [f"### trial {r['trial']}: {r['method']} at {r['budget']:,}", "", "```bash", *r["commands"],
                  "```", ""]
    lines += ["## Every complete trial", "", *table(rows), ""]
    io.write_text(out / "pareto.md", "\n".join(lines))
    _optuna_plots(study, out, bool(sweep.cfg.tune), metric)
    return rows


def _num(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _optuna_plots(study: Any, out: Path, tuned: bool, metric: str) -> None:
    """optuna's interactive HTML plots, when plotly is installed (skipped silently otherwise)."""
    try:
        import plotly  # noqa: F401
    except ImportError:
        return
    import optuna.visualization as vis

    plots = {"optuna_pareto_front.html": lambda: vis.plot_pareto_front(study, target_names=["adapter parameters", metric])}
    if tuned:
        plots["optuna_parallel_score.html"] = lambda: vis.plot_parallel_coordinate(
            study, target=lambda t: t.values[1], target_name=metric)
    for name, make in plots.items():
        try:
            with quiet_optuna():
                fig = make()
            io.write_text(out / name, fig.to_html(include_plotlyjs="cdn"))
        except Exception as e:  # a plot is a bonus; never fail a finished sweep on it
            logger.warning("skipped %s: %s", name, first_line(e))


def sweep_summary(study: Any, sweep: Sweep, cfg: SweepConfig, out: Path, t0: float,
                  command: str | None) -> dict[str, Any]:
    """What sweep.json records: the study, its storage, the command, timings and the shared search."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    trial_time = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done
                     if t.datetime_complete and t.datetime_start)
    n_rankalloc = len({b for m, b in sweep.points if m == RANKALLOC})
    summary: dict[str, Any] = {"study": cfg.study_name, "storage": storage_name(cfg, out), "command": command,
                               "budgets": sweep.budgets, "wall_time_s": time.time() - t0, "trial_time_s": trial_time,
                               "rankalloc_budgets": n_rankalloc}
    if sweep.shared is not None:
        summary["shared_search"] = dataclasses.asdict(sweep.shared)
        summary["full_search_estimate_s"] = sweep.shared.wall_time_s * n_rankalloc
    return summary
