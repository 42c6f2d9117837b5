"""Request assembly: requests into a model's bucket buffers, and the outputs back out per request.

Every batch is padded to a bucket: one value per named dynamic dim (batch size, token
length, audio samples...). The bucket's input buffers are allocated once at load; buckets
that differ only in batch size are views of one buffer sized for the largest batch, so
the set of shapes a model ever runs is fixed and small. Padding rows repeat the first
real row (no all-zero mask can produce NaNs) and are dropped from the outputs. A request
with more rows than one run holds is split across runs and its outputs merged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from worker.errors import InvalidRequest
from worker.serving.inputs import Prepared
from worker.serving.metadata import Bucket, ModelMetadata

#: Per batch dim, the rows one request occupies in a run.
Span = dict[str, slice]


def group_by_shape(items: Sequence[Prepared]) -> list[list[int]]:
    """Indices of requests that share a ``shape_key`` (and so a batch), in order of first appearance."""
    groups: dict[Bucket, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(item.shape_key, []).append(index)
    return list(groups.values())


class BucketLayout:
    """One model's bucket buffers, and where each request's rows go in them."""

    def __init__(self, metadata: ModelMetadata) -> None:
        self.metadata = metadata
        self._row_dims = {spec.name: metadata.row_dim(spec.name) for spec in metadata.inputs}
        self._capacity = {
            self._row_dims[spec.name]: (
                max(metadata.dims[dim]) if isinstance(dim := spec.shape[0], str) else int(dim or 1)
            )
            for spec in metadata.inputs
        }
        self._row_axes = {spec.name: self._output_row_axes(spec.shape) for spec in metadata.outputs}
        self._sequence_axes = {
            spec.name: {axis: d for axis, d in enumerate(spec.shape) if d in metadata.sequence_dims}
            for spec in metadata.outputs
        }
        self._input_sequence_axes = {
            spec.name: {axis: d for axis, d in enumerate(spec.shape) if d in metadata.sequence_dims}
            for spec in metadata.inputs
        }
        self.buffers = self._allocate_inputs()

    def _allocate_inputs(self) -> dict[Bucket, dict[str, np.ndarray]]:
        """Input buffers per bucket: buckets that differ only in rows share one buffer's first rows."""
        largest: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}
        buffers: dict[Bucket, dict[str, np.ndarray]] = {}
        for bucket in self.metadata.buckets():
            values = dict(bucket)
            views: dict[str, np.ndarray] = {}
            for spec in self.metadata.inputs:
                rows, *rest = (values[d] if isinstance(d, str) else int(d or 1) for d in spec.shape)
                key = (spec.name, tuple(rest))
                if key not in largest:
                    capacity = self._capacity[self._row_dims[spec.name]]
                    largest[key] = np.zeros((capacity, *rest), dtype=spec.dtype)
                views[spec.name] = largest[key][:rows]  # the first rows of a C-order array: contiguous
            buffers[bucket] = views
        return buffers

    def _output_row_axes(self, shape: tuple[int | str | None, ...]) -> dict[int, str]:
        """Axes of an output that run over requests (CLIP's logits_per_image has two)."""
        named = {
            axis: dim for axis, dim in enumerate(shape) if isinstance(dim, str) and dim in self._capacity
        }
        if named or len(self._capacity) != 1 or not shape:
            return named
        # One batch dim and an output whose axis 0 the exporter left unnamed or fixed.
        ((only_dim, capacity),) = self._capacity.items()
        return {0: only_dim} if shape[0] in (capacity, None) or isinstance(shape[0], str) else {}

    def rows(self, item: Prepared) -> dict[str, int]:
        """Rows a request occupies in each batch dim."""
        return {self._row_dims[name]: array.shape[0] for name, array in item.arrays.items()}

    def check_shapes(
        self, items: Sequence[Prepared], key: Bucket, pad_values: Mapping[str, int] | None
    ) -> None:
        """Every request runs at ``key``: its own shape, or a shorter one lengthened with ``pad_values``."""
        shape = dict(key)
        for item in items:
            if item.shape_key == key:
                continue
            own = dict(item.shape_key)
            if not pad_values or own.keys() != shape.keys() or any(own[d] > shape[d] for d in own):
                raise ValueError(
                    f"a request of shape {own} cannot run in a batch of shape {shape}; group requests by "
                    "Prepared.shape_key, or give pad_values to lengthen shorter ones"
                )

    def split(self, item: Prepared) -> list[Prepared]:
        """A request with more rows along a batch dim than one run holds (CLIP with 40 candidate
        labels, at most 32 text rows), cut along that dim into parts that fit; the rest repeats."""
        need = self.rows(item)
        over = [dim for dim, count in need.items() if count > self._capacity[dim]]
        if not over:
            return [item]
        if len(over) > 1:
            raise InvalidRequest(
                f"a request needs {need} rows; model {self.metadata.name!r} runs at most "
                f"{self._capacity} and can split a request along one batch dim only"
            )
        [dim] = over
        size = self._capacity[dim]
        return [
            replace(
                item,
                arrays={
                    name: array[start : start + size] if self._row_dims[name] == dim else array
                    for name, array in item.arrays.items()
                },
            )
            for start in range(0, need[dim], size)
        ]

    def merge(self, item: Prepared, pieces: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The outputs of a split request's parts as one: joined along the split dim's axes; outputs
        without that dim (CLIP's image_embeds) are the same in every part, so the first part's."""
        if len(pieces) == 1:
            return pieces[0]
        need = self.rows(item)
        [dim] = [d for d, count in need.items() if count > self._capacity[d]]
        merged: dict[str, np.ndarray] = {}
        for name, first in pieces[0].items():
            axes = [axis for axis, d in self._row_axes[name].items() if d == dim]
            merged[name] = np.concatenate([p[name] for p in pieces], axis=axes[0]) if axes else first
        return merged

    def chunks(self, rows: Sequence[Mapping[str, int]]) -> Iterator[list[int]]:
        """Indices of requests, cut into runs that fit the largest bucket."""
        chunk: list[int] = []
        used = dict.fromkeys(self._capacity, 0)
        for index, need in enumerate(rows):
            if chunk and any(used[d] + n > self._capacity[d] for d, n in need.items()):
                yield chunk
                chunk, used = [], dict.fromkeys(self._capacity, 0)
            chunk.append(index)
            for dim, count in need.items():
                used[dim] += count
        if chunk:
            yield chunk

    def place(
        self, rows: Sequence[Mapping[str, int]], key: Bucket
    ) -> tuple[Bucket, list[Span], dict[str, int]]:
        """The bucket one run of requests fits, each request's span in it, and the rows used per dim."""
        spans: list[Span] = []
        offsets = dict.fromkeys(self._capacity, 0)
        for need in rows:
            spans.append({d: slice(offsets[d], offsets[d] + n) for d, n in need.items()})
            for dim, count in need.items():
                offsets[dim] += count
        values = dict(key)
        for dim, total in offsets.items():
            if dim in self.metadata.dims:
                values[dim] = next(v for v in self.metadata.dims[dim] if v >= total)
        bucket: Bucket = tuple(sorted(values.items()))
        if bucket not in self.buffers:
            raise InvalidRequest(f"model {self.metadata.name!r} has no bucket {values}")
        return bucket, spans, offsets

    def fill(
        self,
        bucket: Bucket,
        chunk: Sequence[Prepared],
        spans: Sequence[Span],
        used: Mapping[str, int],
        pad_values: Mapping[str, int],
    ) -> dict[str, np.ndarray]:
        """Copy a run's requests into the bucket's buffers (the caller holds the model's lock)."""
        inputs = self.buffers[bucket]
        for name, buffer in inputs.items():
            dim = self._row_dims[name]
            for item, span in zip(chunk, spans, strict=True):
                array = item.arrays[name]
                if array.shape[1:] == buffer.shape[1:]:
                    buffer[span[dim]] = array
                else:  # a shorter request in a longer bucket: its tail is padding the mask hides
                    buffer[span[dim]] = pad_values[name]
                    buffer[(span[dim], *(slice(0, n) for n in array.shape[1:]))] = array
            # Padding rows copy a real row: the model sees valid input, and the rows are dropped.
            buffer[used[dim] :] = buffer[0]
        return inputs

    def real_lengths(self, item: Prepared, pad_values: Mapping[str, int]) -> dict[str, int]:
        """Per sequence dim, how far a request's real tokens reach: past its last non-padding position
        of the attention mask (at least 1). Empty without an attention mask among ``pad_values``."""
        mask = item.arrays.get("attention_mask") if "attention_mask" in pad_values else None
        if mask is None:
            return {}
        lengths: dict[str, int] = {}
        for axis, dim in self._input_sequence_axes["attention_mask"].items():
            other = tuple(a for a in range(mask.ndim) if a != axis)
            real = np.flatnonzero(np.any(mask != pad_values["attention_mask"], axis=other))
            lengths[dim] = int(real[-1]) + 1 if real.size else 1
        return lengths

    def assemble(
        self,
        chunk: Sequence[Prepared],
        spans: Sequence[Span],
        used: Mapping[str, int],
        pad_values: Mapping[str, int],
    ) -> dict[str, np.ndarray]:
        """A run's inputs in new arrays at exactly its rows and, along sequence dims, its longest real
        length (no bucket buffer, no lock): what a CPU runs fastest; GPUs keep the fixed bucket shapes."""
        lengths: dict[str, int] = {}
        for item in chunk:
            for dim, length in self.real_lengths(item, pad_values).items():
                lengths[dim] = max(length, lengths.get(dim, 0))
        inputs: dict[str, np.ndarray] = {}
        for spec in self.metadata.inputs:
            dim = self._row_dims[spec.name]
            first = chunk[0].arrays[spec.name]
            rows = used[dim] if dim in self.metadata.dims else self._capacity[dim]
            shape = [rows, *first.shape[1:]]
            for axis, seq_dim in self._input_sequence_axes[spec.name].items():
                shape[axis] = lengths.get(seq_dim, max(item.arrays[spec.name].shape[axis] for item in chunk))
            buffer = np.full(shape, pad_values.get(spec.name, 0), dtype=first.dtype)
            for item, span in zip(chunk, spans, strict=True):
                array = item.arrays[spec.name]
                fit = tuple(
                    slice(0, min(n, limit)) for n, limit in zip(array.shape[1:], shape[1:], strict=True)
                )
                buffer[(span[dim], *fit)] = array[(slice(None), *fit)]
            buffer[used[dim] :] = buffer[0]  # a fixed batch dim: padding rows copy a real row
            inputs[spec.name] = buffer
        return inputs

    def cut_outputs(
        self, outputs: Mapping[str, np.ndarray], span: Span, own: Bucket
    ) -> dict[str, np.ndarray]:
        """One request's part of the outputs: its rows, and along sequence axes its own length.

        A run at the bucket's length is cut back to the request's; a run at the batch's longest real
        length (``assemble``) is padded back with zeros past it: heads read only real tokens.
        """
        lengths = dict(own)
        result: dict[str, np.ndarray] = {}
        for name, array in outputs.items():
            index: list[Any] = [slice(None)] * array.ndim
            for axis, dim in self._row_axes[name].items():
                index[axis] = span[dim]
            short: list[tuple[int, int]] = []
            for axis, dim in self._sequence_axes[name].items():
                if dim in lengths:
                    index[axis] = slice(0, lengths[dim])
                    short.append((axis, lengths[dim] - min(lengths[dim], array.shape[axis])))
            part = array[tuple(index)]
            if any(missing for _, missing in short):
                widths = [(0, 0)] * part.ndim
                for axis, missing in short:
                    widths[axis] = (0, missing)
                part = np.pad(part, widths)
            result[name] = part
        return result
