"""Tokenisation shared by the task families: texts (and text pairs) for encoders and classifiers, and
prompt + answer sequences with token labels for decoders."""
from __future__ import annotations

import logging
from typing import Any

import pandas as pd
import torch

logger = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
IGNORE = -100  # token label of a position without a loss (prompt, padding)
_TOKENIZE_CHUNK = 8192  # examples per tokenizer call, to bound peak memory on large tasks


def tokenize_texts(df: pd.DataFrame, tokenizer: Any, max_length: int) -> dict[str, torch.Tensor]:
    """``text`` (and ``text_pair`` if present), truncated and padded to ``max_length``."""
    has_pair = "text_pair" in df.columns
    separator = pair_separator(tokenizer) if has_pair else None
    if separator is not None:
        df = pd.DataFrame({"text": [f"{a}{separator}{b}" for a, b in zip(df["text"], df["text_pair"])]})
        has_pair = False
    accepted = set(getattr(tokenizer, "model_input_names", MODEL_INPUTS)) & set(MODEL_INPUTS)
    accepted |= {"input_ids", "attention_mask"}
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(df), _TOKENIZE_CHUNK):
        chunk = df.iloc[start:start + _TOKENIZE_CHUNK]
        encoded = tokenizer(chunk["text"].tolist(), chunk["text_pair"].tolist() if has_pair else None,
                            truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
        for key in MODEL_INPUTS:
            if key in encoded and key in accepted:
                parts.setdefault(key, []).append(encoded[key].to(torch.long))
    return {k: torch.cat(v) for k, v in parts.items()}


def pair_separator(tokenizer: Any) -> str | None:
    """What joins the two texts of a pair into one text when ``tokenizer`` has no pair template (GPT-2's and
    other byte-level BPE tokenizers, where they would run together): its separator or end-of-sequence token;
    None when the tokenizer marks pairs itself."""
    if _marks_pairs(tokenizer):
        return None
    return tokenizer.sep_token or tokenizer.eos_token or "\n"


def _marks_pairs(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` puts something between (or after) the two texts of a pair, as BERT's
    ``[SEP]`` or T5's ``</s>`` do; a tokenizer with no pair template just concatenates them."""
    single = tokenizer("a")["input_ids"]
    second = tokenizer("b", add_special_tokens=False)["input_ids"]
    return tokenizer("a", "b")["input_ids"] != single + second


def tokenize_prompt_answer(prompts: list[str], answers: list[str], tokenizer: Any, max_length: int,
                            add_eos: bool, label_key: str) -> dict[str, torch.Tensor]:
    """Prompt then answer, right-padded to ``max_length``; ``label_key`` holds the answer's token ids
    and IGNORE elsewhere.

    The answer follows the prompt after one space (trailing space of the prompt dropped, as evaluation
    harnesses join them).  Prompt and answer are tokenised together and split where the prompt's own
    tokens end, so the answer's tokens are those the model sees in context.  A start token (BOS, else
    EOS) leads when the tokenizer adds one or the prompt is empty, so the first answer token is always
    predicted from something.  When the pair is too long the prompt loses its beginning (after the start
    token), so the tokens nearest the answer stay; an answer longer than ``max_length - 2`` tokens is cut.
    """
    start = _start_tokens(tokenizer)
    end = None
    if add_eos:  # the end-of-text token; a tokenizer without one ends the answer with its separator
        end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(tokenizer, "sep_token_id", None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n = len(prompts)
    ids = torch.full((n, max_length), pad, dtype=torch.long)
    mask = torch.zeros((n, max_length), dtype=torch.long)
    labels = torch.full((n, max_length), IGNORE, dtype=torch.long)
    cut_answers = cut_prompts = 0
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        p, a = _split_tokens(tokenizer, prompt.rstrip(), answer.strip())
        lead = start if (start or p) else _fallback_start(tokenizer)
        a = a + ([end] if end is not None else [])
        if len(a) > max_length - 1 - len(lead):
            a, cut_answers = a[:max(1, max_length - 1 - len(lead))], cut_answers + 1
        room = max_length - len(a) - len(lead)
        if len(p) > room:
            p, cut_prompts = p[len(p) - room:] if room > 0 else [], cut_prompts + 1
        p = lead + p
        seq = p + a
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        if a:
            labels[i, len(p):len(seq)] = torch.tensor(a, dtype=torch.long)
    if cut_prompts or cut_answers:
        logger.info("max length %d: %d prompt(s) lost their beginning, %d answer(s) were cut", max_length,
                    cut_prompts, cut_answers)
    return {"input_ids": ids, "attention_mask": mask, label_key: labels}


def _start_tokens(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text (Llama's BOS); none for GPT-2 or BERT-style
    tokenizers, whose [CLS] ... [SEP] frame is not a decoder's."""
    bos = getattr(tokenizer, "bos_token_id", None)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if bos is not None and probe and probe[0] == bos else []


def _fallback_start(tokenizer: Any) -> list[int]:
    for token in (getattr(tokenizer, "bos_token_id", None), tokenizer.eos_token_id, tokenizer.pad_token_id):
        if token is not None:
            return [token]
    return [0]


def _split_tokens(tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) without special tokens, from tokenising ``prompt + " " + answer`` once
    and splitting after the prompt's tokens; tokenised apart when a merge crosses the boundary."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    if not answer:
        return list(p), []
    joined = f"{prompt} {answer}" if prompt else answer
    whole = tokenizer(joined, add_special_tokens=False)["input_ids"]
    if whole[:len(p)] == p and len(whole) > len(p):
        return list(p), list(whole[len(p):])
    return list(p), list(tokenizer((" " + answer) if prompt else answer, add_special_tokens=False)["input_ids"])
