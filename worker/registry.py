"""Model folders -> ready-to-serve models (metadata, shared processor, engine, task head)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.assembly import group_by_shape
from worker.engine import Engine, EngineOptions
from worker.inputs import ModelInput, Prepared
from worker.metadata import Bucket, MetadataError, ModelMetadata, iter_model_folders
from worker.processors import Preprocessor, ProcessorFactory, processor_factory
from worker.settings import Settings
from worker.tasks import Head, Outputs, head_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """One model ready to answer: each stage is a separate call so the worker can batch."""

    metadata: ModelMetadata
    preprocessor: Preprocessor
    engine: Engine
    head: Head

    @property
    def name(self) -> str:
        """The name requests use (the folder name)."""
        return self.metadata.name

    def prepare(self, item: ModelInput) -> Prepared:
        """Decoded input -> arrays at a bucket shape."""
        return self.preprocessor.prepare(item)

    def run(self, batch: Sequence[Prepared], key: Bucket | None = None) -> list[dict[str, np.ndarray]]:
        """Blocking: one engine call for the batch at shape ``key`` (split if over the largest bucket)."""
        return self.engine.run(batch, key, self.preprocessor.pad_values)

    def merge_rank(self, key: Bucket) -> int | None:
        """Where requests of shape ``key`` rank among shapes that can share a batch (a shorter request
        rides in a longer bucket, its padding masked): the token length; None when they never share.

        Only at fixed bucket shapes: there a short request pads to a bucket anyway, and one run saves
        several. At the batch's longest length (CPU) the short ones would pay for the long one's
        tokens: measured at half load on MiniLM, merging cost 8.3 ms of CPU per request, not 7.3."""
        if not self.engine.fixed_shapes or not self.preprocessor.pad_values or len(key) != 1:
            return None
        return self.metadata.sequence_length(key)

    def batch_length(self, prepared: Prepared) -> int | None:
        """How far a request's real tokens reach, where a batch runs at its longest request (CPU): the
        batcher then fills a batch with like lengths under load. None at fixed shapes (every request
        pads to its bucket anyway) or without a token sequence."""
        if self.engine.fixed_shapes or not self.preprocessor.pad_values:
            return None
        lengths = self.engine.layout.real_lengths(prepared, self.preprocessor.pad_values)
        return max(lengths.values()) if lengths else None

    def postprocess(self, outputs: Outputs, prepared: Prepared, parameters: Mapping[str, Any]) -> Any:
        """Raw outputs of one request -> pipeline-shaped result."""
        return self.head(self.metadata, outputs, prepared, parameters)

    def infer(self, items: Sequence[ModelInput], parameters: Mapping[str, Any] | None = None) -> list[Any]:
        """Synchronous convenience path: prepare, batch by shape, run, post-process."""
        prepared = [self.prepare(item) for item in items]
        results: list[Any] = [None] * len(prepared)
        for indices in group_by_shape(prepared):
            outputs = self.run([prepared[i] for i in indices])
            for i, out in zip(indices, outputs, strict=True):
                results[i] = self.postprocess(out, prepared[i], parameters or {})
        return results


def load_model(
    path: str | Path,
    *,
    overrides: Mapping[str, Any] | None = None,
    engine_options: EngineOptions | None = None,
    factory: ProcessorFactory = processor_factory,
) -> ServedModel:
    """Load one model folder; raises MetadataError naming the folder on any problem."""
    metadata = ModelMetadata.load(path, overrides)
    head = head_for(metadata)
    preprocessor = factory.get(metadata)
    engine = Engine(metadata, engine_options)
    log.info(
        "loaded model %s: %s, %s, task %s, %d buckets on %s",
        metadata.name,
        metadata.modality.value,
        metadata.processor.value,
        metadata.task,
        engine.bucket_count,
        engine.provider,
    )
    return ServedModel(metadata, preprocessor, engine, head)


def model_folders(paths: Iterable[str | Path]) -> list[Path]:
    """Each path is a model folder itself, or a folder of model folders (one level deep)."""
    folders: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise MetadataError(f"{path}: no such models directory")
        folders += [path] if any(path.glob("*.onnx")) else list(iter_model_folders(path))
    return folders


def load_models(
    paths: str | Path | Iterable[str | Path],
    *,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    engine_options: EngineOptions | None = None,
    skip_bad: bool = False,
    progress: Callable[[list[Path]], Iterable[Path]] = iter,
) -> dict[str, ServedModel]:
    """Every model folder under ``paths``; a bad folder fails fast, or is skipped with a warning.

    ``progress`` wraps the list of folders (the demo's progress bar).
    """
    roots = [paths] if isinstance(paths, str | Path) else list(paths)
    models: dict[str, ServedModel] = {}
    for folder in progress(model_folders(roots)):
        try:
            model = load_model(
                folder, overrides=(overrides or {}).get(folder.name), engine_options=engine_options
            )
        except MetadataError as exc:
            if not skip_bad:
                raise
            log.warning("skipping model folder %s: %s", folder, exc)
            continue
        models[model.name] = model
    if not models:
        raise MetadataError(f"{', '.join(map(str, roots))}: no servable model folders")
    return models


def load_configured(
    paths: Iterable[str | Path],
    settings: Settings,
    *,
    progress: Callable[[list[Path]], Iterable[Path]] = iter,
) -> dict[str, ServedModel]:
    """The one loading path of ``run`` and ``demo``: the settings' overrides, engine knobs and skip choice."""
    return load_models(
        paths,
        overrides=settings.metadata_overrides(),
        engine_options=EngineOptions(
            intra_op_threads=settings.intra_op_threads,
            batches_in_flight=settings.batches_in_flight,
            provider=settings.provider,
            spin=settings.intra_op_spinning,
            batch_shapes=settings.batch_shapes,
        ),
        skip_bad=settings.skip_bad_models,
        progress=progress,
    )
