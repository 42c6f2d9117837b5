"""Processor factory: metadata -> the right Hugging Face processor, emitting fixed shapes.

Each wrapper (worker/serving/preprocessors/) turns one decoded input into the graph's exact input
names and dtypes at one of the model's bucket shapes, and says whether it had to cut anything off.
The factory caches one wrapper per folder and resolved metadata (buckets, shapes, overrides);
every consumer in a process shares it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from worker.serving.metadata import MetadataError, ModelMetadata, ProcessorKind
from worker.serving.preprocessors.audio import AudioPreprocessor
from worker.serving.preprocessors.base import Preprocessor
from worker.serving.preprocessors.image import ImagePreprocessor, MultimodalPreprocessor
from worker.serving.preprocessors.text import TextPreprocessor
from worker.serving.preprocessors.video import VideoPreprocessor


def _load_hf(metadata: ModelMetadata) -> Any:
    """Load the HF processor for ``metadata`` from its folder only: offline, no remote code."""
    import transformers

    folder = str(metadata.folder)
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    kind = metadata.processor
    try:
        if kind is ProcessorKind.TOKENIZER:
            return transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
        if kind is ProcessorKind.IMAGE_PROCESSOR:
            return transformers.AutoImageProcessor.from_pretrained(folder, **kwargs)
        if kind is ProcessorKind.FEATURE_EXTRACTOR:
            return transformers.AutoFeatureExtractor.from_pretrained(folder, **kwargs)
        if kind is ProcessorKind.VIDEO_PROCESSOR:
            if (metadata.folder / "video_preprocessor_config.json").is_file():
                return transformers.AutoVideoProcessor.from_pretrained(folder, **kwargs)
            # VideoMAE and kin ship an image processor that takes a list of frames per video.
            return transformers.AutoImageProcessor.from_pretrained(folder, **kwargs)
        return transformers.AutoProcessor.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise MetadataError(f"{metadata.folder}: cannot load the {kind.value} ({exc})") from exc


_WRAPPERS: dict[ProcessorKind, type[Any]] = {
    ProcessorKind.TOKENIZER: TextPreprocessor,
    ProcessorKind.IMAGE_PROCESSOR: ImagePreprocessor,
    ProcessorKind.FEATURE_EXTRACTOR: AudioPreprocessor,
    ProcessorKind.VIDEO_PROCESSOR: VideoPreprocessor,
    ProcessorKind.MULTIMODAL_PROCESSOR: MultimodalPreprocessor,
}


def _cache_key(metadata: ModelMetadata) -> tuple[Any, ...]:
    """Everything a wrapper's output can depend on: the graph's path and every resolved field
    (buckets, shapes, task, overrides), not the record of where each came from."""
    values: list[Any] = [metadata.onnx_path.resolve()]
    for spec in fields(metadata):
        if spec.name in ("sources", "onnx_metadata", "onnx_path"):
            continue
        value = getattr(metadata, spec.name)
        values.append(tuple(sorted(value.items())) if isinstance(value, Mapping) else value)
    return tuple(values)


class ProcessorFactory:
    """Builds one wrapped processor per model folder and resolved metadata, shared by every caller."""

    def __init__(self) -> None:
        self._cache: dict[tuple[Any, ...], Preprocessor] = {}
        self._lock = threading.Lock()

    def get(self, metadata: ModelMetadata) -> Preprocessor:
        """The cached processor for ``metadata`` (folder and resolved fields), loading it on first use."""
        key = _cache_key(metadata)
        with self._lock:
            cached = self._cache.get(key)
            if cached is None:
                cached = _WRAPPERS[metadata.processor](metadata, _load_hf(metadata))
                self._cache[key] = cached
            return cached


#: The process-wide factory that every consumer shares.
processor_factory = ProcessorFactory()
