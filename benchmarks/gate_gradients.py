"""How big is each term of the gate gradient?  Runs one search and, at every gate step, splits the
gradient of the gate logits into its held-out-loss part and its Lagrangian (cost) part.

    python benchmarks/gate_gradients.py --budget 82944 --task tweets --seed 0 --out runs/gate-gradients \
        --data.max_train_examples 4000 --data.max_eval_examples 2000 --data.max_length 64 --data.batch_size 32

Any search flag works.  Writes ``benchmarks/results/gate_gradients/<task>-<budget>-s<seed>.json`` (``.runN.json``
when that file exists: a result is never overwritten; the file records its command): per gate step, the mean
|gradient| of each part over all gate logits, and lambda.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import rankalloc.search as search  # noqa: E402
from rankalloc.adapters import trainable_only  # noqa: E402
from rankalloc.config import SearchConfig, with_data_defaults  # noqa: E402
from rankalloc.flags import parse_args  # noqa: E402
from run import git_revision, machine  # noqa: E402  (benchmarks/run.py: what every result records)


def main(argv: list[str] | None = None) -> int:
    rows: list[dict[str, float]] = []
    gate_step = search.gate_step

    def measured_gate_step(gated, batch, opt, lagrangian, target, dist_info=search.distributed.DistInfo()):
        params = gated.gate_parameters()
        with trainable_only(params, gated.weight_parameters()):
            loss_grad = torch.autograd.grad(gated(**batch).loss, params)
            cost_grad = torch.autograd.grad(lagrangian.term(gated.expected_cost(), target), params)
        loss_grad = torch.cat([g.flatten() for g in loss_grad])
        cost_grad = torch.cat([g.flatten() for g in cost_grad])
        rows.append({"gate_step": len(rows) + 1, "lambda": lagrangian.lam,
                     "loss_grad_abs_mean": loss_grad.abs().mean().item(),
                     "loss_grad_std": loss_grad.std().item(),
                     "cost_grad_abs_mean": cost_grad.abs().mean().item(),
                     "cost_grad_min": cost_grad.min().item(), "cost_grad_max": cost_grad.max().item()})
        return gate_step(gated, batch, opt, lagrangian, target, dist_info)

    search.gate_step = measured_gate_step
    cfg, _ = parse_args(SearchConfig, argv, "gate_gradients", __doc__)
    cfg.data = with_data_defaults(cfg.data)  # the task's name for the file, as the search reads --task auto
    search.run_search(cfg, "python benchmarks/gate_gradients.py " + " ".join(argv or sys.argv[1:]))
    out = HERE / "results" / "gate_gradients" / f"{Path(cfg.data.task).stem}-{search.parse_budget(cfg.budget).text}-s{cfg.seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 2
    while out.exists():  # a committed result (made with other flags, perhaps) is never overwritten
        out = out.with_name(f"{out.stem.rsplit('.run', 1)[0]}.run{n}.json")
        n += 1
    out.write_text(json.dumps({"command": "python benchmarks/gate_gradients.py " + " ".join(argv or sys.argv[1:]),
                               "machine": machine(), "git_revision": git_revision(),
                               "date": time.strftime("%Y-%m-%d"), "steps": rows}, indent=1) + "\n")
    for row in rows[::5]:
        print(" ".join(f"{k} {v:.3g}" for k, v in row.items()))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
