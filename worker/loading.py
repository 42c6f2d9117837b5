"""The served models loaded as the settings say, for ``run`` and ``demo``: overrides, engine knobs, skipping."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from worker.serving.engine import EngineOptions
from worker.serving.registry import ServedModel, load_models
from worker.settings import Settings


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
