"""The command-line layer: flags -> config -> stage function; progress bars; one-line user errors.

The library never prints.  Here, log records go through ``tqdm.write`` so that they do not break the
progress bar, and a :class:`RankallocError` becomes one line on stderr and exit status 2.
"""
from __future__ import annotations

import importlib
import logging
import shlex
import signal
import sys
import threading
from typing import Any, Callable

from .errors import RankallocError
from .flags import FALSE_WORDS, TRUE_WORDS

EXIT_USER_ERROR = 2


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def setup_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger("rankalloc")
    if not any(isinstance(h, _TqdmHandler) for h in root.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    for noisy in ("transformers", "datasets", "optuna"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def progress_bar(total: int, desc: str, enabled: bool = True) -> tuple[Any, Callable[[dict], None]]:
    """A tqdm bar and the callback that advances it with loss, C/B and lambda."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, disable=not enabled, file=sys.stderr)

    def on_step(row: dict) -> None:
        if bar.n == 0 and row.get("step", 1) > 1:  # resumed run: start the bar where it is
            bar.update(row["step"] - 1)
        post = {"loss": f"{row['train_loss']:.3f}"}
        if row.get("cost_ratio") is not None:
            post["C/B"] = f"{row['cost_ratio']:.3f}"
        if row.get("lam") is not None:
            post["lam"] = f"{row['lam']:.3f}"
        bar.set_postfix(post, refresh=False)
        bar.update(1)

    return bar, on_step


def command_line(stage: str, argv: list[str] | None, without: tuple[str, ...] = ()) -> str:
    """The command as typed; flags in ``without`` (optional-value flags such as ``--overwrite [BOOL]``) are
    left out, with their value."""
    args, kept = list(sys.argv[1:] if argv is None else argv), []
    i = 0
    while i < len(args):
        flag = args[i].split("=", 1)[0]
        if flag in without:
            has_value = "=" not in args[i] and i + 1 < len(args) and args[i + 1].strip().lower() in TRUE_WORDS + FALSE_WORDS
            i += 2 if has_value else 1
            continue
        kept.append(args[i])
        i += 1
    return f"python -m rankalloc.{stage} " + " ".join(shlex.quote(a) for a in kept)


class Terminated(BaseException):
    """SIGTERM (a launcher or scheduler stopping the job): unwinds like Ctrl-C, so the run is marked
    failed and its folder let go before the process ends."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


_RESUMES = dict.fromkeys(("search", "retrain", "sweep"), "; rerun the same command to resume")  # stages that can


def run_stage(stage: str, argv: list[str] | None = None) -> int:
    """Parse flags for ``stage``, run it, and turn user errors into one line and exit status 2."""
    setup_logging()
    module = importlib.import_module(f"rankalloc.{stage}")
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return int(module.cli(argv) or 0)
    except RankallocError as e:
        print(f"rankalloc {stage}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"rankalloc {stage}: interrupted{_RESUMES.get(stage, '')}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"rankalloc {stage}: terminated (SIGTERM){_RESUMES.get(stage, '')}", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
