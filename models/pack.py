"""Pack an ONNX model and its Hugging Face files into a self-describing folder the worker serves offline.

The worker resolves the metadata; packing writes the result into the graph's ``metadata_props``
(``inference.*``), then checks that the folder loads and answers one dummy request without the network.
"""

import json
import shutil
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data
from PIL import Image

from schemas.errors import InferenceError
from schemas.requests import Modality
from worker.serving.inputs import AudioInput, ImageInput, ModelInput, MultimodalInput, TextInput, VideoInput
from worker.serving.metadata import (
    METADATA_PREFIX,
    Declared,
    MetadataError,
    ModelMetadata,
    SentenceTransformerFiles,
    load_metadata,
)
from worker.serving.metadata.render import render_metadata
from worker.serving.preprocessors.audio import AudioPreprocessor
from worker.serving.processors import ProcessorFactory
from worker.serving.registry import ServedModel, load_model

ONNX_NAME = "model.onnx"
#: Hugging Face files copied next to the graph when present (plus every ``vocab.*``).
PROCESSOR_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
    # sentence-transformers: its modules, the longest sequence, the prompts (plus each module's JSON config).
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
# Fields that name a place rather than describe the model; every other resolved field must survive packing.
_LOCATION_FIELDS = ("name", "path", "sources")


class PackError(ValueError):
    """A source that cannot be packed, or a packed folder that does not behave like its source."""


def resolve(source: Path, overrides: Mapping[str, Any]) -> ModelMetadata:
    """The worker's metadata for the source; the error says so when the config points at the Hub."""
    try:
        return load_metadata(source, overrides)
    except MetadataError as exc:
        config = (source if source.is_dir() else source.parent) / "config.json"
        hub_id = _hub_id(config)
        if hub_id is None:
            raise
        raise PackError(
            f"{exc}; config.json points at {hub_id!r} on the Hugging Face Hub, which would need a "
            "download: put every file the model needs in the folder"
        ) from exc


def _hub_id(config: Path) -> str | None:
    """The ``_name_or_path`` a config names, when it is not a local folder."""
    try:
        name = json.loads(config.read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and name and not Path(name).is_dir() else None


def metadata_props(meta: ModelMetadata) -> dict[str, str]:
    """Every declarable field the worker resolved a value for, as ``inference.*`` strings."""
    props: dict[str, str] = {}
    for name in Declared.model_fields:
        value = getattr(meta, name)
        if value is not None:
            props[METADATA_PREFIX + name] = str(value) if isinstance(value, str) else json.dumps(value)
    return props


def copy_processor_files(source: Path, target: Path) -> list[str]:
    """Copy the Hugging Face config and processor files that exist in source; return their names."""
    names = [name for name in PROCESSOR_FILES if (source / name).is_file()]
    names += sorted(path.name for path in source.glob("vocab.*") if path.is_file())
    sentence = SentenceTransformerFiles.read(source)
    for _, module in sentence.modules if sentence is not None else ():
        if module and (source / module).is_dir():
            # Module configs only (1_Pooling/config.json); a module with weights is refused unless in the graph.
            names += sorted(f"{module}/{path.name}" for path in (source / module).glob("*.json"))
    for name in names:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, target / name)
    return names


def write_onnx(source: Path, target: Path, props: Mapping[str, str]) -> None:
    """Copy the graph with props replacing its ``inference.*`` keys; external data files go along."""
    model = onnx.load(source, load_external_data=False)
    kept = {p.key: p.value for p in model.metadata_props if not p.key.startswith(METADATA_PREFIX)}
    onnx.helper.set_model_props(model, kept | dict(props))
    onnx.save(model, target)
    # The exporters keep external data on initializers only; a miss would fail the load check below.
    locations = {ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)}
    for location in sorted(locations):
        (target.parent / location).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source.parent / location, target.parent / location)


def dummy_input(model: ServedModel) -> ModelInput:
    """One blank request of the model's modality: text, blank image, 1 s of silence, blank frames, image+labels."""
    meta = model.metadata
    height, width = meta.image_size or (224, 224)
    image = Image.new("RGB", (width, height))
    if meta.modality is Modality.TEXT:
        # Question answering reads the pair as question and context; every other text task takes one text.
        pair = "This is a short sentence." if meta.task == "question-answering" else None
        return TextInput("What is this?" if pair else "A short sentence to check the model.", pair)
    if meta.modality is Modality.VISION:
        return ImageInput(image)
    if meta.modality is Modality.AUDIO and isinstance(model.preprocessor, AudioPreprocessor):
        rate = model.preprocessor.sampling_rate
        return AudioInput(np.zeros(rate, dtype=np.float32), rate)
    if meta.modality is Modality.VIDEO:
        return VideoInput([image] * (meta.video_frames or 1))
    if meta.modality is Modality.MULTIMODAL:
        return MultimodalInput(image, candidate_labels=("a cat", "a dog"))
    raise PackError(f"{meta.folder}: no dummy request for a {meta.modality.value} model")


def describing_fields(meta: ModelMetadata) -> dict[str, Any]:
    """What the worker resolved, minus where the folder lives."""
    return {k: v for k, v in meta.to_json().items() if k not in _LOCATION_FIELDS}


def pack(source: Path, target: Path, overrides: Mapping[str, Any] | None = None) -> ServedModel:
    """Pack source (a folder or an .onnx file) into the empty folder target; return it loaded and checked."""
    original = resolve(source, overrides or {})
    copy_processor_files(original.folder, target)
    write_onnx(original.onnx_path, target / ONNX_NAME, metadata_props(original))
    # A fresh factory: the process-wide one would keep this processor cached for good.
    model = load_model(target, factory=ProcessorFactory())
    before, after = describing_fields(original), describing_fields(model.metadata)
    changed = sorted(k for k in before if before[k] != after[k])
    if changed:
        raise PackError(f"{target}: resolves differently from {source} ({', '.join(changed)})")
    try:
        model.infer([dummy_input(model)])
    except InferenceError as exc:
        raise PackError(f"{target}: a dummy {model.metadata.modality.value} request failed ({exc})") from exc
    return model


@contextmanager
def staged(out: Path, *, replace: bool) -> Iterator[Path]:
    """An empty folder of out's name to build in, moved to out only if the block succeeds."""
    if out.exists() and any(out.iterdir()) and not replace:
        raise PackError(f"{out}: exists and is not empty (--force replaces it)")
    # Same name one level down, so the model name in messages and logs is already the final one.
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / out.name).mkdir(parents=True)
    try:
        yield partial / out.name
        shutil.rmtree(out, ignore_errors=True)
        (partial / out.name).rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def pack_command(source: Path, out: Path, overrides: Mapping[str, Any], *, force: bool) -> int:
    """``python -m models pack``: pack, then print what ``python -m worker inspect`` shows; 2 on refusal."""
    try:
        folder = source if source.is_dir() else source.parent
        if out.resolve() == folder.resolve():
            raise PackError(f"{out}: is the source folder; pack into another folder")
        with staged(out, replace=force) as staging:
            model = pack(source, staging, overrides)
    except (MetadataError, PackError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render_metadata(load_metadata(out)))
    print(f"checked: {out} loads offline and answers a dummy {model.metadata.modality.value} request")
    return 0
