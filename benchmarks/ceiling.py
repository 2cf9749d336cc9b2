"""A yardstick for every allocation: full fine-tuning under the benchmark's recipe.

Full fine-tuning is the usual reference of parameter-efficient methods.  Where it scores little above
uniform LoRA, little is left for any choice of per-layer ranks to gain over uniform (a yardstick, not a
proof: a low-rank adapter can match or exceed full fine-tuning), and the issue's bar of +1.0 point over
uniform at equal budget then asks for most of that gap.

Each cell trains every weight of the model (encoder, embeddings and task head) with the benchmark's data
recipe (``run.DATA``: 4,000 training / 2,000 evaluation examples, length 64, batch 32) and the retrain's
schedule (2 epochs, linear warm-up over 6% of the steps then decay to 0, AdamW), through the retrain's own
training loop and metrics; only the trainable set and the learning rate differ from a LoRA retrain.  The
learning rate is chosen as full fine-tuning's authors choose it: from a small grid, by the evaluation
score, which makes the ceiling optimistic (an upper bound, not a fair competitor).

    python benchmarks/ceiling.py --tasks tweets --seeds 0 --lrs 3e-5,1e-4,3e-4   # choose the lr
    python benchmarks/ceiling.py --lrs 1e-4                                      # every task, seeds 0-2

One JSON file per (task, lr, seed) goes to ``benchmarks/results/ceiling/``; finished cells are skipped.
``summary.md`` gives each task's mean and its paired difference (same seed) with uniform LoRA's cells of
``results/full`` at each budget; ``headroom.png`` draws the grid's methods and full fine-tuning against the
parameters each trains.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as bench  # noqa: E402  (the benchmark's recipe, machine and revision helpers)
from summarize import score  # noqa: E402  (a cell's metric; older cells hold accuracy only)

OUT = HERE / "results" / "ceiling"
TRAINED = {"all": "full fine-tuning", "matrices": "target matrices, full rank"}


def cell(task_name: str, lr: float, seed: int, extra: tuple[str, ...] = (), trainable: str = "all") -> dict:
    """One full fine-tuning run; ``extra`` retrain flags follow the recipe's (tests cut the model and steps).

    ``trainable="matrices"`` trains only the weights of LoRA's targets (the 36 matrices of MiniLM-L6) and the
    task head, at full rank: the most any rank allocation over those matrices could reach, where ``"all"``
    also trains embeddings, LayerNorms and biases, which no LoRA adapter touches."""
    import torch

    from rankalloc.config import RetrainConfig, with_data_defaults
    from rankalloc.data import prepare_task
    from rankalloc.flags import parse_args
    from rankalloc.models import count_parameters, load_model, load_model_config, load_tokenizer
    from rankalloc.retrain_loop import predict, train
    from rankalloc.targets import find_targets, head_parameters
    from rankalloc.training import RunClock, set_seed

    # the retrain's config, so data and recipe are read exactly as a retrain reads them; its check asks for
    # a method, so one is named, but no adapter is built from it
    cfg, _ = parse_args(RetrainConfig, ["--task", task_name, "--seed", str(seed), *bench.DATA, "--train.lr", str(lr),
                                        "--baseline", "uniform", "--budget", "1", *extra], "ceiling", __doc__)
    cfg.model.name = "minilm-l6" if cfg.model.name == "auto" else cfg.model.name
    cfg.data = with_data_defaults(cfg.data)
    t0 = time.time()
    set_seed(seed)
    tokenizer = load_tokenizer(cfg.model)
    task = prepare_task(cfg.data, tokenizer, seed, load_model_config(cfg.model), gate_split=False)
    model = load_model(cfg.model, task.num_labels, task.family, tokenizer.pad_token_id, task.label_names)
    if trainable == "all":  # full fine-tuning: every weight trains
        for p in model.parameters():
            p.requires_grad_(True)
    else:  # the adapters' target matrices at full rank, and the head (which load_model leaves trainable)
        modules = dict(model.named_modules())
        for target in find_targets(model, cfg.model):
            modules[target.name].weight.requires_grad_(True)
        assert all(p.requires_grad for p in head_parameters(model))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    device = torch.device("cpu")
    clock = RunClock(t0, device)
    steps = cfg.train.epochs * (len(task.train) // cfg.data.batch_size)
    steps = steps if cfg.max_steps is None else min(steps, cfg.max_steps)
    set_seed(seed)
    t = time.time()
    history = train(model, task.train, steps, lr, cfg, device, family=task.family, clock=clock)
    train_s = time.time() - t
    logits, labels = predict(model, task.eval, cfg.data.eval_batch_size, device, task.family)
    scores = task.family.metrics(logits, labels, task.num_labels)
    return {"task": task.name, "method": "full", "trainable": trainable, "lr": lr, "seed": seed, "metric": task.family.primary_metric,
            "score": scores[task.family.primary_metric], "accuracy": scores.get("accuracy"),
            "macro_f1": scores.get("macro_f1"), "trainable_params": n_trainable,
            "model_params": count_parameters(model), "steps": steps,
            "final_train_loss": statistics.fmean(r["train_loss"] for r in history[-cfg.train.log_every:]),
            "train_s": train_s, "total_s": time.time() - t0, "peak_memory_mb": clock.peak(),
            "eval_examples": int(len(labels)), "train_examples": len(task.train),
            "recipe": dataclasses.asdict(cfg.train) | {"batch_size": cfg.data.batch_size,
                                                       "max_length": cfg.data.max_length}}


def summary(out: Path) -> str:
    """Each task's full fine-tuning mean per lr, and its paired difference (same task and seed) with uniform
    LoRA's cells in ``results/full`` at each budget: how far above uniform any allocation could reach."""
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    uniform: dict[tuple[str, int, int], float] = {}
    for p in (HERE / "results" / "full").glob("*-uniform-s*.json"):
        r = json.loads(p.read_text())
        uniform[(r["task"], r["budget"], r["seed"])] = 100 * score(r)
    lines = ["| task | trained | lr | seeds | score (the task's metric) | " +
             " | ".join(f"− uniform at {b:,}" for b in bench.BUDGETS) + " |",
             "|---|---|---:|---:|---:|" + "---:|" * len(bench.BUDGETS)]
    for task in dict.fromkeys(r["task"] for r in records):
        by_lr: dict[tuple[str, float], dict[int, float]] = {}
        for r in records:
            if r["task"] == task:
                by_lr.setdefault((r.get("trainable", "all"), r["lr"]), {})[r["seed"]] = 100 * score(r)
        for (trainable, lr), accs in sorted(by_lr.items()):
            values = list(accs.values())
            spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
            cells = []
            for b in bench.BUDGETS:
                diffs = [a - uniform[(task, b, seed)] for seed, a in accs.items() if (task, b, seed) in uniform]
                cells.append(f"{statistics.fmean(diffs):+.2f} ({len(diffs)})" if diffs else "—")
            lines.append(f"| {task} | {TRAINED[trainable]} | {lr:g} | {', '.join(map(str, sorted(accs)))} | "
                         f"{statistics.fmean(values):.2f}"
                         f"{spread} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nIn brackets: the seeds paired with a uniform LoRA cell of `results/full`."


def plot(out: Path, lr: float) -> None:
    """``headroom.png``: per task, each grid method's mean against its adapter parameters, and full fine-tuning
    at ``lr`` at its trainable parameter count (every weight of the model, the task head included)."""
    from rankalloc.figures import plot_pareto

    groups: dict[tuple[str, str, float], list[float]] = {}
    for p in sorted((HERE / "results" / "full").glob("*.json")):
        r = json.loads(p.read_text())
        if r["method"] in ("rankalloc", "uniform", "adalora"):
            name = {"rankalloc": "rankalloc", "uniform": "uniform LoRA", "adalora": "AdaLoRA"}[r["method"]]
            groups.setdefault((r["task"], name, r["budget"]), []).append(100 * score(r))
    for p in sorted(out.glob("*.json")):
        r = json.loads(p.read_text())
        if r["lr"] == lr:
            groups.setdefault((r["task"], f"{TRAINED[r.get('trainable', 'all')]} (lr {lr:g})", r["trainable_params"]),
                              []).append(
                100 * score(r))
    tasks = {task for task, name, _ in groups if name.endswith(f"(lr {lr:g})")}
    points = [{"panel": task, "method": name, "params": params, "score": statistics.fmean(v),
               "score_std": statistics.stdev(v) if len(v) > 1 else None}
              for (task, name, params), v in sorted(groups.items(), key=lambda kv: kv[0][1] != "uniform LoRA")
              if task in tasks]
    plot_pareto(out / "headroom.png", points, title="LoRA budgets and full fine-tuning (mean ± std over seeds)",
                metric="score (%): accuracy on these tasks", xlabel="trained parameters (the task head not counted for LoRA)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(bench.TASKS))
    parser.add_argument("--seeds", default=",".join(map(str, bench.SEEDS)))
    parser.add_argument("--lrs", default="1e-4", help="comma-separated AdamW learning rates")
    parser.add_argument("--trainable", choices=sorted(TRAINED), default="all",
                        help="all: every weight; matrices: LoRA's target matrices at full rank and the head")
    parser.add_argument("--plot-lr", type=float, default=1e-4,
                        help="the learning rate whose cells headroom.png shows (the one chosen on tweets, seed 0)")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python benchmarks/ceiling.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
            "machine": bench.machine(), "git_revision": bench.git_revision(), "date": time.strftime("%Y-%m-%d"),
            "recipe": bench.DATA}
    cells = [(t, float(lr), int(s)) for t in args.tasks.split(",") for lr in args.lrs.split(",")
             for s in args.seeds.split(",")]
    for i, (task, lr, seed) in enumerate(cells, 1):
        path = OUT / f"{task}-{'' if args.trainable == 'all' else args.trainable + '-'}lr{lr:g}-s{seed}.json"
        if path.is_file():
            print(f"[{i}/{len(cells)}] {path.name}: done already", flush=True)
            continue
        print(f"[{i}/{len(cells)}] {task} {TRAINED[args.trainable]} lr={lr:g} seed={seed} ...", flush=True)
        record = cell(task, lr, seed, trainable=args.trainable) | {"meta": meta}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(path)
        print(f"    {record['metric']} {100 * record['score']:.2f}  trainable {record['trainable_params']:,}  "
              f"{record['total_s']:.0f} s", flush=True)
    table = summary(OUT)
    runs = sorted({(r["meta"]["command"], r["meta"]["git_revision"], r["meta"]["date"], r["meta"]["machine"])
                   for r in map(lambda p: json.loads(p.read_text()), OUT.glob("*.json"))})
    (OUT / "summary.md").write_text("# Full fine-tuning under the grid's recipe\n\n" +
                                    "".join(f"- cells: `{c}` (git {g}, {d}, {m})\n" for c, g, d, m in runs) +
                                    f"- this table and `headroom.png`: `{meta['command']}`\n\n{table}\n\n"
                                    "![full fine-tuning and the grid](headroom.png)\n")
    plot(OUT, args.plot_lr)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
