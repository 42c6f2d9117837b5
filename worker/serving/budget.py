"""The token budget: how many requests one batch of a shape may take (batching policy, per model)."""

from __future__ import annotations

from worker.serving.metadata import Bucket, ModelMetadata


def batch_limit(metadata: ModelMetadata, key: Bucket, max_rows: int, max_tokens: int) -> int:
    """Most rows one batch of shape ``key`` should take: a request is one row, a zero-shot request one
    per candidate label (the batcher counts them), so a batch of such requests stays within the budget.

    ``max_rows``, unless rows x the key's sequence bucket would exceed ``max_tokens``: then
    the largest batch bucket within the budget (at least 1), so the batch is not padded back
    up. On a CPU cost grows with tokens, so the budget bounds one batch's run time and memory.
    """
    tokens = metadata.sequence_length(key)
    if tokens is None or max_rows * tokens <= max_tokens:
        return max_rows
    fits = max_tokens // tokens
    return max((b for b in metadata.batch_sizes if b <= fits), default=1)
