"""What every task head reads: the outputs, scores over logits, the request's parameters, labels, tokens."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from worker.errors import InvalidRequest
from worker.serving.inputs import Prepared
from worker.serving.metadata import ModelMetadata
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


def positive_int(parameters: Mapping[str, Any], name: str, default: int) -> int:
    """Parameter ``name`` as a positive integer (``default`` when absent); else InvalidRequest."""
    value = parameters.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidRequest(f"parameter {name!r} must be a positive integer")
    return value


def top_k_of(parameters: Mapping[str, Any], default: int, available: int, *, none_is_all: bool) -> int:
    """How many of ``available`` answers the request's ``top_k`` asks for (None: all, or the default)."""
    if parameters.get("top_k", default) is None:
        return available if none_is_all else min(default, available)
    return min(positive_int(parameters, "top_k", default), available)


def label_of(metadata: ModelMetadata, index: int) -> str:
    """The model's label for class ``index`` (``LABEL_<i>`` where the folder names none)."""
    labels = metadata.labels
    return labels[index] if labels is not None and index < len(labels) else f"LABEL_{index}"


def alignment_of(prepared: Prepared, task: str) -> TokenAlignment:
    """The request's token alignment (text inputs only; raw tensors carry none)."""
    alignment = prepared.context.get("alignment")
    if not isinstance(alignment, TokenAlignment):
        raise InvalidRequest(f"{task} needs text inputs: raw tensors carry no token offsets")
    return alignment
