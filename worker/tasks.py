"""Task heads: raw model outputs -> results shaped like the matching transformers pipeline."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from worker.errors import InvalidRequest
from worker.metadata import MetadataError, ModelMetadata
from worker.processors import Prepared

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


def _top_k(parameters: Mapping[str, Any], default: int | None, available: int) -> int:
    value = parameters.get("top_k", default)
    if value is None:
        return available
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidRequest("parameter 'top_k' must be a positive integer or null")
    return min(value, available)


def _label(metadata: ModelMetadata, index: int) -> str:
    labels = metadata.labels
    return labels[index] if labels is not None and index < len(labels) else f"LABEL_{index}"


def _ranked(metadata: ModelMetadata, logits: np.ndarray, top_k: int) -> list[dict[str, Any]]:
    scores = sigmoid(logits) if logits.shape[-1] == 1 else softmax(logits)
    order = np.argsort(-scores, kind="stable")[:top_k]
    return [{"label": _label(metadata, int(i)), "score": float(scores[i])} for i in order]


def _classification(default_top_k: int | None) -> Head:
    def head(
        metadata: ModelMetadata, outputs: Outputs, prepared: Prepared, parameters: Mapping[str, Any]
    ) -> Any:
        logits = outputs["logits"][0]
        return _ranked(metadata, logits, _top_k(parameters, default_top_k, logits.shape[-1]))

    return head


def zero_shot_image_classification(
    metadata: ModelMetadata, outputs: Outputs, prepared: Prepared, parameters: Mapping[str, Any]
) -> Any:
    """Scores over the request's candidate labels, best first (as the pipeline returns them)."""
    logits = outputs["logits_per_image"][0]
    labels = prepared.context["candidate_labels"]
    scores = softmax(logits)
    order = np.argsort(-scores, kind="stable")
    return [{"score": float(scores[i]), "label": labels[i]} for i in order]


def feature_extraction(
    metadata: ModelMetadata, outputs: Outputs, prepared: Prepared, parameters: Mapping[str, Any]
) -> Any:
    """Token embeddings of the real tokens, or one pooled (optionally normalised) vector."""
    name = "last_hidden_state" if "last_hidden_state" in outputs else next(iter(outputs))
    hidden = outputs[name][0].astype(np.float64)
    mask = prepared.arrays.get("attention_mask")
    real = mask[0].astype(bool) if mask is not None and mask.shape[-1] == hidden.shape[0] else None
    pooling = parameters.get("pooling", metadata.pooling or "none")
    normalize = bool(parameters.get("normalize", metadata.normalize))
    if pooling == "none":
        tokens = hidden if real is None else hidden[real]
        return [tokens.tolist()]
    if pooling == "mean":
        weights = real.astype(np.float64) if real is not None else np.ones(hidden.shape[0])
        vector = (hidden * weights[:, None]).sum(axis=0) / max(weights.sum(), 1e-9)
    elif pooling == "cls":
        vector = hidden[0]
    else:
        raise InvalidRequest(f"unknown pooling {pooling!r}: use mean, cls or none")
    if normalize:
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
    return vector.tolist()


HEADS: dict[str, Head] = {
    "text-classification": _classification(1),
    "image-classification": _classification(5),
    "audio-classification": _classification(5),
    "video-classification": _classification(5),
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
