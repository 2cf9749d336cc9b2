"""`python -m rankalloc <stage> [flags]` and the `rankalloc` console script."""
from __future__ import annotations

import sys

STAGES = {
    "search": "learn per-layer ranks under a budget and write a rank map",
    "export": "re-export a finished search at another budget or rank cap (no new search)",
    "retrain": "train fixed-rank peft adapters from a rank map (or a baseline) and evaluate them",
    "sweep": "optuna study of budget versus accuracy",
    "tasks": "list built-in tasks, or prepare one that needs a download",
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        lines = ["usage: rankalloc <stage> [flags]   (rankalloc <stage> --help for a stage's flags)", "", "stages:"]
        lines += [f"  {name:8s} {text}" for name, text in STAGES.items()]
        print("\n".join(lines), file=sys.stdout if args else sys.stderr)  # a missing stage is an error (argparse's way)
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from . import __version__

        print(f"rankalloc {__version__}")
        return 0
    stage, rest = args[0], args[1:]
    if stage not in STAGES:
        print(f"rankalloc: error: unknown stage {stage!r}; stages: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    import importlib

    return int(importlib.import_module(f"rankalloc.{stage}").main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
