"""Text to token arrays at a bucket length, and what the token heads need to map tokens back to text."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.serving.metadata import ModelMetadata

#: Tasks whose heads map tokens back to characters, so the text processor records where each came from.
ALIGNED_TASKS = frozenset({"token-classification", "question-answering"})


@dataclass(frozen=True)
class TokenAlignment:
    """Per real token of one text row: what the token and answer-span heads need besides logits."""

    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    #: Character span of each token in its own text (the first text or the pair).
    offsets: tuple[tuple[int, int], ...]
    special: tuple[bool, ...]
    #: 0 for the first text, 1 for the pair, None for special tokens.
    sequence_ids: tuple[int | None, ...]
    word_ids: tuple[int | None, ...]
    unk_id: int | None
    cls_id: int | None
    #: The tokenizer's tokens -> text (joins word pieces, tidies spaces before punctuation).
    detokenize: Callable[[list[str]], str]


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """Smallest bucket that holds ``length`` (callers cut to the largest first)."""
    return next(b for b in buckets if b >= length)


def prompt_length(tokenizer: Any, prompt: str) -> int:
    """Tokens a prompt takes at the start of a text, its leading special token included and a trailing
    one (SEP, EOS) not: how sentence-transformers measures it to leave the prompt out of pooling."""
    ids = list(tokenizer(prompt)["input_ids"])
    special = set(getattr(tokenizer, "all_special_ids", ()))
    return len(ids) - 1 if ids and ids[-1] in special else len(ids)


def sequence_pad_values(metadata: ModelMetadata, tokenizer: Any) -> dict[str, int]:
    """How the tokenizer pads each token input, when the attention mask hides padding from the model.

    Empty (requests keep their own bucket) without an ``attention_mask`` input, or when another
    input runs along the sequence too (its padding value is unknown).
    """
    if metadata.input("attention_mask") is None:
        return {}
    known = {
        "input_ids": int(tokenizer.pad_token_id or 0),
        "attention_mask": 0,
        "token_type_ids": int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
    }
    along = [spec.name for spec in metadata.inputs if any(d in metadata.sequence_dims for d in spec.shape)]
    if any(name not in known for name in along):
        return {}
    return {name: known[name] for name in along}


def tokenize_text(
    tokenizer: Any, texts: Sequence[tuple[str, str | None]], buckets: Sequence[int], **extra: Any
) -> tuple[Any, bool]:
    """Tokenize rows unpadded, cut at the largest bucket (flagged); ``extra`` goes to the tokenizer."""
    firsts = [t for t, _ in texts]
    pairs = [p for _, p in texts]
    with_pairs = any(p is not None for p in pairs)
    kwargs: dict[str, Any] = {"text_pair": [p or "" for p in pairs]} if with_pairs else {}
    encoding = tokenizer(firsts, truncation=False, verbose=False, **kwargs, **extra)
    truncated = max(len(ids) for ids in encoding["input_ids"]) > buckets[-1]
    if truncated:
        encoding = tokenizer(
            firsts, truncation=True, max_length=buckets[-1], verbose=False, **kwargs, **extra
        )
    return encoding, truncated


def pad_to_bucket(tokenizer: Any, encoding: Any, buckets: Sequence[int]) -> dict[str, np.ndarray]:
    """Pad every row to the smallest bucket that holds the longest one."""
    length = bucket_for(max(len(ids) for ids in encoding["input_ids"]), buckets)
    padded = tokenizer.pad(encoding, padding="max_length", max_length=length, return_tensors="np")
    return {k: np.asarray(v) for k, v in padded.items()}


def encode_text(
    tokenizer: Any, texts: Sequence[tuple[str, str | None]], buckets: Sequence[int]
) -> tuple[dict[str, np.ndarray], bool]:
    """Tokenize rows, cut at the largest bucket (flagged), pad all to one bucket length."""
    encoding, truncated = tokenize_text(tokenizer, texts, buckets)
    return pad_to_bucket(tokenizer, encoding, buckets), truncated


def token_alignment(tokenizer: Any, encoding: Any) -> TokenAlignment:
    """The first row's token alignment; takes the offsets and special-token mask out of ``encoding``."""
    ids = [int(i) for i in encoding["input_ids"][0]]
    return TokenAlignment(
        ids=tuple(ids),
        tokens=tuple(tokenizer.convert_ids_to_tokens(ids)),
        offsets=tuple((int(start), int(end)) for start, end in encoding.pop("offset_mapping")[0]),
        special=tuple(bool(flag) for flag in encoding.pop("special_tokens_mask")[0]),
        sequence_ids=tuple(encoding.sequence_ids(0)),
        word_ids=tuple(encoding.word_ids(0)),
        unk_id=tokenizer.unk_token_id,
        cls_id=tokenizer.cls_token_id,
        detokenize=tokenizer.convert_tokens_to_string,
    )
