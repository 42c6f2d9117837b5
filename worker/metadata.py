"""Work out, from a model folder alone, what a model eats and what it returns.

Precedence for every field, highest first: explicit overrides (arguments, settings) >
ONNX ``metadata_props`` keys (``inference.*``) > the companion ``inference.json`` next to
the model > the Hugging Face files in the folder (sentence-transformers' own files before
config.json and the processor files) > inference from the graph's input names, ranks, dims
and dtypes > documented defaults. Each field records where it came from.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas.requests import Modality  # one modality enum: the wire format's

# --- the documented key set ---------------------------------------------------------------
#: Namespace of the keys the worker reads from an ONNX file's ``metadata_props``.
METADATA_PREFIX = "inference."
#: Name of the companion JSON file (same keys, without the prefix) next to ``model.onnx``.
COMPANION_FILE = "inference.json"
#: File names tried, in order, when a folder is given.
ONNX_FILES = ("model.onnx", "model_quantized.onnx")

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)
DEFAULT_SEQUENCE_LENGTHS = (8, 16, 24, 32, 48, 64, 96, 128)
DEFAULT_AUDIO_SECONDS = (1.0, 5.0, 10.0)
#: sentence-transformers' pooling modes (``Pooling.POOLING_MODES``); several are concatenated in the
#: order given, as sentence-transformers does. ``none`` keeps the token vectors.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
#: Graph outputs that already hold the sentence embedding (sentence-transformers exports, e.g. Optimum's).
POOLED_OUTPUTS = ("sentence_embedding", "sentence_embeddings")
#: Graph outputs that hold token vectors, most usual first.
TOKEN_OUTPUTS = ("last_hidden_state", "token_embeddings")


class MetadataError(ValueError):
    """A model folder the worker cannot serve; the message names the file and the field."""


class ProcessorKind(StrEnum):
    """The five Hugging Face processor types."""

    TOKENIZER = "tokenizer"
    IMAGE_PROCESSOR = "image processor"
    FEATURE_EXTRACTOR = "feature extractor"
    VIDEO_PROCESSOR = "video processor"
    MULTIMODAL_PROCESSOR = "multimodal processor"


PROCESSOR_FOR_MODALITY = {
    Modality.TEXT: ProcessorKind.TOKENIZER,
    Modality.VISION: ProcessorKind.IMAGE_PROCESSOR,
    Modality.AUDIO: ProcessorKind.FEATURE_EXTRACTOR,
    Modality.VIDEO: ProcessorKind.VIDEO_PROCESSOR,
    Modality.MULTIMODAL: ProcessorKind.MULTIMODAL_PROCESSOR,
}


class Source(StrEnum):
    """Where a metadata field's value came from."""

    OVERRIDE = "override"
    ONNX = "onnx metadata"
    COMPANION = "companion json"
    SENTENCE_TRANSFORMERS = "sentence-transformers files"
    HF = "hf config"
    GRAPH = "inferred from graph"
    DEFAULT = "default"


class Declared(BaseModel):
    """The keys a user may declare in ONNX metadata, the companion JSON or overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modality: Modality | None = Field(None, description="text | vision | audio | video | multimodal")
    processor: ProcessorKind | None = Field(None, description="one of the five processor types")
    processor_class: str | None = Field(None, description="transformers class name, for the record")
    task: str | None = Field(None, description="pipeline task name, e.g. text-classification")
    labels: list[str] | None = Field(None, description="class labels by output index")
    batch_sizes: tuple[int, ...] | None = Field(None, description="batch-size buckets")
    sequence_lengths: tuple[int, ...] | None = Field(None, description="token-length buckets")
    image_size: tuple[int, int] | None = Field(None, description="[height, width] in pixels")
    audio_samples: tuple[int, ...] | None = Field(None, description="raw-sample buckets")
    audio_frames: int | None = Field(None, description="feature frames (e.g. Whisper's 3000)")
    video_frames: int | None = Field(None, description="frames per clip")
    sampling_rate: int | None = Field(None, description="audio sampling rate in Hz")
    pooling: str | None = Field(
        None,
        description="feature extraction pooling: none | mean | cls | max | mean_sqrt_len_tokens | "
        "weightedmean | lasttoken (comma-separated modes are concatenated)",
    )
    normalize: bool | None = Field(None, description="L2-normalise pooled embeddings")
    include_prompt: bool | None = Field(None, description="pool over the prompt's tokens too (default true)")
    prompts: dict[str, str] | None = Field(None, description="named prompts put before the text")
    default_prompt_name: str | None = Field(None, description="the prompt every text gets, by name")

    @field_validator("batch_sizes", "sequence_lengths", "audio_samples", mode="before")
    @classmethod
    def _csv_or_list(cls, value: Any) -> Any:
        if isinstance(value, int):
            return (value,)
        if isinstance(value, str):
            return tuple(int(part) for part in value.replace(" ", "").split(",") if part)
        return value

    @field_validator("batch_sizes", "sequence_lengths", "audio_samples")
    @classmethod
    def _sorted_positive(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is None:
            return None
        if not value or min(value) < 1:
            raise ValueError("must be one or more positive integers")
        return tuple(sorted(set(value)))

    @field_validator("pooling", mode="before")
    @classmethod
    def _pooling_modes(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            value = ",".join(str(mode) for mode in value)
        if isinstance(value, str):
            modes = value.replace(" ", "").split(",")
            if modes != ["none"] and not set(modes) <= set(POOLING_MODES):
                raise ValueError(f"must be 'none' or modes among {', '.join(POOLING_MODES)}")
            return ",".join(modes)
        return value

    @field_validator("image_size", mode="before")
    @classmethod
    def _square_or_pair(cls, value: Any) -> Any:
        if isinstance(value, int):
            return (value, value)
        if isinstance(value, str):
            return tuple(int(part) for part in value.replace("x", ",").split(","))
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_from_mapping(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return [value[k] for k in sorted(value, key=int)]
        return value

    def fields_set(self) -> dict[str, Any]:
        """The fields this layer actually declares."""
        return {name: getattr(self, name) for name in self.model_fields_set}


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

    @classmethod
    def load(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> ModelMetadata:
        """Resolve a model folder (or a bare ``.onnx`` file) into metadata, or raise MetadataError."""
        return _Resolver(Path(path), overrides or {}).resolve()

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

    def batch_limit(self, key: Bucket, max_rows: int, max_tokens: int) -> int:
        """Most requests one batch of shape ``key`` should take.

        ``max_rows``, unless rows x the key's sequence bucket would exceed ``max_tokens``: then
        the largest batch bucket within the budget (at least 1), so the batch is not padded back
        up. On a CPU cost grows with tokens, so the budget bounds one batch's run time and memory.
        """
        tokens = self.sequence_length(key)
        if tokens is None or max_rows * tokens <= max_tokens:
            return max_rows
        fits = max_tokens // tokens
        return max((b for b in self.batch_sizes if b <= fits), default=1)

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


# --- graph reading ------------------------------------------------------------------------

_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def _spec(arg: Any) -> TensorSpec:
    dtype = _ORT_DTYPES.get(arg.type)
    if dtype is None:
        raise MetadataError(f"tensor {arg.name!r} has unsupported type {arg.type}")
    shape = tuple(d if isinstance(d, int) and d > 0 else (d or None) for d in arg.shape)
    return TensorSpec(arg.name, dtype, tuple(None if d == 0 else d for d in shape))


def read_graph(onnx_path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], dict[str, str]]:
    """Inputs, outputs and metadata_props of an ONNX file, read with ONNX Runtime itself."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises several unrelated types for a bad file
        raise MetadataError(f"{onnx_path}: not a loadable ONNX model ({exc})") from exc
    inputs = tuple(_spec(arg) for arg in session.get_inputs())
    outputs = tuple(_spec(arg) for arg in session.get_outputs())
    return inputs, outputs, dict(session.get_modelmeta().custom_metadata_map)


# --- Hugging Face files -------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MetadataError(f"{path}: unreadable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise MetadataError(f"{path}: expected a JSON object")
    return data


@dataclass(frozen=True)
class HFFiles:
    """The Hugging Face files found in a model folder."""

    config: dict[str, Any]
    preprocessor: dict[str, Any]
    processor: dict[str, Any]
    video_preprocessor: dict[str, Any]
    tokenizer: dict[str, Any]
    has_tokenizer: bool

    @classmethod
    def read(cls, folder: Path) -> HFFiles:
        """Read whichever of the known files exist; absent files read as empty."""

        def maybe(name: str) -> dict[str, Any]:
            path = folder / name
            return _read_json(path) if path.is_file() else {}

        tokenizer_files = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")
        files = cls(
            config=maybe("config.json"),
            preprocessor=maybe("preprocessor_config.json"),
            processor=maybe("processor_config.json"),
            video_preprocessor=maybe("video_preprocessor_config.json"),
            tokenizer=maybe("tokenizer_config.json"),
            has_tokenizer=any((folder / f).is_file() for f in tokenizer_files),
        )
        files.refuse_remote_code(folder)
        return files

    def refuse_remote_code(self, folder: Path) -> None:
        """A folder whose files point at custom code (``auto_map``) would need trust_remote_code."""
        for name, data in (
            ("config.json", self.config),
            ("tokenizer_config.json", self.tokenizer),
            ("preprocessor_config.json", self.preprocessor),
            ("processor_config.json", self.processor),
            ("video_preprocessor_config.json", self.video_preprocessor),
        ):
            if "auto_map" in data:
                raise MetadataError(
                    f"{folder / name}: 'auto_map' names custom code, which needs trust_remote_code; "
                    "the worker never runs code from a model folder"
                )

    def text_config(self) -> dict[str, Any]:
        """The config block that describes the text tower (CLIP nests it)."""
        nested = self.config.get("text_config")
        return nested if isinstance(nested, dict) else self.config

    def processor_class(self) -> str | None:
        """The processor class the HF files name, most specific first."""
        for source, key in (
            (self.processor, "processor_class"),
            (self.video_preprocessor, "video_processor_type"),
            (self.preprocessor, "processor_class"),
            (self.preprocessor, "image_processor_type"),
            (self.preprocessor, "feature_extractor_type"),
            (self.tokenizer, "tokenizer_class"),
        ):
            value = source.get(key)
            if isinstance(value, str):
                return value
        return None

    def declared(self) -> dict[str, Any]:
        """Metadata fields the HF files state outright."""
        out: dict[str, Any] = {}
        id2label = self.config.get("id2label")
        if isinstance(id2label, dict) and id2label:
            out["labels"] = [id2label[k] for k in sorted(id2label, key=int)]
        size = _image_size(self.video_preprocessor or self.preprocessor or self._nested_image_processor())
        if size is not None:
            out["image_size"] = size
        if isinstance(self.preprocessor.get("sampling_rate"), int):
            out["sampling_rate"] = self.preprocessor["sampling_rate"]
        if isinstance(self.preprocessor.get("nb_max_frames"), int):
            out["audio_frames"] = self.preprocessor["nb_max_frames"]
        frames = self.config.get("num_frames")
        if isinstance(frames, int):
            out["video_frames"] = frames
        task = _task_from_architectures(self.config.get("architectures"))
        if task is not None:
            out["task"] = task
        return out

    def _nested_image_processor(self) -> dict[str, Any]:
        """transformers 5 saves CLIP-style processors as one processor_config.json with a nested block."""
        nested = self.processor.get("image_processor")
        return nested if isinstance(nested, dict) else {}

    def max_tokens(self) -> int | None:
        """The longest token sequence the tokenizer and position table allow."""
        limits = [
            value
            for value in (
                self.tokenizer.get("model_max_length"),
                self.text_config().get("max_position_embeddings"),
            )
            if isinstance(value, int) and 0 < value < 1_000_000
        ]
        return min(limits) if limits else None


#: sentence-transformers modules the worker applies itself; any other (Dense, ...) must be inside the graph.
_SENTENCE_MODULES = ("Transformer", "Pooling", "Normalize")
#: Pooling config keys of sentence-transformers before v5, in the order it concatenates their vectors.
_LEGACY_POOLING_KEYS = (
    ("pooling_mode_cls_token", "cls"),
    ("pooling_mode_max_tokens", "max"),
    ("pooling_mode_mean_tokens", "mean"),
    ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
    ("pooling_mode_weightedmean_tokens", "weightedmean"),
    ("pooling_mode_lasttoken", "lasttoken"),
)


@dataclass(frozen=True)
class SentenceTransformerFiles:
    """A sentence-transformers folder: ``modules.json`` and the files its modules point at.

    Pooling from the Pooling module's ``config.json`` (``1_Pooling/``), normalisation from a
    Normalize module, the longest sequence from ``sentence_bert_config.json`` and the prompts from
    ``config_sentence_transformers.json``: what ``SentenceTransformer.encode`` applies after the graph.
    """

    folder: Path
    #: (short type name, folder) per module, in order: ("Transformer", ""), ("Pooling", "1_Pooling"), ...
    modules: tuple[tuple[str, str], ...]
    pooling: dict[str, Any]
    transformer: dict[str, Any]
    settings: dict[str, Any]

    @classmethod
    def read(cls, folder: Path) -> SentenceTransformerFiles | None:
        """The folder's sentence-transformers files, or None when it has no ``modules.json``."""
        path = folder / "modules.json"
        if not path.is_file():
            return None
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise MetadataError(f"{path}: unreadable JSON ({exc})") from exc
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "type" in e for e in entries):
            raise MetadataError(f"{path}: expected a list of modules, each with a 'type'")
        modules = tuple((str(e["type"]).rsplit(".", 1)[-1], str(e.get("path", ""))) for e in entries)

        def module_file(kind: str, name: str) -> dict[str, Any]:
            where = next((sub for module, sub in modules if module == kind), None)
            file = folder / where / name if where is not None else None
            return _read_json(file) if file is not None and file.is_file() else {}

        settings_path = folder / "config_sentence_transformers.json"
        return cls(
            folder=folder,
            modules=modules,
            pooling=module_file("Pooling", "config.json"),
            transformer=module_file("Transformer", "sentence_bert_config.json"),
            settings=_read_json(settings_path) if settings_path.is_file() else {},
        )

    @property
    def module_names(self) -> tuple[str, ...]:
        """The short type names of the modules, in order."""
        return tuple(kind for kind, _ in self.modules)

    def check_applicable(self, pooled_in_graph: bool) -> None:
        """Refuse modules the worker would skip: their output is only right when the graph holds them."""
        if pooled_in_graph:
            return
        others = [kind for kind in self.module_names if kind not in _SENTENCE_MODULES]
        if others:
            raise MetadataError(
                f"{self.folder / 'modules.json'}: module(s) {', '.join(others)} run after the transformer, "
                "which the worker does not apply: export the whole SentenceTransformer so that the graph "
                "has a 'sentence_embedding' output"
            )

    def pooling_modes(self) -> str | None:
        """The Pooling module's mode(s), comma-separated; None without a Pooling module."""
        if "Pooling" not in self.module_names:
            return None
        mode = self.pooling.get("pooling_mode")
        if isinstance(mode, str):
            return mode
        if isinstance(mode, list):
            return ",".join(str(m) for m in mode)
        legacy = [name for key, name in _LEGACY_POOLING_KEYS if self.pooling.get(key)]
        # sentence-transformers' own fallback when no legacy flag is set.
        return ",".join(legacy) or "mean"

    def max_seq_length(self, hf: HFFiles) -> int | None:
        """The longest token sequence sentence-transformers keeps, within the model's position table.

        ``max_seq_length`` in sentence_bert_config.json (before v6), else the tokenizer's
        ``model_max_length`` (v6 saves it there), as the Transformer module reads them.
        """
        limits = [
            value
            for value in (
                self.transformer.get("max_seq_length") or hf.tokenizer.get("model_max_length"),
                hf.text_config().get("max_position_embeddings"),
            )
            if isinstance(value, int) and 0 < value < 1_000_000
        ]
        return min(limits) if limits else None

    def declared(self, hf: HFFiles) -> dict[str, Any]:
        """Metadata fields these files state outright."""
        out: dict[str, Any] = {"normalize": "Normalize" in self.module_names}
        modes = self.pooling_modes()
        if modes is not None:
            out["pooling"] = modes
            out["include_prompt"] = bool(self.pooling.get("include_prompt", True))
        longest = self.max_seq_length(hf)
        if longest is not None:
            out["sequence_lengths"] = _buckets_up_to(longest)
        prompts = self.settings.get("prompts")
        if isinstance(prompts, dict) and prompts:
            out["prompts"] = {str(k): str(v) for k, v in prompts.items()}
        default_prompt = self.settings.get("default_prompt_name")
        if isinstance(default_prompt, str):
            out["default_prompt_name"] = default_prompt
        return out


def _buckets_up_to(longest: int) -> tuple[int, ...]:
    """Token buckets ending at ``longest``: the defaults below it, doubling past the last default."""
    buckets = [b for b in DEFAULT_SEQUENCE_LENGTHS if b < longest]
    while buckets and buckets[-1] * 2 < longest:
        buckets.append(buckets[-1] * 2)
    return (*buckets, longest)


def _image_size(pre: Mapping[str, Any]) -> tuple[int, int] | None:
    """The H×W an image processor produces: crop size wins over resize size."""
    for key in ("crop_size", "size"):
        size = pre.get(key)
        if key == "crop_size" and not pre.get("do_center_crop", key in pre):
            continue
        if isinstance(size, int):
            return (size, size)
        if isinstance(size, dict):
            if "height" in size and "width" in size:
                return (int(size["height"]), int(size["width"]))
            if "shortest_edge" in size and key == "crop_size":
                return (int(size["shortest_edge"]), int(size["shortest_edge"]))
    return None


_ARCHITECTURE_TASKS = (
    ("ForSequenceClassification", "sequence-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForImageClassification", "image-classification"),
    ("ForAudioClassification", "audio-classification"),
    ("ForVideoClassification", "video-classification"),
)
_ZERO_SHOT_IMAGE_ARCHITECTURES = {"CLIPModel", "SiglipModel", "Siglip2Model", "ChineseCLIPModel"}


def _task_from_architectures(architectures: Any) -> str | None:
    if not isinstance(architectures, list) or not architectures:
        return None
    arch = str(architectures[0])
    if arch in _ZERO_SHOT_IMAGE_ARCHITECTURES:
        return "zero-shot-image-classification"
    for suffix, task in _ARCHITECTURE_TASKS:
        if arch.endswith(suffix):
            return task
    if arch.endswith("Model"):
        return "feature-extraction"
    return None


# --- inference from the graph ------------------------------------------------------------

_TEXT_INPUTS = {"input_ids", "inputs_embeds"}
_IMAGE_INPUTS = {"pixel_values"}
_VIDEO_INPUTS = {"pixel_values_videos"}


def infer_modality(inputs: tuple[TensorSpec, ...]) -> Modality:
    """Modality from input names and ranks, where name matching alone goes wrong."""
    by_name = {spec.name: spec for spec in inputs}
    pixels = next((by_name[n] for n in ("pixel_values", "pixel_values_videos") if n in by_name), None)
    has_text = bool(_TEXT_INPUTS & by_name.keys())
    if pixels is not None and has_text:
        return Modality.MULTIMODAL
    if pixels is not None:
        # [B, T, C, H, W] is a clip of frames (VideoMAE); [B, C, H, W] one image (ViT).
        return Modality.VIDEO if len(pixels.shape) == 5 or pixels.name in _VIDEO_INPUTS else Modality.VISION
    # Wav2Vec2 has an attention_mask too: the waveform/feature input decides, not the mask.
    if "input_values" in by_name or "input_features" in by_name:
        return Modality.AUDIO
    if has_text:
        return Modality.TEXT  # a LayoutLM `bbox` [B, S, 4] rides along with the tokens
    names = ", ".join(by_name) or "none"
    raise MetadataError(f"cannot infer the modality from the graph inputs ({names}): declare 'modality'")


def infer_task(modality: Modality, outputs: tuple[TensorSpec, ...]) -> str:
    """Task from output names, when neither metadata nor config.json says."""
    names = {spec.name: spec for spec in outputs}
    if "logits_per_image" in names:
        return "zero-shot-image-classification"
    if {"start_logits", "end_logits"} <= names.keys():
        return "question-answering"
    if "logits" in names:
        if modality is Modality.TEXT and len(names["logits"].shape) == 3:
            return "token-classification"
        return _CLASSIFICATION_TASKS[modality]
    if names.keys() & {"last_hidden_state", "sentence_embedding", "token_embeddings", "text_embeds"}:
        return "feature-extraction"
    raise MetadataError(f"cannot infer the task from the graph outputs ({', '.join(names)}): declare 'task'")


_CLASSIFICATION_TASKS = {
    Modality.TEXT: "text-classification",
    Modality.VISION: "image-classification",
    Modality.AUDIO: "audio-classification",
    Modality.VIDEO: "video-classification",
    Modality.MULTIMODAL: "zero-shot-image-classification",
}


def _resolve_task(task: str, modality: Modality) -> str:
    """Map transformers' generic 'sequence-classification' onto the modality's pipeline task."""
    if task == "sequence-classification":
        return _CLASSIFICATION_TASKS[modality]
    return task


def _dim_roles(inputs: tuple[TensorSpec, ...]) -> dict[str, DimRole]:
    """Role of every named dynamic dim, decided by the input that owns it and its axis."""
    roles: dict[str, DimRole] = {}
    by_axis: dict[str, dict[int, DimRole]] = {
        "input_ids": {1: DimRole.SEQUENCE},
        "inputs_embeds": {1: DimRole.SEQUENCE},
        "input_values": {1: DimRole.SAMPLES},
        "input_features": {1: DimRole.MEL_BINS, 2: DimRole.FRAMES},
    }
    for spec in inputs:
        if spec.name in ("pixel_values", "pixel_values_videos"):
            if len(spec.shape) == 5:
                axes = {1: DimRole.VIDEO_FRAMES, 2: DimRole.CHANNELS, 3: DimRole.HEIGHT, 4: DimRole.WIDTH}
            else:
                axes = {1: DimRole.CHANNELS, 2: DimRole.HEIGHT, 3: DimRole.WIDTH}
            by_axis[spec.name] = axes
    # Primary inputs first, so a mask or bbox inherits the role of the dim it shares.
    ordered = sorted(inputs, key=lambda spec: spec.name not in by_axis)
    for spec in ordered:
        for axis, dim in enumerate(spec.shape):
            if not isinstance(dim, str) or dim in roles:
                continue
            if axis == 0:
                roles[dim] = DimRole.BATCH
            elif axis in by_axis.get(spec.name, {}):
                roles[dim] = by_axis[spec.name][axis]
            elif axis == 1 and spec.name in ("attention_mask", "token_type_ids", "position_ids", "bbox"):
                roles[dim] = DimRole.SEQUENCE
            else:
                raise MetadataError(
                    f"input {spec.name!r} axis {axis} is a dynamic dim {dim!r} the worker cannot "
                    "pin: export it with a fixed size or declare its value"
                )
    for spec in inputs:
        for axis, dim in enumerate(spec.shape):
            if dim is None:
                raise MetadataError(
                    f"input {spec.name!r} axis {axis} is dynamic but unnamed: buckets need a "
                    "name to know what it stands for (export with named dynamic axes)"
                )
    return roles


def _fixed_dims(inputs: tuple[TensorSpec, ...]) -> dict[str, Any]:
    """Values the graph fixes for fields the metadata can also declare (to detect conflicts)."""
    found: dict[str, Any] = {}
    for spec in inputs:
        shape = spec.shape
        if spec.name in ("pixel_values", "pixel_values_videos") and len(shape) in (4, 5):
            h, w = shape[-2], shape[-1]
            if isinstance(h, int) and isinstance(w, int):
                found["image_size"] = (h, w)
            if len(shape) == 5 and isinstance(shape[1], int):
                found["video_frames"] = shape[1]
        if spec.name == "input_features" and len(shape) == 3 and isinstance(shape[2], int):
            found["audio_frames"] = shape[2]
        if spec.name == "input_ids" and len(shape) == 2 and isinstance(shape[1], int):
            found["sequence_lengths"] = (shape[1],)
        if spec.name == "input_values" and len(shape) == 2 and isinstance(shape[1], int):
            found["audio_samples"] = (shape[1],)
        if shape and isinstance(shape[0], int):
            found["batch_sizes"] = (shape[0],)
    return found


# --- the resolver ------------------------------------------------------------------------

#: Sources that describe the model in general: a value the graph fixes beats them, without a conflict.
_FOLDER_FILE_SOURCES = (Source.SENTENCE_TRANSFORMERS, Source.HF)


class _Resolver:
    """Merges the layers for one folder; every field goes through ``pick``."""

    def __init__(self, path: Path, overrides: Mapping[str, Any]) -> None:
        self.path = path
        self.overrides = overrides
        self.sources: dict[str, Source] = {}

    def _locate(self) -> tuple[Path, Path]:
        path = self.path
        if path.is_file() and path.suffix == ".onnx":
            return path.parent, path
        if not path.is_dir():
            raise MetadataError(f"{path}: no such model folder or .onnx file")
        for name in ONNX_FILES:
            if (path / name).is_file():
                return path, path / name
        candidates = sorted(path.glob("*.onnx"))
        if len(candidates) == 1:
            return path, candidates[0]
        if not candidates:
            raise MetadataError(f"{path}: no .onnx file in the folder")
        names = ", ".join(c.name for c in candidates)
        raise MetadataError(f"{path}: several .onnx files ({names}); name one or keep model.onnx")

    def _layer(self, raw: Mapping[str, Any], where: str) -> dict[str, Any]:
        try:
            return Declared.model_validate(raw).fields_set()
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise MetadataError(f"{where}: invalid metadata ({problems})") from exc

    def resolve(self) -> ModelMetadata:
        folder, onnx_path = self._locate()
        inputs, outputs, props = read_graph(onnx_path)
        onnx_layer = self._layer(_decode_props(props, onnx_path), f"{onnx_path} metadata_props")
        companion_path = folder / COMPANION_FILE
        companion = (
            self._layer(_read_json(companion_path), str(companion_path)) if companion_path.is_file() else {}
        )
        hf = HFFiles.read(folder)
        sentence = SentenceTransformerFiles.read(folder)
        override_layer = self._layer(dict(self.overrides), "overrides")
        layers = (
            (Source.OVERRIDE, override_layer, "overrides"),
            (Source.ONNX, onnx_layer, f"{onnx_path} metadata_props"),
            (Source.COMPANION, companion, str(companion_path)),
            (
                Source.SENTENCE_TRANSFORMERS,
                sentence.declared(hf) if sentence else {},
                str(folder / "modules.json"),
            ),
            (Source.HF, hf.declared(), str(folder / "config.json")),
        )

        def pick(name: str, graph: Any = None, default: Any = None) -> Any:
            for source, layer, _ in layers:
                # A dim the graph fixes beats the HF files (they describe a resize, not the graph).
                if source in _FOLDER_FILE_SOURCES and name in fixed:
                    break
                if name in layer and layer[name] is not None:
                    self.sources[name] = source
                    return layer[name]
            if graph is not None:
                self.sources[name] = Source.GRAPH
                return graph
            if default is not None:
                self.sources[name] = Source.DEFAULT
            return default

        roles = _dim_roles(inputs)
        fixed = _fixed_dims(inputs)
        self._check_conflicts(layers, fixed, onnx_path)

        modality = Modality(pick("modality", graph=None) or infer_modality(inputs))
        self.sources.setdefault("modality", Source.GRAPH)
        processor = ProcessorKind(pick("processor") or PROCESSOR_FOR_MODALITY[modality])
        self.sources.setdefault("processor", Source.GRAPH)
        processor_class = pick("processor_class") or hf.processor_class()
        if processor_class and "processor_class" not in self.sources:
            self.sources["processor_class"] = Source.HF
        task = _resolve_task(pick("task") or infer_task(modality, outputs), modality)
        self.sources.setdefault("task", Source.GRAPH)
        labels = pick("labels")
        self._check_processor_files(folder, processor, hf)
        if sentence is not None:
            sentence.check_applicable(pooled_in_graph=any(s.name in POOLED_OUTPUTS for s in outputs))

        image_size = pick("image_size", graph=fixed.get("image_size"))
        audio_frames = pick("audio_frames", graph=fixed.get("audio_frames"))
        video_frames = pick("video_frames", graph=fixed.get("video_frames"))
        sampling_rate = pick("sampling_rate")
        dims = self._dim_values(inputs, roles, pick, fixed, hf, sampling_rate, onnx_path)
        return ModelMetadata(
            name=folder.name if onnx_path.parent == folder and self.path.is_dir() else onnx_path.stem,
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
            pooling=pick("pooling"),
            normalize=bool(pick("normalize", default=False)),
            include_prompt=bool(pick("include_prompt", default=True)),
            prompts=pick("prompts"),
            default_prompt_name=pick("default_prompt_name"),
            sources=dict(self.sources),
            onnx_metadata=props,
        )

    def _check_conflicts(
        self, layers: tuple[tuple[Source, dict[str, Any], str], ...], fixed: dict[str, Any], onnx_path: Path
    ) -> None:
        """A declared value that disagrees with a dim the graph fixes is an error, not a guess."""
        for field_name, graph_value in fixed.items():
            for source, layer, where in layers:
                declared = layer.get(field_name)
                if declared is None or source in _FOLDER_FILE_SOURCES:
                    continue
                if tuple(_as_tuple(declared)) != tuple(_as_tuple(graph_value)):
                    raise MetadataError(
                        f"{where}: '{field_name}' = {list(_as_tuple(declared))} contradicts the graph "
                        f"in {onnx_path.name}, which fixes it at {list(_as_tuple(graph_value))}"
                    )

    def _check_processor_files(self, folder: Path, processor: ProcessorKind, hf: HFFiles) -> None:
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
        self,
        inputs: tuple[TensorSpec, ...],
        roles: dict[str, DimRole],
        pick: Any,
        fixed: dict[str, Any],
        hf: HFFiles,
        sampling_rate: int | None,
        onnx_path: Path,
    ) -> dict[str, tuple[int, ...]]:
        """The bucket values of every named dynamic dim."""
        values: dict[str, tuple[int, ...]] = {}
        for dim, role in roles.items():
            if role is DimRole.BATCH:
                values[dim] = tuple(pick("batch_sizes", default=DEFAULT_BATCH_SIZES))
            elif role is DimRole.SEQUENCE:
                values[dim] = self._sequence_buckets(pick, hf)
            elif role is DimRole.SAMPLES:
                rate = sampling_rate or 16_000
                default = tuple(int(s * rate) for s in DEFAULT_AUDIO_SECONDS)
                values[dim] = tuple(pick("audio_samples", default=default))
            else:
                values[dim] = (self._single_dim(dim, role, pick, hf, onnx_path),)
        return values

    def _sequence_buckets(self, pick: Any, hf: HFFiles) -> tuple[int, ...]:
        declared = pick("sequence_lengths")
        if declared is not None:
            return tuple(declared)
        limit = hf.max_tokens()
        buckets = tuple(b for b in DEFAULT_SEQUENCE_LENGTHS if limit is None or b <= limit)
        if limit is not None and (not buckets or buckets[-1] < min(limit, DEFAULT_SEQUENCE_LENGTHS[-1])):
            buckets = (*buckets, min(limit, DEFAULT_SEQUENCE_LENGTHS[-1]))
        self.sources["sequence_lengths"] = Source.DEFAULT if limit is None else Source.HF
        return buckets

    def _single_dim(self, dim: str, role: DimRole, pick: Any, hf: HFFiles, onnx_path: Path) -> int:
        """A dynamic dim that is not a bucket: its one value comes from metadata or HF files."""
        value: Any = None
        if role in (DimRole.HEIGHT, DimRole.WIDTH):
            size = pick("image_size")
            value = None if size is None else size[0 if role is DimRole.HEIGHT else 1]
        elif role is DimRole.VIDEO_FRAMES:
            value = pick("video_frames")
        elif role is DimRole.FRAMES:
            value = pick("audio_frames")
        elif role is DimRole.CHANNELS:
            value = hf.config.get("num_channels", 3)
        elif role is DimRole.MEL_BINS:
            value = hf.preprocessor.get("feature_size") or hf.config.get("num_mel_bins")
        if not isinstance(value, int):
            raise MetadataError(
                f"{onnx_path}: dynamic dim {dim!r} ({role.value}) has no value in any metadata source"
            )
        return value


def _as_tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, list | tuple) else (value,)


def _decode_props(props: Mapping[str, str], onnx_path: Path) -> dict[str, Any]:
    """``inference.*`` metadata_props, JSON-decoded where the value is JSON."""
    out: dict[str, Any] = {}
    for key, raw in props.items():
        if not key.startswith(METADATA_PREFIX):
            continue
        try:
            out[key.removeprefix(METADATA_PREFIX)] = json.loads(raw)
        except ValueError:
            out[key.removeprefix(METADATA_PREFIX)] = raw
    unknown = set(out) - set(Declared.model_fields)
    if unknown:
        raise MetadataError(
            f"{onnx_path}: unknown metadata keys {sorted(METADATA_PREFIX + k for k in unknown)}"
        )
    return out


def iter_model_folders(models_dir: Path) -> Iterator[Path]:
    """Folders under ``models_dir`` that hold an ONNX file (one level deep, sorted)."""
    for child in sorted(models_dir.iterdir()):
        if child.is_dir() and any(child.glob("*.onnx")):
            yield child
