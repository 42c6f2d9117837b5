"""ONNX Runtime: one session per model, fixed-shape batches from pre-allocated bucket buffers.

Every batch is padded to a bucket: one value per named dynamic dim (batch size, token
length, audio samples...). The bucket's input buffers are allocated once at load; buckets
that differ only in batch size are views of one buffer sized for the largest batch, so
the set of shapes a model ever runs is fixed and small. Padding rows repeat the first
real row (no all-zero mask can produce NaNs) and are dropped from the outputs.

One session per model, not one per bucket: measured on all-MiniLM-L6-v2 (2-core EPYC),
a session pinned to one shape with free-dimension overrides ran no faster than the
dynamic session fed the same shape, while 15 pinned sessions cost 15 copies of the
weights, or with shared weights no pre-packing (9% slower) and 15 intra-op thread pools
competing for two cores. Nothing here knows about Kafka; callers run ``Engine.run`` in
their executor.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnxruntime as ort

from worker.errors import InvalidRequest
from worker.metadata import Bucket, ModelMetadata
from worker.processors import Prepared

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class EngineOptions:
    """Knobs for building sessions; the worker's settings fill these in."""

    intra_op_threads: int = 0
    """ONNX Runtime intra-op threads per session; 0 lets ORT use one per core."""
    provider: str = "auto"
    """auto (CUDA when it actually loads, else CPU) | cuda | cpu."""
    spin: bool = True
    """Let ORT's intra-op threads spin between parallel sections (ORT's default; off saves CPU when idle)."""


class _ProviderChoice:
    """Decides once per process whether CUDA really loads; logs the outcome once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._decided: str | None = None

    def providers(self, preference: str) -> list[str]:
        if preference == "cpu" or CUDA not in ort.get_available_providers():
            self._announce(CPU, "CUDA not requested or not in this onnxruntime build")
            return [CPU]
        with self._lock:
            if self._decided == CPU and preference == "auto":
                return [CPU]
        return [CUDA, CPU]

    def confirm(self, session: ort.InferenceSession, preference: str) -> str:
        """Record the provider a session really got (ORT silently falls back to CPU)."""
        got = str(session.get_providers()[0])
        if got != CUDA and preference == "cuda":
            raise RuntimeError("provider=cuda was requested but the CUDA provider did not load")
        self._announce(got, "CUDA provider loaded" if got == CUDA else "CUDA provider failed to load")
        return got

    def _announce(self, provider: str, why: str) -> None:
        with self._lock:
            if self._decided is None:
                self._decided = provider
                log.info("onnxruntime provider: %s (%s)", provider, why)


_provider_choice = _ProviderChoice()


def open_session(metadata: ModelMetadata, options: EngineOptions) -> tuple[ort.InferenceSession, str]:
    """The model's one session and the provider it really got."""
    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session_options.intra_op_num_threads = options.intra_op_threads
    session_options.inter_op_num_threads = 1
    session_options.log_severity_level = 3
    # The arena would keep the largest bucket's activations for good (2.9 GB for wav2vec2 at 32 x 10 s).
    session_options.enable_cpu_mem_arena = False
    if not options.spin:
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = _provider_choice.providers(options.provider)
    if CUDA in providers:
        # ORT logs a multi-line error when the CUDA libraries are absent; our one line says it.
        ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(str(metadata.onnx_path), session_options, providers=providers)
    finally:
        ort.set_default_logger_severity(2)
    return session, _provider_choice.confirm(session, options.provider)


class Engine:
    """One model's session and bucket buffers; runs batches of prepared requests."""

    def __init__(self, metadata: ModelMetadata, options: EngineOptions | None = None) -> None:
        self.metadata = metadata
        self.options = options or EngineOptions()
        self.session, self.provider = open_session(metadata, self.options)
        self.output_names = [spec.name for spec in metadata.outputs]
        self._row_dims = {spec.name: _row_dim(spec.shape[0]) for spec in metadata.inputs}
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
        self.buffers = self._allocate_inputs()
        self._device_inputs: dict[Bucket, dict[str, ort.OrtValue]] = {}
        """CUDA: a device copy of a bucket's inputs, made when the bucket first runs, refreshed per run."""
        self._lock = threading.Lock()
        self.runs: Counter[Bucket] = Counter()
        """Batches run per bucket, since load."""

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

    @property
    def bucket_count(self) -> int:
        """How many fixed shapes (buckets) this model runs at."""
        return len(self.buffers)

    def rows(self, item: Prepared) -> dict[str, int]:
        """Rows a request occupies in each batch dim."""
        return {self._row_dims[name]: array.shape[0] for name, array in item.arrays.items()}

    def run(
        self,
        items: Sequence[Prepared],
        key: Bucket | None = None,
        pad_values: Mapping[str, int] | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Outputs per request, in order; splits batches, and requests, larger than the largest bucket.

        ``key`` is the batch's shape (default: the requests' one shared ``shape_key``). Requests
        of a smaller shape run in it lengthened with ``pad_values`` (a masked tail), and get their
        outputs cut back to their own length: the same answers, in one run instead of several.
        """
        if not items:
            return []
        key = items[0].shape_key if key is None else key
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
        split = [self._split(item) for item in items]
        parts = [part for pieces in split for part in pieces]
        rows = [self.rows(part) for part in parts]
        outputs: list[dict[str, np.ndarray]] = []
        for chunk in self._chunks(rows):
            outputs.extend(
                self._run_chunk([parts[i] for i in chunk], [rows[i] for i in chunk], key, pad_values or {})
            )
        results: list[dict[str, np.ndarray]] = []
        start = 0
        for item, pieces in zip(items, split, strict=True):
            results.append(self._merge(item, outputs[start : start + len(pieces)]))
            start += len(pieces)
        return results

    def _split(self, item: Prepared) -> list[Prepared]:
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

    def _merge(self, item: Prepared, pieces: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
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

    def _chunks(self, rows: Sequence[Mapping[str, int]]) -> Iterator[list[int]]:
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

    def _run_chunk(
        self,
        chunk: Sequence[Prepared],
        rows: Sequence[Mapping[str, int]],
        key: Bucket,
        pad_values: Mapping[str, int],
    ) -> list[dict[str, np.ndarray]]:
        spans: list[dict[str, slice]] = []
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
        inputs = self.buffers.get(bucket)
        if inputs is None:
            raise InvalidRequest(f"model {self.metadata.name!r} has no bucket {values}")
        with self._lock:
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
                buffer[offsets[dim] :] = buffer[0]
            outputs = self._run(bucket, inputs)
            self.runs[bucket] += 1
        return [
            self._slice(outputs, span, item.shape_key, key) for item, span in zip(chunk, spans, strict=True)
        ]

    def _run(self, bucket: Bucket, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One session run on a bucket's buffers; the outputs are new arrays the caller keeps."""
        if self.provider != CUDA:
            # CPU: ORT reads the numpy buffers in place and allocates the outputs once per batch.
            return dict(
                zip(self.output_names, self.session.run(self.output_names, dict(inputs)), strict=True)
            )
        if bucket not in self._device_inputs:
            self._device_inputs[bucket] = {
                name: ort.OrtValue.ortvalue_from_numpy(view, "cuda", 0) for name, view in inputs.items()
            }
        binding = self.session.io_binding()
        for name, value in self._device_inputs[bucket].items():
            value.update_inplace(inputs[name])
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu(), strict=True))

    def _slice(
        self, outputs: Mapping[str, np.ndarray], span: Mapping[str, slice], own: Bucket, key: Bucket
    ) -> dict[str, np.ndarray]:
        """One request's part of the outputs: its rows, and along sequence axes its own length."""
        lengths = dict(own) if own != key else {}
        result: dict[str, np.ndarray] = {}
        for name, array in outputs.items():
            index: list[Any] = [slice(None)] * array.ndim
            for axis, dim in self._row_axes[name].items():
                index[axis] = span[dim]
            for axis, dim in self._sequence_axes[name].items():
                if dim in lengths:
                    index[axis] = slice(0, lengths[dim])
            result[name] = array[tuple(index)]
        return result


def _row_dim(dim: int | str | None) -> str:
    """The batch dim an input's axis 0 belongs to; a fixed batch counts as 'batch'."""
    return dim if isinstance(dim, str) else "batch"
