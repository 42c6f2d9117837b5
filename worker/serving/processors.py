"""Processor factory: metadata -> the right Hugging Face processor, emitting fixed shapes.

Each wrapper turns one decoded input into the graph's exact input names and dtypes at
one of the model's bucket shapes, and says whether it had to cut anything off. The
factory caches one wrapper per folder and resolved metadata (buckets, shapes, overrides);
every consumer in a process shares it.
"""

from __future__ import annotations

import functools
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from worker.errors import InvalidRequest, UndecodableInput
from worker.serving.inputs import (
    AudioInput,
    ImageInput,
    ModelInput,
    MultimodalInput,
    Prepared,
    TensorInput,
    TextInput,
    VideoFileInput,
    VideoInput,
)
from worker.serving.media import Clip, pipeline_indices, resample, sample_frames, uniform_indices
from worker.serving.metadata import MetadataError, ModelMetadata, ProcessorKind
from worker.serving.tensor_inputs import checked_cast, value_ranges
from worker.serving.tokenizing import (
    ALIGNED_TASKS,
    bucket_for,
    encode_text,
    pad_to_bucket,
    prompt_length,
    sequence_pad_values,
    token_alignment,
    tokenize_text,
)

# Re-exported: callers that take the decoded inputs along with the processors import them from here.
__all__ = [
    "AudioInput",
    "ImageInput",
    "ModelInput",
    "MultimodalInput",
    "Prepared",
    "TensorInput",
    "TextInput",
    "VideoFileInput",
    "VideoInput",
    "sample_frames",
]

# --- the wrappers ------------------------------------------------------------------------


class Preprocessor(ABC):
    """Base wrapper: subclasses produce arrays, the base fits them to the graph."""

    kind: ClassVar[ProcessorKind]

    def __init__(self, metadata: ModelMetadata) -> None:
        self.metadata = metadata
        self.pad_values: Mapping[str, int] = {}
        """Per input, the value that lengthens its sequence axis so that a request can run in a longer
        bucket (masked out); empty when the model's requests never change bucket."""
        self.value_ranges = value_ranges(metadata)
        """Per integer input, the values the model accepts, where known (raw tensors are held to them)."""

    @abstractmethod
    def _encode(self, item: ModelInput) -> tuple[dict[str, np.ndarray], bool, dict[str, Any]]:
        """Arrays keyed by HF names, a truncation flag and context for the task head."""

    def prepare(self, item: ModelInput) -> Prepared:
        """Turn one decoded input into graph-ready arrays at a bucket shape."""
        if isinstance(item, TensorInput):
            prepared = self._fit(dict(item.tensors), truncated=False, context={}, strict=True)
            if any(array.shape[0] != 1 for array in prepared.arrays.values()):
                # One request, one answer: a client batch would need one result per row.
                raise InvalidRequest(
                    "tensor inputs must hold exactly one row (axis 0 = 1); send one request per row"
                )
            return prepared
        arrays, truncated, context = self._encode(item)
        return self._fit(arrays, truncated=truncated, context=context, strict=False)

    def _fit(
        self, arrays: dict[str, np.ndarray], *, truncated: bool, context: dict[str, Any], strict: bool
    ) -> Prepared:
        """Keep the graph's inputs, cast dtypes, fill optional masks, check every dim."""
        meta = self.metadata
        out: dict[str, np.ndarray] = {}
        key: dict[str, int] = {}
        for spec in meta.inputs:
            array = arrays.get(spec.name)
            if array is None:
                array = None if strict else self._default_input(spec.name, out)
            if array is None:
                raise InvalidRequest(f"model {meta.name!r} needs input {spec.name!r}")
            array = np.asarray(array)
            if array.ndim != len(spec.shape):
                raise InvalidRequest(
                    f"input {spec.name!r} has rank {array.ndim}, model {meta.name!r} expects {len(spec.shape)}"
                )
            for axis, dim in enumerate(spec.shape):
                size = array.shape[axis]
                if axis == 0:
                    continue
                if isinstance(dim, int):
                    if size != dim:
                        raise InvalidRequest(
                            f"input {spec.name!r} axis {axis} is {size}, model {meta.name!r} fixes it at {dim}"
                        )
                elif isinstance(dim, str):
                    if size not in meta.dims[dim]:
                        raise InvalidRequest(
                            f"input {spec.name!r} dim {dim!r} is {size}; allowed: {list(meta.dims[dim])}"
                        )
                    if key.setdefault(dim, size) != size:
                        raise InvalidRequest(f"inputs disagree on dim {dim!r}")
            # Raw tensors come from the client as they are: held to the graph's types and known ranges.
            if strict:
                out[spec.name] = checked_cast(spec.name, array, np.dtype(spec.dtype), self.value_ranges)
            else:
                out[spec.name] = np.ascontiguousarray(array, dtype=spec.dtype)
        rows = {meta.row_dim(name): a.shape[0] for name, a in out.items()}
        if any(n < 1 for n in rows.values()):
            raise InvalidRequest("an input has no rows")
        return Prepared(out, tuple(sorted(key.items())), truncated, context)

    def _default_input(self, name: str, have: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """Inputs some processors omit but the graph wants: zeros for token types."""
        if name == "token_type_ids" and "input_ids" in have:
            return np.zeros_like(have["input_ids"])
        if name == "attention_mask" and "input_ids" in have:
            return np.ones_like(have["input_ids"])
        return None


class TextPreprocessor(Preprocessor):
    """Tokenizer padded to the smallest sequence bucket that holds the text."""

    kind = ProcessorKind.TOKENIZER

    def __init__(self, metadata: ModelMetadata, tokenizer: Any) -> None:
        super().__init__(metadata)
        self.tokenizer = tokenizer
        buckets = metadata.sequence_lengths
        if not buckets:
            raise MetadataError(f"{metadata.onnx_path}: a text model needs a sequence dim")
        self.buckets = buckets
        self.pad_values = sequence_pad_values(metadata, tokenizer)
        self.aligned = metadata.task in ALIGNED_TASKS
        # Token and answer-span heads map tokens back into the request's own text: no prompt before it.
        self.prompt = None if self.aligned else metadata.prompt
        self.prompt_tokens = prompt_length(tokenizer, self.prompt) if self.prompt else 0
        if self.aligned and not getattr(tokenizer, "is_fast", False):
            raise MetadataError(
                f"{metadata.folder}: {metadata.task} needs token offsets, which only a fast tokenizer "
                "(tokenizer.json) gives"
            )

    def _encode(self, item: ModelInput) -> tuple[dict[str, np.ndarray], bool, dict[str, Any]]:
        if not isinstance(item, TextInput):
            raise InvalidRequest(f"model {self.metadata.name!r} takes text")
        extra = {"return_offsets_mapping": True, "return_special_tokens_mask": True} if self.aligned else {}
        # A sentence-transformers default prompt goes before the text, as SentenceTransformer.encode puts it.
        text = (self.prompt or "") + item.text
        encoding, truncated = tokenize_text(self.tokenizer, [(text, item.text_pair)], self.buckets, **extra)
        context: dict[str, Any] = {"text": item.text, "text_pair": item.text_pair}
        if self.prompt:
            context["prompt_tokens"] = self.prompt_tokens
        if self.aligned:
            context["alignment"] = token_alignment(self.tokenizer, encoding)
        return pad_to_bucket(self.tokenizer, encoding, self.buckets), truncated, context


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def image_pixels(image_processor: Any, image: Image.Image, extra: Mapping[str, Any]) -> np.ndarray:
    """One image through an image processor: its ``pixel_values``, one row."""
    features = image_processor(images=[_rgb(image)], return_tensors="np", **extra)
    return np.asarray(features["pixel_values"])


def _resize_to_graph(run: Any, image_size: tuple[int, int] | None) -> dict[str, Any]:
    """Extra processor kwargs so its output is the graph's H×W (empty when it already is)."""
    if image_size is None:
        return {}
    height, width = image_size
    probe = run(Image.new("RGB", (width + 7, height + 3)), {})
    if tuple(probe.shape[-2:]) == (height, width):
        return {}
    return {"size": {"height": height, "width": width}, "do_center_crop": False}


class ImagePreprocessor(Preprocessor):
    """Image processor resizing to the model's H×W."""

    kind = ProcessorKind.IMAGE_PROCESSOR

    def __init__(self, metadata: ModelMetadata, image_processor: Any) -> None:
        super().__init__(metadata)
        self.image_processor = image_processor
        self._pixels = functools.partial(image_pixels, image_processor)
        self.resize = _resize_to_graph(self._pixels, metadata.image_size)

    def _encode(self, item: ModelInput) -> tuple[dict[str, np.ndarray], bool, dict[str, Any]]:
        if not isinstance(item, ImageInput):
            raise InvalidRequest(f"model {self.metadata.name!r} takes an image")
        return {"pixel_values": self._pixels(item.image, self.resize)}, False, {}


class AudioPreprocessor(Preprocessor):
    """Feature extractor padded/cut to a sample bucket or to the model's feature frames."""

    kind = ProcessorKind.FEATURE_EXTRACTOR

    def __init__(self, metadata: ModelMetadata, feature_extractor: Any) -> None:
        super().__init__(metadata)
        self.feature_extractor = feature_extractor
        self.sampling_rate = int(metadata.sampling_rate or feature_extractor.sampling_rate)
        self.sample_buckets = metadata.audio_samples

    def _encode(self, item: ModelInput) -> tuple[dict[str, np.ndarray], bool, dict[str, Any]]:
        if not isinstance(item, AudioInput):
            raise InvalidRequest(f"model {self.metadata.name!r} takes audio")
        audio = resample(np.asarray(item.array, dtype=np.float32), item.sampling_rate, self.sampling_rate)
        if audio.size == 0:
            raise UndecodableInput(f"audio is shorter than one sample at the model's {self.sampling_rate} Hz")
        if self.sample_buckets:
            return self._encode_samples(audio, self.sample_buckets)
        return self._encode_features(audio)

    def _encode_samples(
        self, audio: np.ndarray, buckets: Sequence[int]
    ) -> tuple[dict[str, np.ndarray], bool, dict[str, Any]]:
        truncated = len(audio) > buckets[-1]
        audio = audio[: buckets[-1]]
        length = bucket_for(len(audio), buckets)
        features = self.feature_extractor(
            audio,
            sampling_rate=self.sampling_rate,
            padding="max_length",
            max_length=length,
            truncation=True,
            return_attention_mask=True,
            return_tensors="np",
        )
        return {k: np.asarray(v) for k, v in features.items()}, truncated, {}

    def _encode_features(self, audio: np.ndarray) -> tuple[dict[str, np.ndarray], bool, dict[str, Any]]:
        # Whisper-style extractors always pad/cut to a fixed window (n_samples = 30 s).
        limit = getattr(self.feature_extractor, "n_samples", None)
        truncated = limit is not None and len(audio) > limit
        features = self.feature_extractor(audio, sampling_rate=self.sampling_rate, return_tensors="np")
        return {k: np.asarray(v) for k, v in features.items()}, bool(truncated), {}


class VideoPreprocessor(Preprocessor):
    """Video processor sampling/padding the clip to the model's frame count."""

    kind = ProcessorKind.VIDEO_PROCESSOR

    def __init__(self, metadata: ModelMetadata, video_processor: Any) -> None:
        super().__init__(metadata)
        self.video_processor = video_processor
        if metadata.video_frames is None:
            raise MetadataError(f"{metadata.onnx_path}: a video model needs 'video_frames'")
        self.frames = metadata.video_frames
        self.input_name = next(spec.name for spec in metadata.inputs if "pixel" in spec.name)
        self.resize = _resize_to_graph(lambda image, extra: self._pixels([image], extra), metadata.image_size)
        # A video processor samples evenly over the whole clip; with an image processor (VideoMAE and kin)
        # transformers' video-classification pipeline reads the clip's first frames instead.
        self.samples_whole_clip = (metadata.folder / "video_preprocessor_config.json").is_file()

    def clip_indices(self, clip: Clip) -> list[int]:
        """Which frames of a video file this model's transformers preprocessing would take."""
        if self.samples_whole_clip:
            return uniform_indices(clip.total_frames, self.frames)
        return pipeline_indices(self.frames)

    def _pixels(self, frames: Sequence[Image.Image], extra: Mapping[str, Any]) -> np.ndarray:
        clip = [_rgb(frame) for frame in sample_frames(frames, self.frames)]
        features = self.video_processor([clip], return_tensors="np", **extra)
        return np.asarray(features.get("pixel_values", features.get("pixel_values_videos")))

    def _encode(self, item: ModelInput) -> tuple[dict[str, np.ndarray], bool, dict[str, Any]]:
        if isinstance(item, VideoFileInput):
            frames = item.clip.frames(self.clip_indices(item.clip))
            return (
                {self.input_name: self._pixels(frames, self.resize)},
                False,
                {"frames": item.clip.total_frames},
            )
        if not isinstance(item, VideoInput):
            raise InvalidRequest(f"model {self.metadata.name!r} takes video frames or a video file")
        pixels = self._pixels(item.frames, self.resize)
        return {self.input_name: pixels}, False, {"frames": len(item.frames)}


class MultimodalPreprocessor(Preprocessor):
    """Image + texts through the model's processor (CLIP): one image row, one row per text."""

    kind = ProcessorKind.MULTIMODAL_PROCESSOR

    def __init__(self, metadata: ModelMetadata, processor: Any) -> None:
        super().__init__(metadata)
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self._pixels = functools.partial(image_pixels, processor.image_processor)
        self.resize = _resize_to_graph(self._pixels, metadata.image_size)
        buckets = metadata.sequence_lengths
        if not buckets:
            raise MetadataError(f"{metadata.onnx_path}: a multimodal model needs a sequence dim")
        self.buckets = buckets
        self.pad_values = sequence_pad_values(metadata, self.tokenizer)

    def _encode(self, item: ModelInput) -> tuple[dict[str, np.ndarray], bool, dict[str, Any]]:
        if not isinstance(item, MultimodalInput):
            raise InvalidRequest(f"model {self.metadata.name!r} takes an image with texts")
        texts = item.texts()
        arrays, truncated = encode_text(self.tokenizer, [(t, None) for t in texts], self.buckets)
        arrays["pixel_values"] = self._pixels(item.image, self.resize)
        labels = list(item.candidate_labels) if item.candidate_labels else [item.text]
        return arrays, truncated, {"candidate_labels": labels}


# --- the factory --------------------------------------------------------------------------


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
