"""Budget-versus-accuracy benchmark: rankalloc (search + retrain) against uniform LoRA and AdaLoRA.

Every cell runs the real command-line stages in subprocesses, under one recipe shared by all methods
(the only difference between methods is the adapter's shape), and writes one JSON file per
(task, budget, method, seed) into ``benchmarks/results/<grid>/``.  Finished cells are skipped, so an
interrupted benchmark resumes where it stopped.  ``benchmarks/summarize.py`` turns the files into
the table and the plot.

    python benchmarks/run.py --quick            # ~11-12 min on 2 CPU cores alone: tweets, one budget, one seed
    python benchmarks/run.py                    # the full grid (hours on CPU; minutes per cell on a GPU)
    python benchmarks/run.py --methods random   # the search's ablation: random scores, the same knapsack
    python benchmarks/run.py --methods gradient # one-shot gradient-sensitivity scores, the same knapsack
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

TASKS = ["tweets", "movie-reviews", "multiemo-en"]
BUDGETS = [41_472, 82_944, 331_776]  # uniform rank 1, 2, 8 on MiniLM-L6's 36 matrices
SEEDS = [0, 1, 2]
METHODS = ["rankalloc", "uniform", "adalora"]
# One recipe for every method (DATA.md's measured setting): 4,000 train / 2,000 eval, length 64.
DATA = ["--data.max_train_examples", "4000", "--data.max_eval_examples", "2000", "--data.max_length", "64",
        "--data.batch_size", "32"]
QUICK = {"tasks": ["tweets"], "budgets": [82_944], "seeds": [0]}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        import torch

        dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    except Exception:
        dev = f"CPU ({os.cpu_count()} cores)"
    return f"{platform.system()} {cpu}, {dev}, Python {platform.python_version()}"


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def run(cmd: list[str], log: Path) -> float:
    """Run one stage; its output goes to ``log``; returns wall seconds.  Raises on failure."""
    t0 = time.time()
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                              env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}); see {log}")
    return time.time() - t0


def cell(task: str, budget: int, method: str, seed: int, work: Path, search_args: list[str],
         retrain_args: list[str], rankalloc_retrain_args: list[str] = (), warm_start: bool = False,
         reround: tuple[Path, str] | None = None) -> dict:
    name = f"{task}-{budget}-{method}-s{seed}"
    folder = work / name
    log = work / f"{name}.log"
    common = ["--task", task, "--seed", str(seed), *DATA]
    py = [sys.executable, "-m"]
    commands, times = [], {}
    if method == "rankalloc" and reround is not None:  # the same search as another grid's, rounded anew
        grid, rounding = reround
        before = json.loads((grid / f"{name}.json").read_text())
        searched = REPO / next(c.split("--out ")[1].split()[0] for c in before["commands"] if "rankalloc.search" in c)
        export = py + ["rankalloc.export", "--run", str(searched), "--rounding", rounding,
                       "--out", str(folder / "export"), "--overwrite"]
        times["search_s"] = before["times"]["search_s"]  # that search's wall time, not rerun
        times["export_s"] = run(export, log)
        commands += [shlex.split(before["commands"][0]), export]  # that search's command, as arguments
        retrain = py + ["rankalloc.retrain", "--rank-map", str(folder / "export" / "rank_map.json"),
                        "--out", str(folder / "retrain"), "--overwrite", *common, *retrain_args,
                        *rankalloc_retrain_args]
    elif method == "rankalloc":
        search = py + ["rankalloc.search", "--budget", str(budget), "--out", str(folder / "search"),
                       "--overwrite", *common, *search_args]
        times["search_s"] = run(search, log)
        commands.append(search)
        retrain = py + ["rankalloc.retrain", "--rank-map", str(folder / "search" / "rank_map.json"),
                        "--out", str(folder / "retrain"), "--overwrite", *common, *retrain_args,
                        *rankalloc_retrain_args, *(["--init-from", str(folder / "search")] if warm_start else [])]
    else:
        retrain = py + ["rankalloc.retrain", "--baseline", method, "--budget", str(budget),
                        "--out", str(folder / "retrain"), "--overwrite", *common, *retrain_args]
    times["retrain_s"] = run(retrain, log)
    commands.append(retrain)
    metrics = json.loads((folder / "retrain" / "metrics.json").read_text())
    record = {"task": task, "budget": budget, "method": method, "seed": seed,
              "metric": metrics["metric"], "score": metrics["score"],  # the task family's metric
              "accuracy": metrics.get("accuracy"), "macro_f1": metrics.get("macro_f1"),
              "adapter_params": metrics["adapter_params"], "times": times,
              "total_s": sum(times.values()), "peak_memory_mb": metrics.get("peak_memory_mb"),
              "commands": [" ".join(shlex.quote(c) for c in cmd).replace(sys.executable, "python")
                           for cmd in commands],
              "metrics": metrics}
    if method == "rankalloc":
        rank_map = json.loads((folder / ("export" if reround else "search") / "rank_map.json").read_text())
        record["ranks"] = {k: v["rank"] for k, v in rank_map["modules"].items()}
        record["search"] = rank_map["search"]
        searched = folder / "search" / "summary.json"
        if not reround and searched.is_file():
            record["search_peak_memory_mb"] = json.loads(searched.read_text()).get("peak_memory_mb")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tweets, budget 82,944, seed 0")
    parser.add_argument("--tasks", default=None, help="comma-separated task names (default: " + ",".join(TASKS) +
                        "; any --task value works, e.g. social_iqa)")
    parser.add_argument("--budgets", default=None, help="comma-separated parameter counts")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated, from rankalloc, uniform, adalora, random (the search's ablation: "
                             "random scores through the same knapsack) and gradient (scores from the frozen "
                             "weights' loss gradients, the same knapsack); the last two are not in the default grid")
    parser.add_argument("--grid", default=None, help="results subfolder name (default: quick or full)")
    parser.add_argument("--search-args", default="", help="extra flags for every search, e.g. '--search.steps 240'")
    parser.add_argument("--retrain-args", default="", help="extra flags for every retrain (all methods)")
    parser.add_argument("--rankalloc-retrain-args", default="",
                        help="extra flags for rankalloc's retrain only, e.g. '--max-steps 200' with --warm-start")
    parser.add_argument("--reround", nargs=2, metavar=("GRID", "ROUNDING"),
                        help="rankalloc cells reuse the searches of results/GRID and round them anew "
                             "(export --rounding ROUNDING), then retrain: a paired comparison of roundings")
    parser.add_argument("--warm-start", action="store_true",
                        help="rankalloc's retrain starts from its search's weights (--init-from)")
    parser.add_argument("--work", default=str(REPO / "runs" / "bench"), help="where run folders go")
    args = parser.parse_args(argv)
    grid = QUICK if args.quick else {"tasks": TASKS, "budgets": BUDGETS, "seeds": SEEDS}
    tasks = args.tasks.split(",") if args.tasks else grid["tasks"]
    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else grid["budgets"]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else grid["seeds"]
    methods = args.methods.split(",")
    out = HERE / "results" / (args.grid or ("quick" if args.quick else "full"))
    work = Path(args.work) / out.name  # one scratch folder per grid, so grids never overwrite each other's runs
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
            "machine": machine(), "git_revision": git_revision(), "date": time.strftime("%Y-%m-%d"),
            "recipe": DATA, "search_args": args.search_args, "retrain_args": args.retrain_args,
            "rankalloc_retrain_args": args.rankalloc_retrain_args, "warm_start": args.warm_start,
            "reround": args.reround}
    cells = [(t, b, m, s) for t in tasks for b in budgets for s in seeds for m in methods]
    for i, (task, budget, method, seed) in enumerate(cells, 1):
        path = out / f"{task}-{budget}-{method}-s{seed}.json"
        if path.is_file():
            print(f"[{i}/{len(cells)}] {path.name}: done already", flush=True)
            continue
        print(f"[{i}/{len(cells)}] {task} budget={budget} {method} seed={seed} ...", flush=True)
        try:
            record = cell(task, budget, method, seed, work, shlex.split(args.search_args),
                          shlex.split(args.retrain_args), shlex.split(args.rankalloc_retrain_args), args.warm_start,
                          (HERE / "results" / args.reround[0], args.reround[1]) if args.reround else None)
        except RuntimeError as e:
            print(f"    FAILED: {e}", flush=True)
            continue
        record["meta"] = meta
        tmp = path.with_suffix(".tmp")
        # paths relative to the repository, so a result names no machine's folders
        tmp.write_text(json.dumps(record, indent=2).replace(str(REPO) + os.sep, "") + "\n")
        tmp.replace(path)
        print(f"    {record['metric']} {record['score']:.4f}  params {record['adapter_params']:,}  "
              f"{record['total_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
