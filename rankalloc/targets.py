"""The projections that get adapters, found structurally for any architecture.

Targets are never found by BERT names: the transformer's block stack is the ``nn.ModuleList`` holding
the most parameters (``bert.encoder.layer``, ``transformer.h``, ``model.layers``, ...; an
encoder-decoder's second stack too), and by default every Linear-like module inside them (``nn.Linear``
or transformers' GPT-2 ``Conv1D``) is a target, except mixture-of-experts routers, and so is every fused
3-D expert weight a module holds itself (Mixtral's ``experts.gate_up_proj``, peft's ``target_parameters``;
one rank there is a rank-1 component in every expert, so it costs ``experts * (d_in + d_out)``).  The task head
(top-level children other than the base model) is trained normally and never counted in the adapter
budget.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from .config import ModelConfig
from .errors import ModelError

logger = logging.getLogger("rankalloc.models")  # one logger for model loading and targeting, as before the split


@dataclass(frozen=True)
class Target:
    """One adapter target: a Linear-like module with ``in_features`` inputs and ``out_features`` outputs,
    or (``experts > 0``) a mixture-of-experts block's fused 3-D weight, named by its parameter
    (``model.layers.0.mlp.experts.gate_up_proj``), holding ``experts`` matrices of that shape.  A rank of a
    fused weight gives every expert a rank-1 component, as peft's ``target_parameters`` does."""

    name: str
    in_features: int
    out_features: int
    layer: int | None  # index in the block stack, None if outside it
    kind: str  # name relative to its block, e.g. "attention.self.query"
    experts: int = 0  # > 0: a fused expert weight of this many experts

    @property
    def cost_per_rank(self) -> int:
        """Parameters of one rank of LoRA on this target: a row of A plus a column of B (for each expert)."""
        return max(1, self.experts) * (self.in_features + self.out_features)

    @property
    def max_rank(self) -> int:
        return min(self.in_features, self.out_features)


def head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Top-level children other than the base model that hold parameters (classifier, score, ...).

    A language model's output layer (``get_output_embeddings()``, often tied to the input embeddings)
    is pretrained, not a task head: it is neither trained nor saved with the adapter.  A causal language
    model has no task head at all: whatever sits between its body and its output layer (ModernBERT's
    decoder ``lm_head`` transform) is pretrained too.
    """
    if type(model).__name__ in _causal_lm_classes():
        return {}
    prefix = getattr(model, "base_model_prefix", None)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_weight = getattr(output, "weight", None)
    children = {name: child for name, child in model.named_children() if any(True for _ in child.parameters())}
    if prefix not in children and children:  # the body is not under the class's prefix (Llama-4 text keeps
        # it in 'model', not 'language_model'): the largest child is the body
        prefix = max(children, key=lambda name: sum(p.numel() for p in children[name].parameters()))
    return {name: child for name, child in children.items()
            if name != prefix and not any(p is output_weight for p in child.parameters())}


@functools.lru_cache(maxsize=1)
def _causal_lm_classes() -> frozenset[str]:
    """Names of transformers' causal-LM classes (what ``AutoModelForCausalLM`` builds)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(value if isinstance(value, (list, tuple)) else [value])
    return frozenset(names)


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in head_modules(model).values() for p in m.parameters()]


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D`` (GPT-2), which stores its weight as (in, out)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def stores_fan_in_fan_out(model: nn.Module, targets: list[Target]) -> bool:
    """Whether the targets keep their weight as (in, out) (GPT-2's ``Conv1D``): peft's ``fan_in_fan_out``."""
    names = {t.name for t in targets}
    return any(type(getattr(m, "base_layer", m)).__name__ == "Conv1D"  # a wrapped target: its base layer
               for n, m in model.named_modules() if n in names)


def expert_shape(module: nn.Module, param_name: str) -> tuple[int, int, int]:
    """(experts, in_features, out_features) of a fused 3-D expert weight: stored (experts, out, in), as
    ``F.linear`` reads each expert, unless its module says ``is_transposed`` (experts, in, out) - peft's rule,
    which the weight copy into peft's layers relies on.  (Llama-4 stores (experts, in, out) without saying so:
    its in and out are recorded swapped, which changes neither the cost nor the adapter peft builds.)"""
    e, a, b = getattr(module, param_name).shape
    return (int(e), int(a), int(b)) if getattr(module, "is_transposed", False) else (int(e), int(b), int(a))


def fused_expert_weights(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(full name, owning module, parameter name) of every 3-D weight a module holds itself (not through a
    Linear-like child) with one matrix per expert of the config: the fused experts of a mixture-of-experts
    block (Mixtral's ``experts.gate_up_proj``), not other 3-D weights (XLNet's per-head attention)."""
    configs = _configs(model)
    counts = _config_ints(configs, _EXPERT_COUNTS, least=2)
    widths = _config_ints(configs, _HIDDEN_SIZES, least=1)  # an expert reads or writes the model's width
    found = []
    for name, module in model.named_modules():
        if not name or not counts or is_linear_like(module) or isinstance(module, nn.modules.conv._ConvNd):
            continue
        for param_name, p in module.named_parameters(recurse=False):
            if p.dim() == 3 and p.shape[0] in counts and (not widths or widths & set(p.shape[1:])):
                found.append((f"{name}.{param_name}", module, param_name))
    return found


_HIDDEN_SIZES = ("hidden_size", "d_model", "n_embd")


def _configs(model: nn.Module) -> list[Any]:
    """The model's config and its sub-configs (a multimodal model's text config, DBRX's ``ffn_config``)."""
    config = getattr(model, "config", None)
    configs = [c for c in (config, getattr(config, "get_text_config", lambda: None)()) if c is not None]
    return configs + [v for c in list(configs) for v in vars(c).values()
                      if hasattr(v, "to_dict") and hasattr(v, "model_type")]


def _config_ints(configs: list[Any], keys: tuple[str, ...], least: int) -> set[int]:
    return {getattr(c, key) for c in configs for key in keys
            if isinstance(getattr(c, key, None), int) and not isinstance(getattr(c, key), bool)
            and getattr(c, key) >= least}


def _expert_counts(model: nn.Module) -> set[int]:
    """The expert counts (two or more) the model's config or its sub-configs name."""
    return _config_ints(_configs(model), _EXPERT_COUNTS, least=2)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear-like module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    w = module.weight  # Conv1D: weight is (in, out)
    return int(w.shape[0]), int(w.shape[1])


def block_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The stacks of transformer blocks, in module order: the ModuleList holding the most parameters,
    plus every other ModuleList (not nested in one already chosen, nor holding one) whose blocks are at
    least a fifth the size of that one's - an encoder-decoder's second stack (BART's
    ``model.decoder.layers``, T5's ``decoder.block``), however few blocks it has (distilbart-12-1's one
    decoder block), but not a block's own small lists (experts, heads)."""
    heads = tuple(head_modules(model))
    lists = [(name, module, sum(p.numel() for p in module.parameters()))
             for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) > 0 and not name.startswith(heads)]
    if not lists:
        return []
    _, largest_list, largest = max(lists, key=lambda item: item[2])
    block_size = largest / len(largest_list)
    chosen: list[tuple[str, nn.ModuleList]] = []
    for name, module, n in sorted(lists, key=lambda item: -item[2]):
        if not n or n / len(module) < block_size / 5:
            continue
        if any(name.startswith(c + ".") or c.startswith(name + ".") for c, _ in chosen):
            continue
        chosen.append((name, module))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(chosen, key=lambda item: order[item[0]])


# How configs name the number of experts a mixture-of-experts router chooses from
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "moe_num_experts", "n_routed_experts")


def _routers(model: nn.Module, chosen: list[tuple[str, nn.Module]]) -> list[str]:
    """Names among ``chosen`` of mixture-of-experts routers (named gate or router, one output per expert of
    the config: Mixtral's ``block_sparse_moe.gate``, JetMoE's ``router.layer``) and of scalar gates (one
    output, as Qwen2-MoE's ``shared_expert_gate``)."""
    counts = _expert_counts(model)

    def router_named(name: str) -> bool:  # HunYuan's router is the Linear "wg" of a module named "gate"
        parts = name.split(".")
        return "gate" in parts[-1] or (len(parts) > 1 and parts[-2] == "gate") or "router" in name

    return [n for n, m in chosen
            if linear_shape(m)[1] == 1 or (linear_shape(m)[1] in counts and router_named(n))]


def find_targets(model: nn.Module, cfg: ModelConfig) -> list[Target]:
    """Adapter targets in module order; raises ModelError when nothing matches."""
    heads = tuple(f"{h}" for h in head_modules(model))
    stack_names = [name for name, _ in block_stacks(model)]
    # nn.MultiheadAttention reads its out_proj's weight directly, bypassing the module's forward, so
    # LoRA there would be inert yet charged to the budget
    inside_mha = tuple(n + "." for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention))
    candidates, inert = [], []
    for name, module in model.named_modules():
        if not name or not is_linear_like(module):
            continue
        if any(name == h or name.startswith(h + ".") for h in heads):
            continue
        if inside_mha and name.startswith(inside_mha):
            inert.append(name)
            continue
        candidates.append((name, module))
    fused = [(n, m, p) for n, m, p in fused_expert_weights(model)
             if not any(n.startswith(h + ".") for h in heads) and not (inside_mha and n.startswith(inside_mha))]
    if inert:
        logger.info("not adapter targets: %d Linear module(s) inside nn.MultiheadAttention (%s, ...), which reads "
                    "their weights directly, so LoRA there would do nothing", len(inert), inert[0])
    refused = peft_refuses(model, [n for n, _ in candidates])
    if refused:
        logger.info("not adapter targets: %d module(s) peft's LoRA refuses on model type %r (%s, ...)", len(refused),
                    getattr(getattr(model, "config", None), "model_type", None), refused[0])
        left_out = set(refused)
        candidates = [(n, m) for n, m in candidates if n not in left_out]
    if cfg.target_regex is not None:
        try:
            pattern = re.compile(cfg.target_regex)
        except re.error as e:
            raise ModelError(f"--model.target_regex {cfg.target_regex!r} is not a valid regex ({e})") from None
        chosen = [(n, m) for n, m in candidates if pattern.fullmatch(n)]
        chosen_fused = [f for f in fused if pattern.fullmatch(f[0])]
        asked = f"--model.target_regex {cfg.target_regex!r}"
    elif cfg.target_modules is not None:
        suffixes = list(cfg.target_modules)
        chosen = [(n, m) for n, m in candidates if any(_has_suffix(n, s) for s in suffixes)]
        chosen_fused = [f for f in fused if any(_has_suffix(f[0], s) for s in suffixes)]
        asked = f"--model.target_modules {','.join(suffixes)}"
        names = [n for n, _ in chosen] + [f[0] for f in chosen_fused]
        unmatched = [s for s in suffixes if not any(_has_suffix(n, s) for n in names)]
        if names and unmatched:  # a typo would silently narrow the targets (and so the budget's meaning)
            kinds = sorted({_layer_and_kind(n, stack_names)[1] for n in [c[0] for c in candidates + fused]})
            raise ModelError(f"--model.target_modules: {', '.join(unmatched)} match(es) no module of {cfg.name} that "
                             f"can take an adapter (Linear-like or a fused 3-D expert weight, outside the task head and "
                             f"nn.MultiheadAttention); "
                             f"such module names end in: {', '.join(kinds[:12])}")
    else:
        chosen = [(n, m) for n, m in candidates if any(n.startswith(stack + ".") for stack in stack_names)]
        chosen_fused = [f for f in fused if any(f[0].startswith(stack + ".") for stack in stack_names)]
        routers = _routers(model, chosen)
        if routers:
            logger.info("not adapter targets by default: %d mixture-of-experts router(s) and scalar gate(s) (%s, "
                        "...), which choose experts rather than transform; name them in --model.target_regex to "
                        "adapt them", len(routers), routers[0])
            chosen = [(n, m) for n, m in chosen if n not in routers]
        asked = "the default (Linear-like modules and fused expert weights inside the transformer blocks)"
        _warn_uncovered_weights(model, stack_names, {id(getattr(m, p)) for _, m, p in chosen_fused})
        if len(stack_names) > 1:
            logger.info("adapter targets in %d block stacks: %s", len(stack_names), ", ".join(stack_names))
    if not chosen and not chosen_fused:
        sample = ", ".join([n for n, _ in candidates[:8]] + [f[0] for f in fused[:2]]) or "none"
        why = (f" ({len(inert)} inside nn.MultiheadAttention, e.g. {inert[0]}, are never targets: it reads their "
               "weights directly, so LoRA there would do nothing)") if inert else ""
        why += f" ({len(refused)}, e.g. {refused[0]}, are refused by peft's LoRA on this model type)" if refused else ""
        raise ModelError(f"no adapter targets match {asked}; Linear-like modules of this model include: {sample}{why}")
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    targets = []
    for name, module in chosen:
        d_in, d_out = linear_shape(module)
        targets.append((order[name], Target(name, d_in, d_out, *_layer_and_kind(name, stack_names))))
    for name, module, param_name in chosen_fused:
        experts, d_in, d_out = expert_shape(module, param_name)
        targets.append((order[name.rpartition(".")[0]] + 0.5,
                        Target(name, d_in, d_out, *_layer_and_kind(name, stack_names), experts=experts)))
    return [t for _, t in sorted(targets, key=lambda item: item[0])]


def peft_refuses(model: nn.Module, names: list[str]) -> list[str]:
    """The modules of ``names`` that peft's LoRA refuses to adapt on ``model``'s architecture (Mamba's
    ``out_proj`` and ``conv1d``, whose weights its fused kernels read directly), by peft's own rule; none
    where this peft has no such rule."""
    try:
        from peft import LoraConfig
        from peft.tuners.tuners_utils import _check_lora_target_modules_mamba as check
    except ImportError:  # another peft: get_peft_model's own refusal is turned into one line instead
        return []
    config = LoraConfig(r=1, target_modules=["-"])
    refused = []
    for name in names:
        try:
            check(config, model, name.rsplit(".", 1)[-1])
        except ValueError:
            refused.append(name)
    return refused


def _warn_uncovered_weights(model: nn.Module, stack_names: list[str], fused: set[int]) -> None:
    """Say so when much of the blocks' weight lies in matrices that get no adapter (XLNet's attention):
    neither in Linear-like modules nor fused expert weights (ids ``fused``); the budget goes to the rest."""
    covered = {id(p) for m in model.modules() if is_linear_like(m) for p in m.parameters()} | fused
    stacks = [m for n, m in model.named_modules() if n in stack_names]
    total, outside = 0, {}
    for stack_name, stack in zip(stack_names, stacks):
        for name, p in stack.named_parameters():
            total += p.numel()
            if id(p) not in covered and p.dim() >= 2:
                outside[f"{stack_name}.{name}"] = p.numel()
    share = sum(outside.values()) / max(1, total)
    if share >= 0.1:
        logger.warning("%.0f%% of the transformer blocks' weights are matrices outside Linear layers (%s, ...), "
                       "which get no adapter; rankalloc adapts Linear-like modules and fused 3-D expert weights "
                       "only", 100 * share,
                       ", ".join(sorted(outside, key=outside.__getitem__, reverse=True)[:3]))


def _has_suffix(name: str, suffix: str) -> bool:
    """``--model.target_modules`` matching: the whole name or its last dotted parts (as peft matches)."""
    return name == suffix or name.endswith("." + suffix)


def _layer_and_kind(name: str, stack_names: list[str]) -> tuple[int | None, str]:
    """Block index and module kind (``attention.self.query``); with several stacks the kind names its
    stack (``model.decoder.layers.self_attn.q_proj``), so encoder and decoder kinds stay apart."""
    for stack_name in stack_names:
        if name.startswith(stack_name + "."):
            rest = name[len(stack_name) + 1:]
            index, _, kind = rest.partition(".")
            if index.isdigit():
                kind = kind or name
                return int(index), (f"{stack_name}.{kind}" if len(stack_names) > 1 else kind)
    m = re.search(r"\.(\d+)\.(.+)$", name)
    if m:
        return int(m.group(1)), m.group(2)
    return None, name


def fingerprint(targets: list[Target]) -> str:
    """A short hash of target names and shapes: equal fingerprints mean a rank map fits."""
    lines = "\n".join(f"{t.name}:{t.in_features}:{t.out_features}" + (f":{t.experts}" if t.experts else "")
                      for t in sorted(targets, key=lambda t: t.name))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]
