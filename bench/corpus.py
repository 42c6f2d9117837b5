"""The bench's inputs: plain English sentences harvested from site-packages, texts of a fixed length."""

from __future__ import annotations

import hashlib
import re
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_DOC_SUFFIXES = frozenset({".md", ".rst", ".txt", ".py"})
_DOCSTRING = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'', re.S)
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
#: A plain sentence: capital first, sentence punctuation last, no markup or code characters.
_PLAIN = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'\"()/%&.\-]*[a-z0-9)'\"][.!?]$")


def doc_roots() -> list[Path]:
    """This interpreter's site-packages folders."""
    paths = sysconfig.get_paths()
    return sorted({Path(paths["purelib"]), Path(paths["platlib"])})


def is_plain_sentence(sentence: str, min_words: int = 3, max_words: int = 120) -> bool:
    """English prose rather than code, markup, a heading or a parameter list."""
    words = sentence.split()
    return (
        min_words <= len(words) <= max_words
        and _PLAIN.match(sentence) is not None
        and not words[0].endswith(":")
        and ".." not in sentence
        and sum(word.isalpha() for word in words) >= 0.7 * len(words)
    )


def harvest_sentences(roots: Sequence[Path], count: int) -> tuple[list[str], int]:
    """``count`` plain sentences from .md/.rst/.txt files and docstrings under ``roots``.

    The choice is deterministic (the lowest SHA-1 hashes), so every run and every machine
    with the same packages gets the same set. Returns the sentences and how many files were read.
    """
    files = sorted(
        path for root in roots for path in root.rglob("*") if path.suffix in _DOC_SUFFIXES and path.is_file()
    )
    found: set[str] = set()
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        blocks = [a or b for a, b in _DOCSTRING.findall(text)] if path.suffix == ".py" else [text]
        for block in blocks:
            for paragraph in re.split(r"\n\s*\n", block):
                for sentence in _SENTENCE_BREAK.split(" ".join(paragraph.split())):
                    if is_plain_sentence(sentence):
                        found.add(sentence)
    chosen = sorted(found, key=lambda s: hashlib.sha1(s.encode()).hexdigest())[:count]
    return chosen, len(files)


def token_lengths(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Tokens per text, special tokens included, nothing cut."""
    return [len(ids) for ids in tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]]


def fixed_length_texts(tokenizer: Any, sentences: Sequence[str], tokens: int, count: int) -> list[str]:
    """Texts of exactly ``tokens`` tokens (special tokens included): running prose cut and decoded."""
    pieces = tokenizer(list(sentences), add_special_tokens=False, verbose=False)["input_ids"]
    body = tokens - tokenizer.num_special_tokens_to_add()
    texts: list[str] = []
    buffer: list[int] = []
    for index in range(len(pieces) * 8):
        if len(texts) == count:
            break
        buffer += pieces[index % len(pieces)]
        if len(buffer) < body:
            continue
        text = tokenizer.decode(buffer[:body])
        buffer = []
        # Word pieces do not always survive decode + encode; keep only exact round trips.
        if len(tokenizer(text, truncation=False, verbose=False)["input_ids"]) == tokens:
            texts.append(text)
    return texts


def cycled(items: Sequence[Any], rate: float, seconds: float) -> list[Any]:
    """``items`` repeated in order, enough for ``seconds`` at ``rate`` per second (at least 20)."""
    return [items[i % len(items)] for i in range(max(20, int(rate * seconds)))]


def spaced_sample(items: Sequence[Any], count: int) -> list[Any]:
    """``count`` items evenly spaced through ``items`` (all of them when there are fewer)."""
    if count >= len(items):
        return list(items)
    return [items[int(i * len(items) / count)] for i in range(count)]
