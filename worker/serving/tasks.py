"""Task heads by task name: raw model outputs -> results shaped like the matching transformers pipeline."""

from __future__ import annotations

from worker.serving.heads.classification import (
    Ranking,
    classification_head,
    text_classification,
    zero_shot_image_classification,
)
from worker.serving.heads.feature_extraction import feature_extraction
from worker.serving.heads.outputs import Head
from worker.serving.heads.question_answering import question_answering
from worker.serving.heads.token_classification import token_classification
from worker.serving.metadata import MetadataError, ModelMetadata

HEADS: dict[str, Head] = {
    "text-classification": text_classification,
    "token-classification": token_classification,
    "question-answering": question_answering,
    "image-classification": classification_head(
        Ranking(default_top_k=5, none_is_all=False, score_first=False)
    ),
    "audio-classification": classification_head(Ranking(default_top_k=5, none_is_all=True, score_first=True)),
    "video-classification": classification_head(
        Ranking(default_top_k=5, none_is_all=False, score_first=True)
    ),
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
