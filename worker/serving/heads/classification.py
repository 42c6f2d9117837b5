"""Classification heads: ranked labels over a request's logits (text, image, audio, video, zero-shot)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.errors import InvalidRequest
from worker.serving.heads.outputs import (
    Head,
    Outputs,
    label_of,
    sigmoid,
    softmax,
    top_k_of,
)
from worker.serving.inputs import Prepared
from worker.serving.metadata import ModelMetadata


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
        return [self.entry(label_of(metadata, int(i)), float(scores[i])) for i in order]

    def entry(self, label: str, score: float) -> dict[str, Any]:
        """One label and its score, in the pipeline's key order."""
        return {"score": score, "label": label} if self.score_first else {"label": label, "score": score}


def classification_head(ranking: Ranking) -> Head:
    """The head of a classification pipeline that ranks as ``ranking`` says."""

    def head(
        metadata: ModelMetadata, outputs: Outputs, prepared: Prepared, parameters: Mapping[str, Any]
    ) -> Any:
        logits = outputs["logits"][0]
        top_k = top_k_of(parameters, ranking.default_top_k, logits.shape[-1], none_is_all=ranking.none_is_all)
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
        return _TEXT_RANKING.rank(
            metadata, logits, top_k_of(parameters, 1, logits.shape[-1], none_is_all=True)
        )
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
