"""Config machinery: YAML files, dotted overrides and argparse flags, driven by dataclass fields.

Precedence, lowest first: dataclass defaults < ``--config`` YAML < command-line flags.  Every field
of a nested section is reachable as a dotted flag (``--search.gate_lr 3e-3``); the common fields have
short flags (``--budget``, ``--model``, ``--task``, ...).  Unknown keys, unknown flags and values of the
wrong type raise :class:`ConfigError` naming the flag and what is allowed.  Nothing here knows the
project's stages: their dataclasses live in :mod:`rankalloc.config`.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import shlex
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

SHORT_FLAGS = {
    # flag -> dotted field; shared by every stage that has the field
    "--budget": "budget", "--seed": "seed", "--device": "device", "--out": "out",
    "--max-steps": "max_steps", "--overwrite": "overwrite", "--resume": "resume",
    "--model": "model.name", "--task": "data.task", "--run": "run", "--max-rank": "max_rank",
    "--rank-map": "rank_map", "--baseline": "baseline", "--merge": "merge", "--budgets": "budgets",
    "--init-from": "init_from",
    "--storage": "storage", "--study-name": "study_name", "--n-trials": "n_trials",
}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


def _type_name(tp: Any) -> str:
    tp, optional = _unwrap_optional(tp)
    if typing.get_origin(tp) is list:
        name = "a comma-separated list"
    else:
        name = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))
    return name + (" or null" if optional else "")


TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")  # a boolean flag's values


def coerce(value: Any, tp: Any, flag: str) -> Any:
    """Turn a YAML value or a command-line string into ``tp``; raise ConfigError naming ``flag``."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "auto")
                         and optional):
        if optional:
            return None
        raise ConfigError(f"{flag} must be {_type_name(tp)}, got null")
    try:
        if inner is bool:
            if isinstance(value, bool):
                return value
            low = str(value).strip().lower()
            if low in TRUE_WORDS:
                return True
            if low in FALSE_WORDS:
                return False
            raise ValueError
        if inner is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(str(value).strip())
        if inner is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):  # nan slips past every range check (nan < 0 is False)
                raise ConfigError(f"{flag} must be a finite number, got {value!r}")
            return number
        if inner is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            if not str(value).strip():  # '--budget ""' is no budget, not a budget named ""
                if optional:
                    return None
                raise ConfigError(f"{flag} is empty; give {_type_name(tp)}")
            return str(value)
        if typing.get_origin(inner) is list:
            if isinstance(value, str):
                items = [v.strip() for v in value.split(",") if v.strip()]
            elif isinstance(value, (list, tuple)):
                items = [str(v) for v in value]
            else:
                raise ValueError
            return items
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"{flag} must be {_type_name(tp)}, got {value!r}") from None
    raise ConfigError(f"{flag}: unsupported field type {tp}")


def _apply(obj: Any, dotted: str, raw: Any, flag: str) -> None:
    parts = dotted.split(".")
    target = obj
    for i, part in enumerate(parts):
        hints = _hints(type(target))
        if part not in hints:
            where = ".".join(parts[:i]) or "the top level"
            allowed = ", ".join(sorted(hints))
            raise ConfigError(f"unknown config key {flag!s} (in {where} the keys are: {allowed})")
        if i == len(parts) - 1:
            if _is_section(hints[part]):
                if raw is None:  # a YAML section whose fields are all commented out: nothing to set
                    return
                raise ConfigError(f"{flag} is a section; set its fields, e.g. {flag}.<field>")
            setattr(target, part, coerce(raw, hints[part], flag))
        else:
            if not _is_section(hints[part]):
                raise ConfigError(f"unknown config key {flag} ({'.'.join(parts[:i + 1])} has no fields)")
            target = getattr(target, part)


def _flatten_yaml(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.extend(_flatten_yaml(value, dotted + "."))
        else:
            out.append((dotted, value))
    return out


def load_yaml(cls: type, path: str | Path) -> Any:
    """Build ``cls`` from its defaults and the YAML file at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config {path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 "
                          "YAML or JSON") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"--config {path}: not valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: the top level must be a mapping of keys, got {type(data).__name__}")
    cfg = cls()
    for dotted, value in _flatten_yaml(data):
        if isinstance(value, dict) and not value:
            continue
        _apply(cfg, dotted, value, f"{dotted} (in {path.name})")
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    cfg = cls()
    for dotted, value in _flatten_yaml(data):
        _apply(cfg, dotted, value, dotted)
    return cfg


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, no usage dump
        raise ConfigError(f"{message} (see --help)")


def walk_fields(cls: type, prefix: str = ""):
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        dotted = f"{prefix}{f.name}"
        if _is_section(tp):
            yield from walk_fields(tp, dotted + ".")
        else:
            yield dotted, tp, f


def build_parser(cls: type, prog: str, description: str, extra: typing.Callable | None = None) -> argparse.ArgumentParser:
    """An argparse parser with a short flag for common fields and a dotted flag for every field."""
    parser = _Parser(prog=prog, description=description, allow_abbrev=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="YAML", help="YAML config (see configs/); flags override it.")
    short = {v: k for k, v in SHORT_FLAGS.items()}
    common = parser.add_argument_group("common flags")
    dotted_group = parser.add_argument_group("every config field (dotted overrides)")
    for dotted, tp, f in walk_fields(cls):
        help_text = f"{f.metadata.get('help', '')} [{_type_name(tp)}; default: {_default_repr(f)}]".replace("%", "%%")
        names = [short[dotted]] if dotted in short else []
        if f"--{dotted}" not in names:
            names.append(f"--{dotted}")
        group = common if dotted in short else dotted_group
        inner, _ = _unwrap_optional(tp)
        if inner is bool and dotted in short:
            group.add_argument(*names, dest=dotted, nargs="?", const="true", default=None, metavar="BOOL",
                               help=help_text)
        else:
            group.add_argument(*names, dest=dotted, default=None, metavar=dotted.split(".")[-1].upper(),
                               help=help_text)
    if extra is not None:
        extra(parser)
    return parser


def _default_repr(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return "null" if f.default is None else str(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return str(f.default_factory())  # type: ignore[misc]
    return "required"


def _join_negative_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--budget -5k`` -> ``--budget=-5k``, so a negative value reaches validation instead of argparse."""
    takes_value = {opt for action in parser._actions if action.nargs is None for opt in action.option_strings}
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if token in takes_value and nxt is not None and nxt.startswith("-") and nxt not in parser._option_string_actions:
            out.append(f"{token}={nxt}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


def parse_args(cls: type, argv: list[str] | None, prog: str, description: str,
               extra: typing.Callable | None = None) -> tuple[Any, argparse.Namespace]:
    """Parse ``argv`` into a validated ``cls`` instance (plus the raw namespace for extra flags)."""
    parser = build_parser(cls, prog, description, extra)
    ns = parser.parse_args(_join_negative_values(parser, sys.argv[1:] if argv is None else list(argv)))
    cfg = load_yaml(cls, ns.config) if ns.config else cls()
    short = {v: k for k, v in SHORT_FLAGS.items()}
    for dotted, _tp, _f in walk_fields(cls):
        raw = getattr(ns, dotted, None)
        if raw is not None:
            _apply(cfg, dotted, raw, short.get(dotted, f"--{dotted}"))
    cfg.validate()
    return cfg, ns


def checked_copy(cfg: Any, expected: type | None = None) -> Any:
    """A stage config built in Python, as the command line would have built it: a copy with every field of
    the flag's type, validated.

    Paths become strings, an integer where a number is expected becomes a float; anything else of the
    wrong type is refused as the command line refuses it.  The caller's object is never changed, so a
    stage that fills in defaults (e.g. the task from a rank map) leaves it as it was.

    Raises:
        ConfigError: a config of another class than ``expected``, a field of the wrong type, named by its
            flag, or a value ``validate()`` refuses.
    """
    if expected is not None and type(cfg) is not expected:
        article = "an" if expected.__name__[0] in "AEIOU" else "a"
        raise ConfigError(f"this stage takes {article} {expected.__name__}, got {type(cfg).__name__} (build one "
                          f"with rankalloc.{expected.__name__}(...))")
    cfg = _typed_copy(copy.deepcopy(cfg))
    cfg.validate()
    return cfg


def _typed_copy(cfg: Any, prefix: str = "") -> Any:
    """``cfg`` (already a private copy) with every field coerced to its flag's type, sections included."""
    for f in dataclasses.fields(cfg):
        tp, value, flag = _hints(type(cfg))[f.name], getattr(cfg, f.name), f"--{prefix}{f.name}"
        if _is_section(tp):
            if not isinstance(value, tp):
                raise ConfigError(f"{flag} must be a {tp.__name__}, got {type(value).__name__}")
            setattr(cfg, f.name, _typed_copy(value, f"{prefix}{f.name}."))
            continue
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not _has_type(value, tp):
            value = coerce(value, tp, flag)
        setattr(cfg, f.name, value)
    return cfg


def _has_type(value: Any, tp: Any) -> bool:
    inner, optional = _unwrap_optional(tp)
    if value is None:
        return optional
    if inner is float:
        return isinstance(value, float)
    if inner is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typing.get_origin(inner) is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, inner) if isinstance(inner, type) else False


def stage_command(stage: str, cfg: Any) -> str:
    """The command line that runs ``stage`` with exactly ``cfg``: every field that differs from the
    stage's defaults, as a flag (``--overwrite``/``--resume`` left out)."""
    default = type(cfg)()
    short = {v: k for k, v in SHORT_FLAGS.items()}
    args = []
    for dotted, _tp, _f in walk_fields(type(cfg)):
        value, base = _get(cfg, dotted), _get(default, dotted)
        if value == base or dotted in ("overwrite", "resume"):
            continue
        if isinstance(value, list):
            text = ",".join(str(v) for v in value)
        elif value is None:
            text = "null"
        else:
            text = str(value).lower() if isinstance(value, bool) else str(value)
        args += [short.get(dotted, f"--{dotted}"), text]
    return f"python -m rankalloc.{stage} " + " ".join(shlex.quote(a) for a in args)


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
