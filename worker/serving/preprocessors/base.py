"""What every processor wrapper does: inputs at a bucket shape, graph names and dtypes, cuts reported."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from worker.errors import InvalidRequest
from worker.serving.inputs import (
    ModelInput,
    Prepared,
    TensorInput,
)
from worker.serving.metadata import ModelMetadata, ProcessorKind
from worker.serving.tensor_inputs import checked_cast, value_ranges


class Preprocessor(ABC):
    """Base wrapper: subclasses produce arrays, the base fits them to the graph."""

    kind: ClassVar[ProcessorKind]

    def __init__(self, metadata: ModelMetadata) -> None:
        self.metadata = metadata
        self.pad_values: Mapping[str, int] = {}
        """Per input, the value that lengthens its sequence axis so that a request can run in a longer
        bucket (masked out); empty when the model's requests never change bucket."""
        self.value_ranges = value_ranges(metadata)
        """Per integer input, the values the model accepts, where known (raw tensors are held to them)."""

    @abstractmethod
    def _encode(self, item: ModelInput) -> tuple[dict[str, np.ndarray], bool, dict[str, Any]]:
        """Arrays keyed by HF names, a truncation flag and context for the task head."""

    def prepare(self, item: ModelInput) -> Prepared:
        """Turn one decoded input into graph-ready arrays at a bucket shape."""
        if isinstance(item, TensorInput):
            prepared = self._fit(dict(item.tensors), truncated=False, context={}, strict=True)
            if any(array.shape[0] != 1 for array in prepared.arrays.values()):
                # One request, one answer: a client batch would need one result per row.
                raise InvalidRequest(
                    "tensor inputs must hold exactly one row (axis 0 = 1); send one request per row"
                )
            return prepared
        arrays, truncated, context = self._encode(item)
        return self._fit(arrays, truncated=truncated, context=context, strict=False)

    def _fit(
        self, arrays: dict[str, np.ndarray], *, truncated: bool, context: dict[str, Any], strict: bool
    ) -> Prepared:
        """Keep the graph's inputs, cast dtypes, fill optional masks, check every dim."""
        meta = self.metadata
        out: dict[str, np.ndarray] = {}
        key: dict[str, int] = {}
        for spec in meta.inputs:
            array = arrays.get(spec.name)
            if array is None:
                array = None if strict else self._default_input(spec.name, out)
            if array is None:
                raise InvalidRequest(f"model {meta.name!r} needs input {spec.name!r}")
            array = np.asarray(array)
            if array.ndim != len(spec.shape):
                raise InvalidRequest(
                    f"input {spec.name!r} has rank {array.ndim}, model {meta.name!r} expects {len(spec.shape)}"
                )
            for axis, dim in enumerate(spec.shape):
                size = array.shape[axis]
                if axis == 0:
                    continue
                if isinstance(dim, int):
                    if size != dim:
                        raise InvalidRequest(
                            f"input {spec.name!r} axis {axis} is {size}, model {meta.name!r} fixes it at {dim}"
                        )
                elif isinstance(dim, str):
                    if size not in meta.dims[dim]:
                        raise InvalidRequest(
                            f"input {spec.name!r} dim {dim!r} is {size}; allowed: {list(meta.dims[dim])}"
                        )
                    if key.setdefault(dim, size) != size:
                        raise InvalidRequest(f"inputs disagree on dim {dim!r}")
            # Raw tensors come from the client as they are: held to the graph's types and known ranges.
            if strict:
                out[spec.name] = checked_cast(spec.name, array, np.dtype(spec.dtype), self.value_ranges)
            else:
                out[spec.name] = np.ascontiguousarray(array, dtype=spec.dtype)
        rows = {meta.row_dim(name): a.shape[0] for name, a in out.items()}
        if any(n < 1 for n in rows.values()):
            raise InvalidRequest("an input has no rows")
        return Prepared(out, tuple(sorted(key.items())), truncated, context)

    def _default_input(self, name: str, have: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """Inputs some processors omit but the graph wants: zeros for token types."""
        if name == "token_type_ids" and "input_ids" in have:
            return np.zeros_like(have["input_ids"])
        if name == "attention_mask" and "input_ids" in have:
            return np.ones_like(have["input_ids"])
        return None
