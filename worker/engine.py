"""ONNX Runtime sessions per shape bucket, pre-allocated buffers, padding and splitting.

One ``.onnx`` file becomes one session per bucket: every named dynamic dim is pinned with
a free-dimension override, so each session only ever sees one fixed shape. A batch is
written into the bucket's pre-allocated input buffers (padding rows repeat the first
real row, so no all-zero mask can produce NaNs), run, and sliced back per request.
Nothing here knows about Kafka; callers run ``Engine.run`` in their executor.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

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
    spin: bool = False
    """Let ORT's worker threads spin between runs (faster alone, worse beside Kafka/tokenizer work)."""
    share_weights: bool = True
    """Load large weights once per model and share them across its bucket sessions (CPU)."""


#: Initializers at least this large are shared; small ones stay constants ORT can fold.
_SHARED_MIN_ELEMENTS = 1024


@dataclass(frozen=True)
class SharedWeights:
    """Weights loaded once per model; ``arrays`` keeps the memory the OrtValues point into alive."""

    arrays: Mapping[str, np.ndarray]
    values: Mapping[str, ort.OrtValue]


def load_shared_weights(onnx_path: Path) -> SharedWeights:
    """A model's large float weights as CPU OrtValues that every bucket session can point at.

    Measured on all-MiniLM-L6-v2 with 15 buckets: 1,502 MB RSS with a private copy per
    session, 273 MB shared (with weight pre-packing off, which would copy them again).
    """
    model = onnx.load(str(onnx_path))
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    arrays = {
        init.name: np.ascontiguousarray(numpy_helper.to_array(init))
        for init in model.graph.initializer
        if init.data_type in floats and math.prod(init.dims) >= _SHARED_MIN_ELEMENTS
    }
    # OrtValues made from numpy borrow its memory: the arrays must outlive every session.
    return SharedWeights(arrays, {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()})


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


class BucketSession:
    """One ORT session pinned to one bucket, with its own input and output buffers."""

    def __init__(
        self,
        metadata: ModelMetadata,
        bucket: Bucket,
        options: EngineOptions,
        shared: SharedWeights | None = None,
    ) -> None:
        self.bucket = bucket
        values = dict(bucket)
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.inter_op_num_threads = 1
        session_options.log_severity_level = 3
        session_options.enable_cpu_mem_arena = False
        if not options.spin:
            session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for dim, value in bucket:
            session_options.add_free_dimension_override_by_name(dim, value)
        providers = _provider_choice.providers(options.provider)
        if shared and providers == [CPU]:
            for name, value in shared.values.items():
                session_options.add_initializer(name, value)
            # Pre-packing makes a private, re-laid-out copy of each weight per session.
            session_options.add_session_config_entry("session.disable_prepacking", "1")
        if CUDA in providers:
            # ORT logs a multi-line error when the CUDA libraries are absent; our one line says it.
            ort.set_default_logger_severity(4)
        try:
            self.session = ort.InferenceSession(str(metadata.onnx_path), session_options, providers=providers)
        finally:
            ort.set_default_logger_severity(2)
        self.provider = _provider_choice.confirm(self.session, options.provider)
        self.device = "cuda" if self.provider == CUDA else "cpu"
        self.lock = threading.Lock()
        self.inputs = {
            spec.name: np.zeros(
                tuple(values[d] if isinstance(d, str) else int(d or 1) for d in spec.shape), dtype=spec.dtype
            )
            for spec in metadata.inputs
        }
        self.output_names = [spec.name for spec in metadata.outputs]
        self.binding = self.session.io_binding()
        self._device_inputs: dict[str, ort.OrtValue] = {}
        for name, buffer in self.inputs.items():
            if self.device == "cpu":
                self.binding.bind_cpu_input(name, buffer)
            else:
                value = ort.OrtValue.ortvalue_from_numpy(buffer, "cuda", 0)
                self._device_inputs[name] = value
                self.binding.bind_ortvalue_input(name, value)
        self.outputs = self._allocate_outputs(metadata, values)

    def _allocate_outputs(self, metadata: ModelMetadata, values: Mapping[str, int]) -> dict[str, np.ndarray]:
        """Bind reusable output buffers; shapes come from the bucket, or from one run if it cannot say.

        No run when the bucket fixes every output dim: a warm-up run of the largest bucket costs
        its peak activation memory at load (2.9 GB for the tiny wav2vec2's 32 x 10 s bucket).
        """
        known = [
            tuple(values.get(d) if isinstance(d, str) else d for d in spec.shape) for spec in metadata.outputs
        ]
        shapes: list[tuple[int, ...]] = [tuple(d for d in shape if isinstance(d, int)) for shape in known]
        dtypes = [np.dtype(spec.dtype) for spec in metadata.outputs]
        if any(len(full) != len(ints) for full, ints in zip(known, shapes, strict=True)):
            for name in self.output_names:
                self.binding.bind_output(name, self.device)
            self.session.run_with_iobinding(self.binding)
            shapes = [tuple(value.shape()) for value in self.binding.get_outputs()]
            dtypes = [value.numpy().dtype for value in self.binding.get_outputs()]
            self.binding.clear_binding_outputs()
        outputs = {
            name: np.empty(shape, dtype=dtype)
            for name, shape, dtype in zip(self.output_names, shapes, dtypes, strict=True)
        }
        for name, buffer in outputs.items():
            if self.device == "cpu":
                self.binding.bind_output(name, "cpu", 0, buffer.dtype, buffer.shape, buffer.ctypes.data)
            else:
                self.binding.bind_output(name, "cuda")
        return outputs

    def run(self) -> dict[str, np.ndarray]:
        """Run on whatever the input buffers hold; returns one copy of every output."""
        if self.device != "cpu":
            for name, value in self._device_inputs.items():
                value.update_inplace(self.inputs[name])
            self.session.run_with_iobinding(self.binding)
            return {
                name: value.numpy()
                for name, value in zip(self.output_names, self.binding.get_outputs(), strict=True)
            }
        self.session.run_with_iobinding(self.binding)
        # One copy per batch (not per request): the buffers are reused by the next run.
        return {name: buffer.copy() for name, buffer in self.outputs.items()}


class Engine:
    """All bucket sessions of one model; runs batches of prepared requests."""

    def __init__(self, metadata: ModelMetadata, options: EngineOptions | None = None) -> None:
        self.metadata = metadata
        self.options = options or EngineOptions()
        shared = load_shared_weights(metadata.onnx_path) if self.options.share_weights else None
        self._shared = shared  # owned by the engine for as long as its sessions live
        self.sessions = {
            bucket: BucketSession(metadata, bucket, self.options, shared) for bucket in metadata.buckets()
        }
        self.provider = next(iter(self.sessions.values())).provider
        self._row_dims = {spec.name: _row_dim(spec.shape[0]) for spec in metadata.inputs}
        self._capacity = {
            self._row_dims[spec.name]: (
                max(metadata.dims[dim]) if isinstance(dim := spec.shape[0], str) else int(dim or 1)
            )
            for spec in metadata.inputs
        }
        self._row_axes = {spec.name: self._output_row_axes(spec.shape) for spec in metadata.outputs}

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
    def session_count(self) -> int:
        """How many ORT sessions (one per bucket) this model holds."""
        return len(self.sessions)

    def rows(self, item: Prepared) -> dict[str, int]:
        """Rows a request occupies in each batch dim."""
        return {self._row_dims[name]: array.shape[0] for name, array in item.arrays.items()}

    def run(self, items: Sequence[Prepared]) -> list[dict[str, np.ndarray]]:
        """Outputs per request, in order; splits batches larger than the largest bucket."""
        if not items:
            return []
        key = items[0].shape_key
        if any(item.shape_key != key for item in items):
            raise ValueError("a batch must share one shape key; group requests by Prepared.shape_key")
        results: list[dict[str, np.ndarray]] = []
        for chunk in self._chunks(items):
            results.extend(self._run_chunk(chunk, key))
        return results

    def _chunks(self, items: Sequence[Prepared]) -> Iterator[list[Prepared]]:
        chunk: list[Prepared] = []
        used = dict.fromkeys(self._capacity, 0)
        for item in items:
            rows = self.rows(item)
            for dim, count in rows.items():
                if count > self._capacity[dim]:
                    raise InvalidRequest(
                        f"a request needs {count} rows along {dim!r}; model {self.metadata.name!r} "
                        f"runs at most {self._capacity[dim]}"
                    )
            if chunk and any(used[d] + n > self._capacity[d] for d, n in rows.items()):
                yield chunk
                chunk, used = [], dict.fromkeys(self._capacity, 0)
            chunk.append(item)
            for dim, count in rows.items():
                used[dim] += count
        if chunk:
            yield chunk

    def _bucket_for(self, chunk: Sequence[Prepared], key: Bucket) -> Bucket:
        totals = dict.fromkeys(self._capacity, 0)
        for item in chunk:
            for dim, count in self.rows(item).items():
                totals[dim] += count
        values = dict(key)
        for dim, total in totals.items():
            if dim in self.metadata.dims:
                values[dim] = next(v for v in self.metadata.dims[dim] if v >= total)
        return tuple(sorted(values.items()))

    def _run_chunk(self, chunk: Sequence[Prepared], key: Bucket) -> list[dict[str, np.ndarray]]:
        bucket = self._bucket_for(chunk, key)
        session = self.sessions.get(bucket)
        if session is None:
            raise InvalidRequest(f"model {self.metadata.name!r} has no bucket {dict(bucket)}")
        spans: list[dict[str, slice]] = []
        offsets = dict.fromkeys(self._capacity, 0)
        for item in chunk:
            rows = self.rows(item)
            spans.append({d: slice(offsets[d], offsets[d] + rows[d]) for d in rows})
            for dim, count in rows.items():
                offsets[dim] += count
        with session.lock:
            for name, buffer in session.inputs.items():
                dim = self._row_dims[name]
                for item, span in zip(chunk, spans, strict=True):
                    buffer[span[dim]] = item.arrays[name]
                # Padding rows copy a real row: the model sees valid input, and the rows are dropped.
                buffer[offsets[dim] :] = buffer[0]
            outputs = session.run()
        return [self._slice(outputs, span) for span in spans]

    def _slice(self, outputs: Mapping[str, np.ndarray], span: Mapping[str, slice]) -> dict[str, np.ndarray]:
        result: dict[str, np.ndarray] = {}
        for name, array in outputs.items():
            index: list[Any] = [slice(None)] * array.ndim
            for axis, dim in self._row_axes[name].items():
                index[axis] = span[dim]
            result[name] = array[tuple(index)]
        return result


def _row_dim(dim: int | str | None) -> str:
    """The batch dim an input's axis 0 belongs to; a fixed batch counts as 'batch'."""
    return dim if isinstance(dim, str) else "batch"
