"""ONNX Runtime: one session per model and the provider it runs on; runs batches at bucket shapes.

How requests fill the bucket buffers and how outputs are cut back per request is
``worker.serving.assembly``'s job; this module owns the session, the lock and the run itself.

One session per model, not one per bucket: measured on all-MiniLM-L6-v2 (2-core EPYC),
a session pinned to one shape with free-dimension overrides ran no faster than the
dynamic session fed the same shape, while 15 pinned sessions cost 15 copies of the
weights, or with shared weights no pre-packing (9% slower) and 15 intra-op thread pools
competing for two cores. Nothing here knows about Kafka; callers run ``Engine.run`` in
their executor.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from worker.serving.assembly import BucketLayout
from worker.serving.inputs import Prepared
from worker.serving.metadata import Bucket, ModelMetadata

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class EngineOptions:
    """Knobs for building sessions; the worker's settings fill these in."""

    intra_op_threads: int = 0
    """ONNX Runtime intra-op threads of one run; 0: the cores shared out among the batches in flight
    on CPU (ORT's own default, one per core, on CUDA)."""
    batches_in_flight: int = 0
    """Runs of this session at once; 0: two on CPU at longest shapes (one per core on two cores), else one.
    Runs at fixed bucket shapes share the bucket's buffers, so they take one at a time."""
    provider: str = "auto"
    """auto (CUDA when it actually loads, else CPU) | cuda | cpu."""
    spin: bool = True
    """Let ORT's intra-op threads spin between parallel sections (ORT's default; off saves CPU when idle)."""
    batch_shapes: str = "auto"
    """buckets (every run at a fixed bucket shape) | longest (exact rows, the longest real length) |
    auto (buckets on CUDA, longest on CPU)."""


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


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class RunPlan:
    """How one model's batches run: at which shapes, how many at once, on how many threads each."""

    fixed_shapes: bool
    batches_in_flight: int
    intra_op_threads: int
    """0: ONNX Runtime's default (one per core)."""

    @classmethod
    def of(cls, options: EngineOptions, on_cuda: bool) -> RunPlan:
        """Measured on all-MiniLM-L6-v2, 2 cores: two runs of one thread each answered 15-20% more
        requests than one run on two threads, for 15% less CPU per request (the threads of one run
        wait for each other whenever the event loop, the tokenizer or the broker take a core)."""
        fixed = options.batch_shapes == "buckets" or (options.batch_shapes == "auto" and on_cuda)
        if fixed or on_cuda:
            if options.batches_in_flight > 1 and fixed:
                log.warning("batches_in_flight %d needs batch_shapes longest; runs one at a time",
                            options.batches_in_flight)  # fmt: skip
            return cls(fixed, 1, options.intra_op_threads)
        cores = usable_cores()
        in_flight = options.batches_in_flight or min(2, cores)
        return cls(fixed, in_flight, options.intra_op_threads or max(1, cores // in_flight))


def open_session(
    metadata: ModelMetadata, options: EngineOptions, intra_op_threads: int
) -> tuple[ort.InferenceSession, str]:
    """The model's one session, with ``intra_op_threads`` (the run plan's), and the provider it really got."""
    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session_options.intra_op_num_threads = intra_op_threads
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
        on_cuda = CUDA in _provider_choice.providers(self.options.provider)
        self.plan = RunPlan.of(self.options, on_cuda)
        self.session, self.provider = open_session(metadata, self.options, self.plan.intra_op_threads)
        if on_cuda and self.provider != CUDA:  # CUDA did not load after all: again, with the CPU plan
            self.plan = RunPlan.of(self.options, on_cuda=False)
            self.session, self.provider = open_session(metadata, self.options, self.plan.intra_op_threads)
        self.output_names = [spec.name for spec in metadata.outputs]
        self.layout = BucketLayout(metadata)
        self._device_inputs: dict[Bucket, dict[str, ort.OrtValue]] = {}
        """CUDA: a device copy of a bucket's inputs, made when the bucket first runs, refreshed per run."""
        self._lock = threading.Lock()
        self.runs: Counter[Bucket] = Counter()
        """Batches run per bucket, since load."""

    @property
    def fixed_shapes(self) -> bool:
        """Every run at a bucket shape, in the bucket's buffers; else at exactly the batch's rows and
        longest real length, in new arrays, with no lock (ORT runs concurrent calls of one session)."""
        return self.plan.fixed_shapes

    @property
    def batches_in_flight(self) -> int:
        """How many batches of this model may run at once."""
        return self.plan.batches_in_flight

    @property
    def buffers(self) -> dict[Bucket, dict[str, np.ndarray]]:
        """Input buffers per bucket, allocated at load."""
        return self.layout.buffers

    @property
    def bucket_count(self) -> int:
        """How many fixed shapes (buckets) this model runs at."""
        return len(self.layout.buffers)

    def rows(self, item: Prepared) -> dict[str, int]:
        """Rows a request occupies in each batch dim."""
        return self.layout.rows(item)

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
        self.layout.check_shapes(items, key, pad_values)
        split = [self.layout.split(item) for item in items]
        parts = [part for pieces in split for part in pieces]
        rows = [self.layout.rows(part) for part in parts]
        outputs: list[dict[str, np.ndarray]] = []
        for chunk in self.layout.chunks(rows):
            outputs.extend(
                self._run_chunk([parts[i] for i in chunk], [rows[i] for i in chunk], key, pad_values or {})
            )
        results: list[dict[str, np.ndarray]] = []
        start = 0
        for item, pieces in zip(items, split, strict=True):
            results.append(self.layout.merge(item, outputs[start : start + len(pieces)]))
            start += len(pieces)
        return results

    def _run_chunk(
        self,
        chunk: Sequence[Prepared],
        rows: Sequence[Mapping[str, int]],
        key: Bucket,
        pad_values: Mapping[str, int],
    ) -> list[dict[str, np.ndarray]]:
        bucket, spans, used = self.layout.place(rows, key)
        if self.fixed_shapes:
            with self._lock:
                outputs = self._run(bucket, self.layout.fill(bucket, chunk, spans, used, pad_values))
                self.runs[bucket] += 1
        else:
            outputs = self._run(bucket, self.layout.assemble(chunk, spans, used, pad_values))
            with self._lock:
                self.runs[bucket] += 1
        return [
            self.layout.cut_outputs(outputs, span, item.shape_key)
            for item, span in zip(chunk, spans, strict=True)
        ]

    def _run(self, bucket: Bucket, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One session run on a bucket's buffers; the outputs are new arrays the caller keeps."""
        if self.provider != CUDA or not self.fixed_shapes:
            # CPU: ORT reads the numpy arrays in place and allocates the outputs once per batch.
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
