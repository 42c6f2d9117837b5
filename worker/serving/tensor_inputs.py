"""Raw tensor inputs (Open Inference Protocol) held to what the graph accepts before they reach a batch.

An embedding lookup with an id outside its table fails the whole batch in ONNX Runtime (or reads
another row), and a float cast to integer ids silently truncates: both are refused per request here.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from worker.errors import InvalidRequest
from worker.serving.metadata import ModelMetadata
from worker.serving.metadata.hf_files import HFFiles

#: Inputs whose values are 0 or 1 whatever the model: masks.
_MASKS = ("attention_mask", "pixel_mask", "decoder_attention_mask")


def value_ranges(metadata: ModelMetadata) -> dict[str, tuple[int, int]]:
    """Inclusive value ranges of the integer inputs whose bounds are known: ids below the config's
    vocab_size, token types below type_vocab_size (0..1 when unstated), positions below
    max_position_embeddings, masks 0..1."""
    config = HFFiles.read(metadata.folder).text_config()
    ranges = dict.fromkeys(_MASKS, (0, 1))
    ranges["token_type_ids"] = (0, _positive(config.get("type_vocab_size"), 2) - 1)
    for name, key in (("input_ids", "vocab_size"), ("position_ids", "max_position_embeddings")):
        bound = _positive(config.get(key), 0)
        if bound:
            ranges[name] = (0, bound - 1)
    return ranges


def _positive(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def checked_cast(
    name: str, array: np.ndarray, dtype: np.dtype, ranges: Mapping[str, tuple[int, int]]
) -> np.ndarray:
    """``array`` as ``dtype``, or InvalidRequest: no cast across kinds that loses meaning (float data to
    integer ids), no value outside the target type or the input's known range."""
    if not np.can_cast(array.dtype, dtype, casting="same_kind"):
        raise InvalidRequest(
            f"input {name!r} is {array.dtype}; the model takes {dtype}: send it as {dtype} (no unsafe cast)"
        )
    if array.size and dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = ranges.get(name, (int(info.min), int(info.max)))
        low, high = max(low, int(info.min)), min(high, int(info.max))
        smallest, largest = int(array.min()), int(array.max())
        if smallest < low or largest > high:
            raise InvalidRequest(
                f"input {name!r} holds values from {smallest} to {largest}; the model takes {low}..{high}"
            )
    cast = np.ascontiguousarray(array, dtype=dtype)
    if dtype.kind == "f" and not np.isfinite(cast).all():
        raise InvalidRequest(f"input {name!r} holds values too large for {dtype}")
    return cast
