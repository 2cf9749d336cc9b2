"""Cost of one search step against one plain peft LoRA training step at the same rank, in one process.

    python benchmarks/step_cost.py --r-max 32 --steps 30 --batch-size 32
    python benchmarks/step_cost.py --random-mixtral --r-max 16 --steps 10 --batch-size 16

``--random-mixtral``: a randomly initialised mixture-of-experts model of a small but real shape (Mixtral,
hidden 256, 4 blocks, 8 experts of width 512, top 2), whose experts are fused 3-D weights: the peft LoRA
adapts them through ``target_parameters``, the search through its gated parametrization.  Timing only: no
pretrained MoE model is available offline.

A search step is a weight step + a gate step + a dual step (two forward/backward passes); a LoRA step
is one forward/backward. Both run on the same batches of the default task, alternating A/B blocks to
cancel drift of the machine. Prints a JSON line and writes benchmarks/results/step_cost.json (``step_cost_mixtral.json``
with ``--random-mixtral``; ``.runN.json`` when that exists: a result is never overwritten).
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
from rankalloc.rank_map import RankMap  # noqa: E402
from rankalloc.targets import find_targets, head_modules, head_parameters  # noqa: E402
from rankalloc.search import gate_step, weight_step  # noqa: E402
from run import git_revision, machine  # noqa: E402  (benchmarks/run.py: what every result records)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--r-max", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per method per block")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--random-mixtral", action="store_true", help="time a random Mixtral with fused experts")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    tok = load_tokenizer(ModelConfig())
    data = DataConfig(batch_size=args.batch_size)
    task = prepare_task(data, tok, seed=0)
    base = _random_mixtral(task.num_labels) if args.random_mixtral else load_model(ModelConfig(), task.num_labels)
    targets = find_targets(base, ModelConfig())
    budget = 12 * sum(t.cost_per_rank for t in targets)

    gated = GatedModel(copy.deepcopy(base), targets, {t.name: args.r_max for t in targets}, scale=2.0)
    w_opt = torch.optim.AdamW(gated.weight_parameters(), lr=1e-3)
    g_opt = torch.optim.Adam(gated.gate_parameters(), lr=0.05)
    lag = Lagrangian(budget, 0.5, 2.0)

    from peft import LoraConfig, get_peft_model

    full = RankMap.from_ranks(targets, {t.name: args.r_max for t in targets}, base_model="-", budget=budget)
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(**full.lora_config(  # fused experts: target_parameters
        2.0, task_type=None, modules_to_save=sorted(head_modules(base)))))
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
              "model": "random Mixtral (fused experts)" if args.random_mixtral else "minilm-l6",
              "targets": len(targets), "fused_expert_targets": sum(1 for t in targets if t.experts),
              "r_max": args.r_max, "batch_size": args.batch_size, "steps_timed": len(times["search"]),
              "search_step_ms": round(1000 * s, 1), "lora_step_ms": round(1000 * l, 1),
              "ratio_search_over_lora": round(s / l, 3),
              "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(result))
    stem = "step_cost_mixtral" if args.random_mixtral else "step_cost"
    out, n = HERE / "results" / f"{stem}.json", 2
    out.parent.mkdir(exist_ok=True)
    while out.exists():  # a committed result (made with other flags, perhaps) is never overwritten
        out, n = out.with_name(f"{stem}.run{n}.json"), n + 1
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {out}")
    return 0


def _random_mixtral(num_labels: int) -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForSequenceClassification

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=30522, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=512, num_labels=num_labels, pad_token_id=0)
    model = MixtralForSequenceClassification(cfg)
    for p in model.parameters():
        p.requires_grad_(False)  # as load_model leaves a base model: frozen
    for p in head_parameters(model):
        p.requires_grad_(True)
    return model


if __name__ == "__main__":
    sys.exit(main())
