"""Precedence: which source's value each field takes, and the record of where it came from.

Highest first: explicit overrides (arguments, settings) > ONNX ``metadata_props`` keys
(``inference.*``) > the companion ``inference.json`` next to the model > the Hugging Face files in
the folder (sentence-transformers' own files before config.json and the processor files) >
inference from the graph's input names, ranks, dims and dtypes > documented defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from schemas.requests import Modality
from worker.serving.metadata.graph import declared_props, locate, read_graph
from worker.serving.metadata.hf_files import HFFiles, read_json
from worker.serving.metadata.inference import dim_roles, fixed_dims, infer_modality, infer_task, resolve_task
from worker.serving.metadata.keys import (
    COMPANION_FILE,
    DEFAULT_AUDIO_SECONDS,
    DEFAULT_BATCH_SIZES,
    DEFAULT_SEQUENCE_LENGTHS,
    POOLED_OUTPUTS,
    PROCESSOR_FOR_MODALITY,
    Declared,
    MetadataError,
    ProcessorKind,
    Source,
)
from worker.serving.metadata.record import DimRole, ModelMetadata, TensorSpec
from worker.serving.metadata.sentence_transformers import SentenceTransformerFiles

#: Sources that describe the model in general: a value the graph fixes beats them, without a conflict.
_FOLDER_FILE_SOURCES = (Source.SENTENCE_TRANSFORMERS, Source.HF)


@dataclass(frozen=True)
class Layer:
    """The fields one source declares, and where a user finds that source."""

    source: Source
    values: Mapping[str, Any]
    where: str


@dataclass
class Precedence:
    """The layers of one folder, highest first, and where each field picked so far came from."""

    layers: tuple[Layer, ...]
    #: Values the graph itself fixes (image size, frames...): they beat the folder's files.
    fixed: Mapping[str, Any]
    sources: dict[str, Source] = field(default_factory=dict)

    def pick(self, name: str, graph: Any = None, default: Any = None) -> Any:
        """The first layer's value for ``name``, else ``graph``, else ``default``; records the source."""
        for layer in self.layers:
            # A dim the graph fixes beats the HF files (they describe a resize, not the graph).
            if layer.source in _FOLDER_FILE_SOURCES and name in self.fixed:
                break
            value = layer.values.get(name)
            if value is not None:
                self.sources[name] = layer.source
                return value
        if graph is not None:
            self.sources[name] = Source.GRAPH
            return graph
        if default is not None:
            self.sources[name] = Source.DEFAULT
        return default


def load_metadata(path: str | Path, overrides: Mapping[str, Any] | None = None) -> ModelMetadata:
    """Resolve a model folder (or a bare ``.onnx`` file) into metadata, or raise MetadataError."""
    return resolve(Path(path), overrides or {})


def resolve(path: Path, overrides: Mapping[str, Any]) -> ModelMetadata:
    """Resolve a model folder (or a bare ``.onnx`` file) into metadata, or raise MetadataError."""
    folder, onnx_path = locate(path)
    inputs, outputs, props = read_graph(onnx_path)
    hf, sentence, layers = _read_layers(folder, onnx_path, props, overrides)
    roles = dim_roles(inputs)
    fixed = fixed_dims(inputs)
    _check_conflicts(layers, fixed, onnx_path)
    chosen = Precedence(layers, fixed)
    modality, processor, processor_class, task = _kind(chosen, inputs, outputs, hf)
    labels = chosen.pick("labels")
    _check_processor_files(folder, processor, hf)
    if sentence is not None:
        sentence.check_applicable(pooled_in_graph=any(s.name in POOLED_OUTPUTS for s in outputs))

    image_size = chosen.pick("image_size", graph=fixed.get("image_size"))
    audio_frames = chosen.pick("audio_frames", graph=fixed.get("audio_frames"))
    video_frames = chosen.pick("video_frames", graph=fixed.get("video_frames"))
    sampling_rate = chosen.pick("sampling_rate")
    dims = _dim_values(chosen, roles, hf, sampling_rate, onnx_path)
    return ModelMetadata(
        name=folder.name if onnx_path.parent == folder and path.is_dir() else onnx_path.stem,
        folder=folder,
        onnx_path=onnx_path,
        modality=modality,
        processor=processor,
        processor_class=processor_class,
        task=task,
        labels=tuple(labels) if labels is not None else None,
        inputs=inputs,
        outputs=outputs,
        dims=dims,
        dim_roles=roles,
        image_size=tuple(image_size) if image_size else None,
        audio_frames=audio_frames,
        video_frames=video_frames,
        sampling_rate=sampling_rate,
        pooling=chosen.pick("pooling"),
        normalize=bool(chosen.pick("normalize", default=False)),
        include_prompt=bool(chosen.pick("include_prompt", default=True)),
        prompts=chosen.pick("prompts"),
        default_prompt_name=chosen.pick("default_prompt_name"),
        sources=dict(chosen.sources),
        onnx_metadata=props,
    )


def _kind(
    chosen: Precedence, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], hf: HFFiles
) -> tuple[Modality, ProcessorKind, str | None, str]:
    """Modality, processor kind and class, task: declared, else what the HF files or the graph say."""
    modality = Modality(chosen.pick("modality") or infer_modality(inputs))
    chosen.sources.setdefault("modality", Source.GRAPH)
    processor = ProcessorKind(chosen.pick("processor") or PROCESSOR_FOR_MODALITY[modality])
    chosen.sources.setdefault("processor", Source.GRAPH)
    processor_class = chosen.pick("processor_class") or hf.processor_class()
    if processor_class:
        chosen.sources.setdefault("processor_class", Source.HF)
    task = resolve_task(chosen.pick("task") or infer_task(modality, outputs), modality)
    chosen.sources.setdefault("task", Source.GRAPH)
    return modality, processor, processor_class, task


def _read_layers(
    folder: Path, onnx_path: Path, props: Mapping[str, str], overrides: Mapping[str, Any]
) -> tuple[HFFiles, SentenceTransformerFiles | None, tuple[Layer, ...]]:
    """The folder's HF files and every declaring layer, highest first (each validated as it is read)."""
    onnx_where = f"{onnx_path} metadata_props"
    onnx_layer = _validated(declared_props(props, onnx_path), onnx_where)
    companion_path = folder / COMPANION_FILE
    companion = _validated(read_json(companion_path), str(companion_path)) if companion_path.is_file() else {}
    hf = HFFiles.read(folder)
    sentence = SentenceTransformerFiles.read(folder)
    layers = (
        Layer(Source.OVERRIDE, _validated(dict(overrides), "overrides"), "overrides"),
        Layer(Source.ONNX, onnx_layer, onnx_where),
        Layer(Source.COMPANION, companion, str(companion_path)),
        Layer(
            Source.SENTENCE_TRANSFORMERS,
            sentence.declared(hf) if sentence else {},
            str(folder / "modules.json"),
        ),
        Layer(Source.HF, hf.declared(), str(folder / "config.json")),
    )
    return hf, sentence, layers


def _validated(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The fields one layer declares, checked against the key schema."""
    try:
        return Declared.model_validate(raw).fields_set()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise MetadataError(f"{where}: invalid metadata ({problems})") from exc


def _check_conflicts(layers: tuple[Layer, ...], fixed: Mapping[str, Any], onnx_path: Path) -> None:
    """A declared value that disagrees with a dim the graph fixes is an error, not a guess."""
    for field_name, graph_value in fixed.items():
        for layer in layers:
            declared = layer.values.get(field_name)
            if declared is None or layer.source in _FOLDER_FILE_SOURCES:
                continue
            if tuple(_as_tuple(declared)) != tuple(_as_tuple(graph_value)):
                raise MetadataError(
                    f"{layer.where}: '{field_name}' = {list(_as_tuple(declared))} contradicts the graph "
                    f"in {onnx_path.name}, which fixes it at {list(_as_tuple(graph_value))}"
                )


def _as_tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, list | tuple) else (value,)


def _check_processor_files(folder: Path, processor: ProcessorKind, hf: HFFiles) -> None:
    """The files the processor kind loads from must be in the folder."""
    needs_tokenizer = processor in (ProcessorKind.TOKENIZER, ProcessorKind.MULTIMODAL_PROCESSOR)
    if needs_tokenizer and not hf.has_tokenizer:
        raise MetadataError(
            f"{folder}: a {processor.value} needs tokenizer files (tokenizer.json or vocab.*), none found"
        )
    needs_preprocessor = processor not in (ProcessorKind.TOKENIZER,)
    if needs_preprocessor and not (hf.preprocessor or hf.video_preprocessor or hf.processor):
        raise MetadataError(
            f"{folder}: a {processor.value} needs preprocessor_config.json "
            "(or video_preprocessor_config.json / processor_config.json), none found"
        )


def _dim_values(
    chosen: Precedence,
    roles: Mapping[str, DimRole],
    hf: HFFiles,
    sampling_rate: int | None,
    onnx_path: Path,
) -> dict[str, tuple[int, ...]]:
    """The bucket values of every named dynamic dim."""
    values: dict[str, tuple[int, ...]] = {}
    for dim, role in roles.items():
        if role is DimRole.BATCH:
            values[dim] = tuple(chosen.pick("batch_sizes", default=DEFAULT_BATCH_SIZES))
        elif role is DimRole.SEQUENCE:
            values[dim] = _sequence_buckets(chosen, hf)
        elif role is DimRole.SAMPLES:
            rate = sampling_rate or 16_000
            default = tuple(int(s * rate) for s in DEFAULT_AUDIO_SECONDS)
            values[dim] = tuple(chosen.pick("audio_samples", default=default))
        else:
            values[dim] = (_single_dim(chosen, dim, role, hf, onnx_path),)
    return values


def _sequence_buckets(chosen: Precedence, hf: HFFiles) -> tuple[int, ...]:
    """Declared token buckets, else the defaults up to the tokenizer's and position table's limit."""
    declared = chosen.pick("sequence_lengths")
    if declared is not None:
        return tuple(declared)
    limit = hf.max_tokens()
    buckets = tuple(b for b in DEFAULT_SEQUENCE_LENGTHS if limit is None or b <= limit)
    if limit is not None and (not buckets or buckets[-1] < min(limit, DEFAULT_SEQUENCE_LENGTHS[-1])):
        buckets = (*buckets, min(limit, DEFAULT_SEQUENCE_LENGTHS[-1]))
    chosen.sources["sequence_lengths"] = Source.DEFAULT if limit is None else Source.HF
    return buckets


def _single_dim(chosen: Precedence, dim: str, role: DimRole, hf: HFFiles, onnx_path: Path) -> int:
    """A dynamic dim that is not a bucket: its one value comes from metadata or HF files."""
    value: Any = None
    if role in (DimRole.HEIGHT, DimRole.WIDTH):
        size = chosen.pick("image_size")
        value = None if size is None else size[0 if role is DimRole.HEIGHT else 1]
    elif role is DimRole.VIDEO_FRAMES:
        value = chosen.pick("video_frames")
    elif role is DimRole.FRAMES:
        value = chosen.pick("audio_frames")
    elif role is DimRole.CHANNELS:
        value = hf.config.get("num_channels", 3)
    elif role is DimRole.MEL_BINS:
        value = hf.preprocessor.get("feature_size") or hf.config.get("num_mel_bins")
    if not isinstance(value, int):
        raise MetadataError(
            f"{onnx_path}: dynamic dim {dim!r} ({role.value}) has no value in any metadata source"
        )
    return value
