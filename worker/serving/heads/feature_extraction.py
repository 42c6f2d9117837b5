"""Feature extraction: token vectors, or a sentence embedding pooled as sentence-transformers pools."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from worker.errors import InvalidRequest
from worker.serving.heads.outputs import (
    Outputs,
)
from worker.serving.inputs import Prepared
from worker.serving.metadata import POOLING_MODES, ModelMetadata


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
