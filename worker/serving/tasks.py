"""Task heads: raw model outputs -> results shaped like the matching transformers pipeline."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.errors import InvalidRequest
from worker.serving.inputs import Prepared
from worker.serving.metadata import POOLING_MODES, MetadataError, ModelMetadata
from worker.serving.tokenizing import TokenAlignment

Outputs = Mapping[str, np.ndarray]
Head = Callable[[ModelMetadata, Outputs, Prepared, Mapping[str, Any]], Any]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis, in float64 like the pipelines' numpy path."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    result: np.ndarray = exp / exp.sum(axis=-1, keepdims=True)
    return result


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Element-wise logistic function."""
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))


def _positive_int(parameters: Mapping[str, Any], name: str, default: int) -> int:
    value = parameters.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidRequest(f"parameter {name!r} must be a positive integer")
    return value


def _top_k(parameters: Mapping[str, Any], default: int, available: int, *, none_is_all: bool) -> int:
    if parameters.get("top_k", default) is None:
        return available if none_is_all else min(default, available)
    return min(_positive_int(parameters, "top_k", default), available)


def _label(metadata: ModelMetadata, index: int) -> str:
    labels = metadata.labels
    return labels[index] if labels is not None and index < len(labels) else f"LABEL_{index}"


def _alignment(prepared: Prepared, task: str) -> TokenAlignment:
    alignment = prepared.context.get("alignment")
    if not isinstance(alignment, TokenAlignment):
        raise InvalidRequest(f"{task} needs text inputs: raw tensors carry no token offsets")
    return alignment


# --- classification ------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranking:
    """Where the classification pipelines differ: default top_k, what top_k=None means, key order."""

    default_top_k: int
    #: top_k=None gives every label (text, audio) or the default count (image, video).
    none_is_all: bool
    #: Entries read {"score", "label"} (audio, video, zero-shot) or {"label", "score"} (text, image).
    score_first: bool

    def rank(self, metadata: ModelMetadata, logits: np.ndarray, top_k: int) -> list[dict[str, Any]]:
        """The top_k labels, best first; ties keep label order like the pipelines' stable sort."""
        scores = sigmoid(logits) if logits.shape[-1] == 1 else softmax(logits)
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [self.entry(_label(metadata, int(i)), float(scores[i])) for i in order]

    def entry(self, label: str, score: float) -> dict[str, Any]:
        """One label and its score, in the pipeline's key order."""
        return {"score": score, "label": label} if self.score_first else {"label": label, "score": score}


def _classification(ranking: Ranking) -> Head:
    def head(
        metadata: ModelMetadata, outputs: Outputs, prepared: Prepared, parameters: Mapping[str, Any]
    ) -> Any:
        logits = outputs["logits"][0]
        top_k = _top_k(parameters, ranking.default_top_k, logits.shape[-1], none_is_all=ranking.none_is_all)
        return ranking.rank(metadata, logits, top_k)

    return head


_TEXT_RANKING = Ranking(default_top_k=1, none_is_all=True, score_first=False)


def text_classification(
    metadata: ModelMetadata, outputs: Outputs, prepared: Prepared, parameters: Mapping[str, Any]
) -> Any:
    """Ranked labels; without top_k the pipeline's legacy form: the best one, listed for a lone text,
    bare for a text pair."""
    logits = outputs["logits"][0]
    if "top_k" in parameters:
        return _TEXT_RANKING.rank(metadata, logits, _top_k(parameters, 1, logits.shape[-1], none_is_all=True))
    [best] = _TEXT_RANKING.rank(metadata, logits, 1)
    return best if prepared.context.get("text_pair") is not None else [best]


def zero_shot_image_classification(
    metadata: ModelMetadata, outputs: Outputs, prepared: Prepared, parameters: Mapping[str, Any]
) -> Any:
    """Scores over the request's candidate labels, best first (as the pipeline returns them)."""
    logits = outputs["logits_per_image"][0]
    labels = prepared.context.get("candidate_labels")
    if labels is None:
        raise InvalidRequest("zero-shot classification needs an image with candidate_labels, not raw tensors")
    scores = softmax(logits)
    order = np.argsort(-scores, kind="stable")
    return [{"score": float(scores[i]), "label": labels[i]} for i in order]


# --- token classification ------------------------------------------------------------------


def token_classification(
    metadata: ModelMetadata, outputs: Outputs, prepared: Prepared, parameters: Mapping[str, Any]
) -> Any:
    """Like TokenClassificationPipeline: an entry per token ("none") or per entity group ("simple")."""
    alignment = _alignment(prepared, metadata.task)
    strategy = str(parameters.get("aggregation_strategy", "none")).lower()
    if strategy not in ("none", "simple"):
        raise InvalidRequest("parameter 'aggregation_strategy' must be 'none' or 'simple'")
    ignore = parameters.get("ignore_labels", ["O"])
    if not isinstance(ignore, list):
        raise InvalidRequest("parameter 'ignore_labels' must be a list of labels")
    text = prepared.context["text"]
    scores = softmax(outputs["logits"][0][: len(alignment.ids)])
    entities: list[dict[str, Any]] = []
    for index, token_scores in enumerate(scores):
        if alignment.special[index]:
            continue
        best = int(token_scores.argmax())
        start, end = alignment.offsets[index]
        # An unknown token says nothing about its text; the pipeline shows the text it covers.
        unknown = alignment.ids[index] == alignment.unk_id
        entities.append(
            {
                "entity": _label(metadata, best),
                "score": float(token_scores[best]),
                "index": index,
                "word": text[start:end] if unknown else alignment.tokens[index],
                "start": start,
                "end": end,
            }
        )
    if strategy == "simple":
        entities = _group_entities(entities, alignment.detokenize)
    return [e for e in entities if e.get("entity", e.get("entity_group")) not in ignore]


def _tag(label: str) -> tuple[str, str]:
    """("B" or "I", entity type); a label without a B-/I- prefix continues like an I- tag."""
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


def _group_entities(
    entities: list[dict[str, Any]], detokenize: Callable[[list[str]], str]
) -> list[dict[str, Any]]:
    """Adjacent tokens of one entity type, each run starting afresh at a B- tag, as one group."""
    groups: list[list[dict[str, Any]]] = []
    for entity in entities:
        bi, tag = _tag(entity["entity"])
        if groups and bi != "B" and tag == _tag(groups[-1][-1]["entity"])[1]:
            groups[-1].append(entity)
        else:
            groups.append([entity])
    return [
        {
            "entity_group": group[0]["entity"].split("-", 1)[-1],
            "score": float(np.mean([entity["score"] for entity in group])),
            "word": detokenize([entity["word"] for entity in group]),
            "start": group[0]["start"],
            "end": group[-1]["end"],
        }
        for group in groups
    ]


# --- question answering --------------------------------------------------------------------


def question_answering(
    metadata: ModelMetadata, outputs: Outputs, prepared: Prepared, parameters: Mapping[str, Any]
) -> Any:
    """Like transformers 4's QuestionAnsweringPipeline (gone in 5): best word-aligned spans of the context
    (text = question, text_pair = context); one answer bare, several as a list."""
    alignment = _alignment(prepared, metadata.task)
    context = prepared.context.get("text_pair")
    if context is None:
        raise InvalidRequest("question answering needs the question as 'text' and the context as 'text_pair'")
    count = len(alignment.ids)
    # No span is longer than the sequence, nor are there more answers than spans: the bounds keep a
    # request asking for a million of each to the work of the spans that exist.
    max_answer_len = min(_positive_int(parameters, "max_answer_len", 15), count)
    in_context = np.array([sequence == 1 for sequence in alignment.sequence_ids])
    # The pipeline lets CLS into the softmax (some models answer "impossible" there), then zeroes it.
    is_cls = np.array([token == alignment.cls_id for token in alignment.ids])
    start = _masked_softmax(outputs["start_logits"][0][:count], in_context | is_cls)
    end = _masked_softmax(outputs["end_logits"][0][:count], in_context | is_cls)
    null_score = float(start[0] * end[0])
    spans = _span_scores(start, end, in_context, max_answer_len)
    top_k = min(_positive_int(parameters, "top_k", 1), int(np.count_nonzero(spans)) or 1)
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


# --- feature extraction --------------------------------------------------------------------


def feature_extraction(
    metadata: ModelMetadata, outputs: Outputs, prepared: Prepared, parameters: Mapping[str, Any]
) -> Any:
    """Token vectors of the real tokens, or one sentence embedding pooled as sentence-transformers pools
    (the graph's own, when it pools itself and the request names no pooling), optionally L2-normalised."""
    pooling = parameters.get("pooling")
    normalize = bool(parameters.get("normalize", metadata.normalize))
    pooled = metadata.pooled_output
    if pooling is None and pooled is not None:
        vector = outputs[pooled][0].astype(np.float64)
    else:
        modes = _pooling_modes(pooling if pooling is not None else metadata.pooling or "none")
        name = metadata.token_output
        if name is None:
            raise InvalidRequest(f"model {metadata.name!r} returns only a pooled embedding, no token vectors")
        hidden = outputs[name][0].astype(np.float64)
        mask = prepared.arrays.get("attention_mask")
        real = mask[0].astype(bool) if mask is not None and mask.shape[-1] == hidden.shape[0] else None
        if modes == ("none",):
            return [(hidden if real is None else hidden[real]).tolist()]
        positions = np.flatnonzero(real) if real is not None else np.arange(hidden.shape[0])
        # Like sentence-transformers' include_prompt=False: the prompt's tokens (CLS included) weigh nothing.
        skip = 0 if metadata.include_prompt else int(prepared.context.get("prompt_tokens", 0))
        vector = np.concatenate([_pool(mode, hidden, positions, skip) for mode in modes])
    if normalize:
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
    return vector.tolist()


def _pooling_modes(pooling: Any) -> tuple[str, ...]:
    """Requested pooling as sentence-transformers mode names; several are concatenated."""
    modes = tuple(pooling.replace(" ", "").split(",")) if isinstance(pooling, str) else ()
    if modes != ("none",) and not (modes and set(modes) <= set(POOLING_MODES)):
        raise InvalidRequest(
            f"unknown pooling {pooling!r}: use none, or one or more of {', '.join(POOLING_MODES)}"
        )
    return modes


def _pool(mode: str, hidden: np.ndarray, positions: np.ndarray, skip: int) -> np.ndarray:
    """One pooling mode over the real tokens at ``positions``, leaving out the first ``skip``.

    As ``sentence_transformers...Pooling``: CLS is the first token kept, weighted mean weighs each token
    by its position among the real tokens (1, 2, ...), last token is the last real one.
    """
    weights = np.arange(1, len(positions) + 1, dtype=np.float64)[skip:]
    tokens = hidden[positions[skip:]]
    if mode == "cls":
        pooled: np.ndarray = tokens[0]
    elif mode == "lasttoken":
        pooled = tokens[-1]
    elif mode == "max":
        pooled = tokens.max(axis=0)
    elif mode == "mean":
        pooled = tokens.sum(axis=0) / max(len(tokens), 1e-9)
    elif mode == "mean_sqrt_len_tokens":
        pooled = tokens.sum(axis=0) / np.sqrt(max(len(tokens), 1e-9))
    else:  # weightedmean
        pooled = (tokens * weights[:, None]).sum(axis=0) / max(float(weights.sum()), 1e-9)
    return pooled


HEADS: dict[str, Head] = {
    "text-classification": text_classification,
    "token-classification": token_classification,
    "question-answering": question_answering,
    "image-classification": _classification(Ranking(default_top_k=5, none_is_all=False, score_first=False)),
    "audio-classification": _classification(Ranking(default_top_k=5, none_is_all=True, score_first=True)),
    "video-classification": _classification(Ranking(default_top_k=5, none_is_all=False, score_first=True)),
    "zero-shot-image-classification": zero_shot_image_classification,
    "feature-extraction": feature_extraction,
}


def head_for(metadata: ModelMetadata) -> Head:
    """The task head for a model; an unsupported task fails when the model loads."""
    head = HEADS.get(metadata.task)
    if head is None:
        raise MetadataError(
            f"{metadata.folder}: task {metadata.task!r} is not supported (supported: {', '.join(sorted(HEADS))})"
        )
    return head
