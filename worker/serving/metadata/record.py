"""The model record: what the worker knows about one folder, and its bucket arithmetic."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from schemas.requests import Modality
from worker.serving.metadata.keys import POOLED_OUTPUTS, TOKEN_OUTPUTS, ProcessorKind, Source


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy dtype and shape (str = named dynamic dim)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON form for ``inspect --json``."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


class DimRole(StrEnum):
    """What a dynamic dim stands for; decides which bucket set pins it."""

    BATCH = "batch"
    SEQUENCE = "sequence"
    SAMPLES = "samples"
    FRAMES = "audio frames"
    MEL_BINS = "mel bins"
    VIDEO_FRAMES = "video frames"
    CHANNELS = "channels"
    HEIGHT = "height"
    WIDTH = "width"


Bucket = tuple[tuple[str, int], ...]
"""One concrete assignment of every named dynamic dim, e.g. (("batch", 8), ("sequence", 32))."""


@dataclass(frozen=True)
class ModelMetadata:
    """Everything the worker needs to know about one model folder."""

    name: str
    folder: Path
    onnx_path: Path
    modality: Modality
    processor: ProcessorKind
    processor_class: str | None
    task: str
    labels: tuple[str, ...] | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: Mapping[str, tuple[int, ...]]
    dim_roles: Mapping[str, DimRole]
    image_size: tuple[int, int] | None
    audio_frames: int | None
    video_frames: int | None
    sampling_rate: int | None
    pooling: str | None
    normalize: bool
    sources: Mapping[str, Source]
    include_prompt: bool = True
    prompts: Mapping[str, str] | None = None
    default_prompt_name: str | None = None
    onnx_metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def batch_dims(self) -> tuple[str, ...]:
        """Names of the dims that run over requests (``batch``; CLIP has two)."""
        return tuple(d for d, role in self.dim_roles.items() if role is DimRole.BATCH)

    @property
    def sequence_dims(self) -> tuple[str, ...]:
        """Names of the dims that run over tokens (padding there is what an attention mask hides)."""
        return tuple(d for d, role in self.dim_roles.items() if role is DimRole.SEQUENCE)

    def sequence_length(self, key: Bucket) -> int | None:
        """The token length a shape key pins, if it pins one."""
        return next((v for d, v in key if d in self.sequence_dims), None)

    @property
    def sequence_lengths(self) -> tuple[int, ...] | None:
        """Token-length buckets, for models that take tokens."""
        return self._values_for(DimRole.SEQUENCE)

    @property
    def audio_samples(self) -> tuple[int, ...] | None:
        """Raw-sample buckets, for models that take waveforms."""
        return self._values_for(DimRole.SAMPLES)

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """Batch buckets of the (first) batch dim; a graph-fixed batch is its one size."""
        values = self._values_for(DimRole.BATCH)
        if values is not None:
            return values
        first = self.inputs[0].shape[0] if self.inputs and self.inputs[0].shape else 1
        return (first if isinstance(first, int) else 1,)

    def _values_for(self, role: DimRole) -> tuple[int, ...] | None:
        for dim, dim_role in self.dim_roles.items():
            if dim_role is role:
                return self.dims[dim]
        return None

    def buckets(self) -> list[Bucket]:
        """Every combination of the named dynamic dims: the fixed shapes batches run at."""
        names = sorted(self.dims)
        combos = itertools.product(*(self.dims[n] for n in names))
        return [tuple(zip(names, combo, strict=True)) for combo in combos]

    @property
    def pooled_output(self) -> str | None:
        """The graph output that already holds the sentence embedding, if the graph pools itself."""
        names = {spec.name for spec in self.outputs}
        return next((name for name in POOLED_OUTPUTS if name in names), None)

    @property
    def token_output(self) -> str | None:
        """The graph output holding token vectors: a known name, else the first output that is not pooled."""
        names = [spec.name for spec in self.outputs]
        known = next((name for name in TOKEN_OUTPUTS if name in names), None)
        return known or next((name for name in names if name not in POOLED_OUTPUTS), None)

    @property
    def prompt(self) -> str | None:
        """The text put before every input, as ``SentenceTransformer.encode`` does without a prompt argument."""
        if self.default_prompt_name is None or not self.prompts:
            return None
        return self.prompts.get(self.default_prompt_name) or None

    def input(self, name: str) -> TensorSpec | None:
        """The graph input called ``name``, if any."""
        return next((spec for spec in self.inputs if spec.name == name), None)

    def row_dim(self, input_name: str) -> str:
        """The batch dim an input's axis 0 belongs to; a fixed batch (or no such input) counts as 'batch'."""
        spec = self.input(input_name)
        dim = spec.shape[0] if spec is not None else None
        return dim if isinstance(dim, str) else "batch"

    def to_json(self) -> dict[str, Any]:
        """What ``inspect --json`` prints."""
        return {
            "name": self.name,
            "path": str(self.onnx_path),
            "modality": self.modality.value,
            "processor": self.processor.value,
            "processor_class": self.processor_class,
            "task": self.task,
            "labels": list(self.labels) if self.labels is not None else None,
            "inputs": [spec.to_json() for spec in self.inputs],
            "outputs": [spec.to_json() for spec in self.outputs],
            "dims": {d: {"role": self.dim_roles[d].value, "values": list(v)} for d, v in self.dims.items()},
            "buckets": [dict(bucket) for bucket in self.buckets()],
            "image_size": list(self.image_size) if self.image_size else None,
            "audio_frames": self.audio_frames,
            "video_frames": self.video_frames,
            "sampling_rate": self.sampling_rate,
            "pooling": self.pooling,
            "normalize": self.normalize,
            "include_prompt": self.include_prompt,
            "prompts": dict(self.prompts) if self.prompts is not None else None,
            "default_prompt_name": self.default_prompt_name,
            "sources": {k: v.value for k, v in self.sources.items()},
        }
