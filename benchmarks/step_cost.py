"""Cost of one search step against one plain peft LoRA training step at the same rank, in one process.

    python benchmarks/step_cost.py --r-max 32 --steps 30 --batch-size 32

A search step is a weight step + a gate step + a dual step (two forward/backward passes); a LoRA step
is one forward/backward. Both run on the same batches of the default task, alternating A/B blocks to
cancel drift of the machine. Prints a JSON line and writes benchmarks/results/step_cost.json
(step_cost.runN.json when that exists: a result is never overwritten).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from rankalloc.adapters import GatedModel  # noqa: E402
from rankalloc.config import DataConfig, ModelConfig  # noqa: E402
from rankalloc.data import EpochSampler, prepare_task  # noqa: E402
from rankalloc.lagrangian import Lagrangian  # noqa: E402
from rankalloc.models import load_model, load_tokenizer  # noqa: E402
from rankalloc.targets import find_targets, head_modules  # noqa: E402
from rankalloc.search import gate_step, weight_step  # noqa: E402
from run import git_revision, machine  # noqa: E402  (benchmarks/run.py: what every result records)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--r-max", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per method per block")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    tok = load_tokenizer(ModelConfig())
    data = DataConfig(batch_size=args.batch_size)
    task = prepare_task(data, tok, seed=0)
    base = load_model(ModelConfig(), task.num_labels)
    targets = find_targets(base, ModelConfig())
    budget = 12 * sum(t.cost_per_rank for t in targets)

    gated = GatedModel(copy.deepcopy(base), targets, {t.name: args.r_max for t in targets}, scale=2.0)
    w_opt = torch.optim.AdamW(gated.weight_parameters(), lr=1e-3)
    g_opt = torch.optim.Adam(gated.gate_parameters(), lr=0.05)
    lag = Lagrangian(budget, 0.5, 2.0)

    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=args.r_max, lora_alpha=2 * args.r_max,
                                                          target_modules=[t.name for t in targets],
                                                          modules_to_save=sorted(head_modules(base))))
    l_opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-3)
    ws, gs = EpochSampler(len(task.weight), args.batch_size, 0), EpochSampler(len(task.gate), args.batch_size, 1)
    gated.train(), lora.train()

    def search_step():
        weight_step(gated, task.weight.batch(ws.next()), w_opt)
        _, cost = gate_step(gated, task.gate.batch(gs.next()), g_opt, lag, budget)
        lag.dual_step(float(cost), budget)

    def lora_step(batch_sampler=EpochSampler(len(task.weight), args.batch_size, 0)):
        l_opt.zero_grad(set_to_none=True)
        lora(**task.weight.batch(batch_sampler.next())).loss.backward()
        l_opt.step()

    times = {"search": [], "lora": []}
    for fn in (search_step, lora_step):  # warm-up
        for _ in range(3):
            fn()
    for _ in range(args.blocks):
        for name, fn in (("search", search_step), ("lora", lora_step)):
            for _ in range(args.steps):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    s, l = statistics.median(times["search"]), statistics.median(times["lora"])
    result = {"command": "python benchmarks/step_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": f"{machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
              "git_revision": git_revision(),
              "r_max": args.r_max, "batch_size": args.batch_size, "steps_timed": len(times["search"]),
              "search_step_ms": round(1000 * s, 1), "lora_step_ms": round(1000 * l, 1),
              "ratio_search_over_lora": round(s / l, 3),
              "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(result))
    out, n = HERE / "results" / "step_cost.json", 2
    out.parent.mkdir(exist_ok=True)
    while out.exists():  # a committed result (made with other flags, perhaps) is never overwritten
        out, n = out.with_name(f"step_cost.run{n}.json"), n + 1
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
