"""The documented metadata keys: their names, defaults and types, and where a value came from."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.requests import Modality  # one modality enum: the wire format's

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
