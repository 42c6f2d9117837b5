"""Question answering: the best word-aligned answer spans of the context, like transformers 4's pipeline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from worker.errors import InvalidRequest
from worker.serving.heads.outputs import (
    Outputs,
    alignment_of,
    positive_int,
    softmax,
)
from worker.serving.inputs import Prepared
from worker.serving.metadata import ModelMetadata
from worker.serving.tokenizing import TokenAlignment


def question_answering(
    metadata: ModelMetadata, outputs: Outputs, prepared: Prepared, parameters: Mapping[str, Any]
) -> Any:
    """Like transformers 4's QuestionAnsweringPipeline (gone in 5): best word-aligned spans of the context
    (text = question, text_pair = context); one answer bare, several as a list."""
    alignment = alignment_of(prepared, metadata.task)
    context = prepared.context.get("text_pair")
    if context is None:
        raise InvalidRequest("question answering needs the question as 'text' and the context as 'text_pair'")
    count = len(alignment.ids)
    # No span is longer than the sequence, nor are there more answers than spans: the bounds keep a
    # request asking for a million of each to the work of the spans that exist.
    max_answer_len = min(positive_int(parameters, "max_answer_len", 15), count)
    in_context = np.array([sequence == 1 for sequence in alignment.sequence_ids])
    # The pipeline lets CLS into the softmax (some models answer "impossible" there), then zeroes it.
    is_cls = np.array([token == alignment.cls_id for token in alignment.ids])
    start = _masked_softmax(outputs["start_logits"][0][:count], in_context | is_cls)
    end = _masked_softmax(outputs["end_logits"][0][:count], in_context | is_cls)
    null_score = float(start[0] * end[0])
    spans = _span_scores(start, end, in_context, max_answer_len)
    top_k = min(positive_int(parameters, "top_k", 1), int(np.count_nonzero(spans)) or 1)
    words = _word_spans(alignment)
    # Like the pipeline, weigh only the top_k * 2 + 10 best spans before merging equal answers.
    answers: dict[str, dict[str, Any]] = {}
    for flat in _best(spans, top_k * 2 + 10):
        first, offset = divmod(int(flat), max_answer_len)
        score = float(spans[first, offset])
        start_char, end_char = words[first][0], words[first + offset][1]
        text = context[start_char:end_char]
        # As in the pipeline, spans that align to the same text (case aside) pool their scores.
        same = answers.get(text.lower())
        if same is not None:
            same["score"] += score
        else:
            answers[text.lower()] = {"score": score, "start": start_char, "end": end_char, "answer": text}
    found = list(answers.values())
    if parameters.get("handle_impossible_answer", False):
        found.append({"score": null_score, "start": 0, "end": 0, "answer": ""})
    found = sorted(found, key=lambda answer: float(answer["score"]), reverse=True)[:top_k]
    return found[0] if len(found) == 1 else found


def _span_scores(start: np.ndarray, end: np.ndarray, allowed: np.ndarray, longest: int) -> np.ndarray:
    """Score of each span as [first token, length - 1]: start x end probability, 0 where the span leaves
    the sequence or either end lies outside the context (the pipeline also zeroes the CLS position).

    A band of n x longest, not the pipeline's n x n matrix: the work is O(n x max_answer_len)."""
    count = len(start)
    last = np.arange(count)[:, None] + np.arange(longest)[None, :]
    inside = last < count
    last = np.minimum(last, count - 1)
    keep = inside & allowed[:, None] & allowed[last]
    scores: np.ndarray = np.where(keep, start[:, None] * end[last], 0.0)
    return scores


def _best(scores: np.ndarray, wanted: int) -> np.ndarray:
    """Flat indices of the ``wanted`` best positive scores, best first; ties in index order (first token,
    then length) as a stable sort of the pipeline's start x end matrix orders them."""
    flat = scores.ravel()
    candidates = np.flatnonzero(flat > 0.0)
    if wanted < len(candidates):
        # Everything at least as good as the wanted-th best (ties included), then one stable sort of those.
        floor = np.partition(flat[candidates], len(candidates) - wanted)[len(candidates) - wanted]
        candidates = candidates[flat[candidates] >= floor]
    order = candidates[np.argsort(-flat[candidates], kind="stable")]
    return order[:wanted]


def _masked_softmax(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Softmax with disallowed positions at the pipeline's -10000 (so they weigh nothing)."""
    return softmax(np.where(allowed, logits.astype(np.float64), -10000.0))


def _word_spans(alignment: TokenAlignment) -> list[tuple[int, int]]:
    """Per token, the character span in the context of the whole word it belongs to (one pass)."""
    words: dict[int | None, tuple[int, int]] = {}
    for (first, last), sequence, word in zip(
        alignment.offsets, alignment.sequence_ids, alignment.word_ids, strict=True
    ):
        if sequence == 1:
            low, high = words.get(word, (first, last))
            words[word] = (min(low, first), max(high, last))
    return [
        words.get(word, offsets) if sequence == 1 else offsets
        for offsets, sequence, word in zip(
            alignment.offsets, alignment.sequence_ids, alignment.word_ids, strict=True
        )
    ]
