"""The rank map: one versioned JSON file naming the LoRA rank of every target module.

```json
{"format": "rankalloc.rank_map", "version": 1, "base_model": "...", "model_fingerprint": "...",
 "budget": 500000, "total_params": 499968,
 "modules": {"<full.module.name>": {"rank": 12, "in_features": 384, "out_features": 384}},
             "<full.name.of.a.fused.expert.weight>": {"rank": 4, "in_features": 384, "out_features": 1536, "experts": 8}},
 "search": {"task": "...", "seed": 0, "steps": 0, "final_lambda": 0.0, "rankalloc_version": "..."},
 "peft": {"task_type": "SEQ_CLS", "modules_to_save": ["classifier"], "fan_in_fan_out": false, "scale": 2.0}}
```

``experts`` (optional; such a map is version 2, so that a rankalloc reading version 1 alone refuses it rather
than miscount it) marks a mixture-of-experts block's fused 3-D weight, adapted through peft's
``target_parameters``: each rank is a rank-1 component in every one of its experts.

``peft`` (optional; older maps lack it) records how the run built its adapter beyond the ranks, so that
``RankMap.load(path).lora_config()`` alone builds what the run trained.

A rank map is checked against a model before use: every module must exist with the recorded shape,
ranks must lie in ``[0, min(d_in, d_out)]``; the first mismatch is named in a one-line error.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from . import io
from .errors import RankMapError
from .models import hub_id
from .targets import Target, fingerprint

FORMAT = "rankalloc.rank_map"
VERSION = 1
VERSION_WITH_EXPERTS = 2  # a map with fused expert weights: a reader of version 1 would miscount them
RECORDED = object()  # lora_config's "take the map's recorded value" (None is a valid task type)


@dataclass
class RankMap:
    base_model: str
    model_fingerprint: str
    budget: int
    modules: dict[str, dict[str, int]]
    search: dict[str, Any] = field(default_factory=dict)
    # how peft builds the adapter beyond the ranks: task_type, modules_to_save (the task head), fan_in_fan_out,
    # scale (alpha / r); the defaults of lora_config, so that the map alone builds what its run trained
    peft: dict[str, Any] = field(default_factory=dict)

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def from_ranks(cls, targets: list[Target], ranks: dict[str, int], *, base_model: str, budget: int,
                   search: dict[str, Any] | None = None, peft: dict[str, Any] | None = None) -> "RankMap":
        modules = {t.name: {"rank": int(ranks[t.name]), "in_features": t.in_features,
                            "out_features": t.out_features, **({"experts": t.experts} if t.experts else {})}
                   for t in targets}
        return cls(base_model, fingerprint(targets), int(budget), modules, dict(search or {}), dict(peft or {}))

    @property
    def ranks(self) -> dict[str, int]:
        return {name: m["rank"] for name, m in self.modules.items()}

    @property
    def total_params(self) -> int:
        return sum(m["rank"] * m.get("experts", 1) * (m["in_features"] + m["out_features"])
                   for m in self.modules.values())

    def to_dict(self) -> dict[str, Any]:
        version = VERSION_WITH_EXPERTS if any("experts" in m for m in self.modules.values()) else VERSION
        return {"format": FORMAT, "version": version, "base_model": self.base_model,
                "model_fingerprint": self.model_fingerprint, "budget": self.budget,
                "total_params": self.total_params, "modules": self.modules, "search": self.search,
                **({"peft": self.peft} if self.peft else {})}

    def save(self, path: str | Path) -> None:
        io.write_json(path, self.to_dict())

    # ---- loading and validation -------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "RankMap":
        """Read and check the file's own consistency.

        Raises:
            RankMapError: missing file, not JSON, wrong format or version, malformed entries.
        """
        path = Path(path)
        if not path.is_file():
            raise RankMapError(f"--rank-map {path}: no such file")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RankMapError(f"--rank-map {path}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "rank map") -> "RankMap":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise RankMapError(f"{source}: format must be {FORMAT!r}, got {got!r}")
        if data.get("version") not in (VERSION, VERSION_WITH_EXPERTS):
            raise RankMapError(f"{source}: version {data.get('version')!r} is not supported (this "
                               f"rankalloc reads versions {VERSION} and {VERSION_WITH_EXPERTS})")
        for key in ("base_model", "model_fingerprint", "budget", "modules"):
            if key not in data:
                raise RankMapError(f"{source}: missing field {key!r}")
        modules = data["modules"]
        if not isinstance(modules, dict) or not modules:
            raise RankMapError(f"{source}: 'modules' must be a non-empty mapping of module names")
        clean: dict[str, dict[str, int]] = {}
        for name, entry in modules.items():
            if not isinstance(entry, dict):
                raise RankMapError(f"{source}: module {name}: entry must be a mapping with rank, "
                                   "in_features, out_features")
            for key in ("rank", "in_features", "out_features"):
                value = entry.get(key)
                if not isinstance(value, int) or isinstance(value, bool):
                    raise RankMapError(f"{source}: module {name}: {key} must be an integer, got {value!r}")
            if entry["rank"] < 0:
                raise RankMapError(f"{source}: module {name}: rank {entry['rank']} is negative")
            limit = min(entry["in_features"], entry["out_features"])
            if entry["rank"] > limit:
                raise RankMapError(f"{source}: module {name}: rank {entry['rank']} exceeds "
                                   f"min(d_in, d_out) = {limit}")
            clean[name] = {k: int(entry[k]) for k in ("rank", "in_features", "out_features")}
            if "experts" in entry:
                experts = entry["experts"]
                if not isinstance(experts, int) or isinstance(experts, bool) or experts < 1:
                    raise RankMapError(f"{source}: module {name}: experts must be a positive integer (the experts "
                                       f"of a fused expert weight), got {experts!r}")
                clean[name]["experts"] = experts
        budget = data["budget"]
        if not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0:
            raise RankMapError(f"{source}: budget must be a positive integer, got {budget!r}")
        search = data.get("search") or {}
        if not isinstance(search, dict):
            raise RankMapError(f"{source}: 'search' must be a mapping of search settings, got {search!r}")
        if not isinstance(data["base_model"], str) or not data["base_model"]:
            raise RankMapError(f"{source}: base_model must be a model name or folder, got {data['base_model']!r}")
        rm = cls(data["base_model"], str(data["model_fingerprint"]), budget, clean, dict(search),
                 checked_peft(data.get("peft") or {}, source))
        if "total_params" in data and data["total_params"] != rm.total_params:
            raise RankMapError(f"{source}: total_params {data['total_params']} disagrees with the ranks "
                               f"({rm.total_params}); the file was edited or corrupted")
        return rm

    def check_against(self, targets_or_model: Any, source: str = "rank map") -> None:
        """Raise RankMapError naming the first module that the model lacks or whose shape differs."""
        shapes = _module_shapes(targets_or_model)
        for name, entry in self.modules.items():
            if name not in shapes:
                sample = ", ".join(list(shapes)[:3])
                what = ("one of this model's adapter targets (the Linear-like projections of its blocks"
                        if isinstance(targets_or_model, list) else "a Linear-like module of this model (it has")
                raise RankMapError(f"{source}: module {name} is not {what}, e.g. {sample}); was the rank map made "
                                   "for another model?")
            recorded = (entry["in_features"], entry["out_features"], entry.get("experts", 0))
            if shapes[name] != recorded:
                raise RankMapError(f"{source}: module {name} is {_shape(*recorded)} in the rank map but "
                                   f"{_shape(*shapes[name])} in the model")
        if isinstance(targets_or_model, list):
            fp = fingerprint(targets_or_model)
            if set(self.modules) == {t.name for t in targets_or_model} and fp != self.model_fingerprint:
                raise RankMapError(f"{source}: model fingerprint {self.model_fingerprint} differs from the "
                                   f"model's {fp}")

    # ---- export ------------------------------------------------------------------------------------
    def lora_config(self, scale: float | None = None, *, task_type: Any = RECORDED,
                    modules_to_save: list[str] | None = None, dropout: float = 0.0,
                    fan_in_fan_out: bool | None = None) -> dict[str, Any]:
        """Keyword arguments of ``peft.LoraConfig`` that build exactly these ranks.

        ``lora_alpha = scale * r`` for every module, so the LoRA scale ``alpha / r`` is the same
        constant for every rank.  Rank-0 modules are left out of ``target_modules`` (no adapter).
        ``fan_in_fan_out``: the targets store their weight as (in, out), as GPT-2's ``Conv1D`` does.
        Each argument left out takes the map's recorded value (``peft``: the run's task type, task head,
        weight layout and scale); a map without them gives ``SEQ_CLS``, no head, (out, in) and scale 2.
        """
        scale = self.peft.get("scale", 2.0) if scale is None else scale
        task_type = self.peft.get("task_type", "SEQ_CLS") if task_type is RECORDED else task_type
        modules_to_save = self.peft.get("modules_to_save") if modules_to_save is None else modules_to_save
        fan_in_fan_out = self.peft.get("fan_in_fan_out", False) if fan_in_fan_out is None else fan_in_fan_out
        kept = {name: m["rank"] for name, m in self.modules.items() if m["rank"] > 0}
        if not kept:
            raise RankMapError("the rank map gives every module rank 0: there is nothing to train")
        fused = sorted(name for name in kept if self.modules[name].get("experts"))
        if fused and dropout:
            raise RankMapError(f"lora_dropout {dropout} with fused expert weights ({fused[0]}, ...): peft's "
                               "target_parameters take no dropout; set --train.lora_dropout 0 (a baseline may "
                               "instead leave them out with --model.target_regex)")
        common = Counter(kept.values()).most_common()
        r = max(common, key=lambda kv: (kv[1], -kv[0]))[0]
        cfg: dict[str, Any] = {
            "r": r,
            "lora_alpha": _alpha(scale, r),
            "lora_dropout": dropout,
            "target_modules": sorted(set(kept) - set(fused)),  # [] where only fused weights: peft's way to say so
            "rank_pattern": {_anchored(name): rank for name, rank in kept.items()},
            "alpha_pattern": {_anchored(name): _alpha(scale, rank) for name, rank in kept.items()},
            "bias": "none",
        }
        if fused:
            cfg["target_parameters"] = fused
        if fan_in_fan_out:
            cfg["fan_in_fan_out"] = True
        if task_type is not None:
            cfg["task_type"] = task_type
        if modules_to_save:
            cfg["modules_to_save"] = list(modules_to_save)
        return cfg

    def check_built(self, peft_model: Any) -> None:
        """Check that the peft model built from :meth:`lora_config` has exactly these ranks.

        peft matches ``rank_pattern`` keys itself, and releases before 0.15 could not match the anchored
        keys written here: every module would silently get the common rank ``r``.

        Raises:
            RankMapError: a module's built rank differs from the map's (naming the module and peft's version).
        """
        import peft

        built = {}
        for name, module in peft_model.named_modules():
            r = getattr(module, "r", None)
            if isinstance(r, dict) and "default" in r and hasattr(module, "lora_A"):
                name = name.removeprefix("base_model.model.")
                if hasattr(module, "parameter_name"):  # a fused expert weight's wrapper (nested per parameter)
                    name = f"{name.replace('.base_layer', '')}.{module.parameter_name}"
                built[name] = int(r["default"])
        for name, m in self.modules.items():
            want, got = m["rank"], built.get(name, 0)
            if want != got:
                old_peft = tuple(int(x) for x in re.findall(r"\d+", peft.__version__)[:2]) < (0, 15)
                raise RankMapError(f"peft {peft.__version__} built rank {got} for {name}, the rank map says {want}: "
                                   "peft did not apply this module's rank_pattern key"
                                   + ("; rankalloc needs peft >= 0.15, which matches anchored keys" if old_peft else ""))
        extra = sorted(set(built) - set(self.modules))
        if extra:
            raise RankMapError(f"peft {peft.__version__} built an adapter on {extra[0]} ({len(extra)} module(s) in all), "
                               "which the rank map does not name: the adapter would hold more than the map's "
                               "parameters")

    def write_adapter_config(self, path: str | Path, scale: float | None = None, **kwargs: Any) -> dict[str, Any]:
        """Write a peft ``adapter_config.json`` (``LoraConfig(**cfg).to_dict()``, arguments as
        :meth:`lora_config`'s) and return it."""
        from peft import LoraConfig

        cfg = LoraConfig(**self.lora_config(scale, **kwargs)).to_dict()
        cfg["base_model_name_or_path"] = hub_id(self.base_model)  # a built-in alias means nothing to peft
        cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
        io.write_json(path, cfg)
        return cfg


@contextlib.contextmanager
def peft_as_named() -> Iterator[None]:
    """Build or load a peft adapter with exactly the modules and parameters its config names.

    Under transformers 5, peft rewrites the LoRA config of some mixture-of-experts model types (DeepSeek, GLM-MoE,
    ERNIE-MoE, ...) as if written for transformers 4: every target ending in ``gate_proj``, ``up_proj`` or
    ``down_proj`` (dense MLPs and shared experts alike) becomes the fused ``gate_up_proj``/``down_proj`` of
    every layer, at twice the rank.  A rank map names transformers 5's modules already, so the rewrite would
    build another adapter than the map's; it is switched off here.
    """
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:  # a peft without the rewrite
        yield
        return
    rewrite = getattr(conversion, "convert_peft_config_for_transformers", None)
    if rewrite is None:
        yield
        return
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = rewrite


def peft_would_rewrite(config: Any, model: Any) -> bool:
    """Whether peft's own loading (outside :func:`peft_as_named`) would rewrite ``config`` on ``model``."""
    try:
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:
        return False
    probe = copy.deepcopy(config)
    try:
        convert_peft_config_for_transformers(probe, model=model, conversions=None)
    except Exception:  # it refuses the config: loading would fail
        return True

    def key(c: Any) -> tuple:
        return (set(c.target_modules or ()), set(getattr(c, "target_parameters", None) or ()),
                dict(c.rank_pattern or {}), dict(c.alpha_pattern or {}))

    return key(probe) != key(config)


def peft_settings(task_type: str | None, modules_to_save: list[str], fan_in_fan_out: bool,
                  scale: float) -> dict[str, Any]:
    """A rank map's ``peft`` section: how peft builds the adapter beyond the ranks (see :meth:`RankMap.lora_config`)."""
    return {"task_type": task_type, "modules_to_save": list(modules_to_save), "fan_in_fan_out": bool(fan_in_fan_out),
            "scale": scale}


def checked_peft(peft: Any, source: str) -> dict[str, Any]:
    """The ``peft`` section of a rank map file, checked.

    Raises:
        RankMapError: not a mapping, or a field of the wrong type.
    """
    def wrong(key: str, allowed: str) -> RankMapError:
        return RankMapError(f"{source}: peft.{key} must be {allowed}, got {peft[key]!r}")

    if not isinstance(peft, dict):
        raise RankMapError(f"{source}: 'peft' must be a mapping of peft settings, got {peft!r}")
    task_types = _peft_task_types()
    if peft.get("task_type") is not None and peft["task_type"] not in task_types:
        raise wrong("task_type", f"one of {', '.join(task_types)} or null")
    heads = peft.get("modules_to_save")
    if heads is not None and not (isinstance(heads, list) and all(isinstance(h, str) for h in heads)):
        raise wrong("modules_to_save", "a list of module names")
    if "fan_in_fan_out" in peft and not isinstance(peft["fan_in_fan_out"], bool):
        raise wrong("fan_in_fan_out", "true or false")
    scale = peft.get("scale", 2.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
        raise wrong("scale", "a positive finite number")
    return dict(peft)


def _peft_task_types() -> tuple[str, ...]:
    """The task types peft knows (``LoraConfig`` refuses any other)."""
    from peft import TaskType

    return tuple(t.value for t in TaskType)


def _anchored(name: str) -> str:
    """A ``rank_pattern`` key that matches the module ``name`` and nothing else: peft reads the keys as
    regular expressions, so an unescaped ``attn.out`` would also match a sibling ``attn_out``."""
    return f"^{re.escape(name)}$"


def _alpha(scale: float, rank: int) -> float | int:
    alpha = scale * rank
    return int(alpha) if float(alpha).is_integer() else alpha


def _shape(d_in: int, d_out: int, experts: int) -> str:
    return f"{d_in}x{d_out}" + (f" in each of {experts} experts" if experts else "")


def _module_shapes(targets_or_model: Any) -> dict[str, tuple[int, int, int]]:
    """(d_in, d_out, experts) by name: of the targets, or of every Linear-like module and fused expert weight."""
    if isinstance(targets_or_model, list):
        return {t.name: (t.in_features, t.out_features, t.experts) for t in targets_or_model}
    from .targets import expert_shape, fused_expert_weights, is_linear_like, linear_shape

    shapes = {n: (*linear_shape(m), 0) for n, m in targets_or_model.named_modules() if n and is_linear_like(m)}
    for name, module, param_name in fused_expert_weights(targets_or_model):
        experts, d_in, d_out = expert_shape(module, param_name)
        shapes[name] = (d_in, d_out, experts)
    return shapes
