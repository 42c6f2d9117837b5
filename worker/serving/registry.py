"""Model folders -> ready-to-serve models (metadata, shared processor, engine, task head)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.serving.assembly import group_by_shape
from worker.serving.engine import Engine, EngineOptions
from worker.serving.heads.outputs import Head, Outputs
from worker.serving.inputs import ModelInput, Prepared
from worker.serving.metadata import Bucket, MetadataError, ModelMetadata, iter_model_folders, load_metadata
from worker.serving.preprocessors.base import Preprocessor
from worker.serving.processors import ProcessorFactory, processor_factory
from worker.serving.tasks import head_for

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
    metadata = load_metadata(path, overrides)
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
