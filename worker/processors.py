"""Processor factory: metadata -> the right Hugging Face processor, emitting fixed shapes.

Each wrapper turns one decoded input into the graph's exact input names and dtypes at
one of the model's bucket shapes, and says whether it had to cut anything off. The
factory caches one wrapper per folder and resolved metadata (buckets, shapes, overrides);
every consumer in a process shares it.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from worker.errors import InvalidRequest, UndecodableInput
from worker.media import Clip, pipeline_indices, resample, uniform_indices
from worker.metadata import Bucket, MetadataError, ModelMetadata, ProcessorKind

# --- decoded inputs (what the wire format becomes once validated and decoded) -------------


@dataclass(frozen=True)
class TextInput:
    """A text, optionally paired (NLI, question answering)."""

    text: str
    text_pair: str | None = None


@dataclass(frozen=True)
class ImageInput:
    """One decoded image."""

    image: Image.Image


@dataclass(frozen=True)
class AudioInput:
    """A mono waveform in [-1, 1] and its sampling rate (resampled to the model's if they differ)."""

    array: np.ndarray
    sampling_rate: int


@dataclass(frozen=True)
class VideoInput:
    """A clip as a list of decoded frames."""

    frames: Sequence[Image.Image]


@dataclass(frozen=True)
class VideoFileInput:
    """A video file, checked but not decoded: the processor samples and decodes the frames it needs."""

    clip: Clip


@dataclass(frozen=True)
class MultimodalInput:
    """An image with candidate labels (zero-shot) or with one text (similarity)."""

    image: Image.Image
    candidate_labels: tuple[str, ...] | None = None
    text: str | None = None
    hypothesis_template: str = "This is a photo of {}."

    def texts(self) -> list[str]:
        """The texts the text tower sees, one row each."""
        if self.candidate_labels:
            return [self.hypothesis_template.format(label) for label in self.candidate_labels]
        if self.text is not None:
            return [self.text]
        raise InvalidRequest("a multimodal input needs 'candidate_labels' or 'text'")


@dataclass(frozen=True)
class TensorInput:
    """Raw named tensors (Open Inference Protocol); they bypass the processor."""

    tensors: Mapping[str, np.ndarray]


ModelInput = TextInput | ImageInput | AudioInput | VideoInput | VideoFileInput | MultimodalInput | TensorInput


@dataclass(frozen=True)
class Prepared:
    """One request ready for the engine.

    ``arrays`` maps graph input names to arrays whose axis 0 runs over this request's rows
    (one row, or one per candidate label); ``shape_key`` holds the non-batch bucket dims,
    and requests with equal keys can share a batch.
    """

    arrays: Mapping[str, np.ndarray]
    shape_key: Bucket
    truncated: bool = False
    context: Mapping[str, Any] = field(default_factory=dict)


#: Tasks whose heads map tokens back to characters, so the text processor records where each came from.
ALIGNED_TASKS = frozenset({"token-classification", "question-answering"})


@dataclass(frozen=True)
class TokenAlignment:
    """Per real token of one text row: what the token and answer-span heads need besides logits."""

    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    #: Character span of each token in its own text (the first text or the pair).
    offsets: tuple[tuple[int, int], ...]
    special: tuple[bool, ...]
    #: 0 for the first text, 1 for the pair, None for special tokens.
    sequence_ids: tuple[int | None, ...]
    word_ids: tuple[int | None, ...]
    unk_id: int | None
    cls_id: int | None
    #: The tokenizer's tokens -> text (joins word pieces, tidies spaces before punctuation).
    detokenize: Callable[[list[str]], str]


# --- the wrappers ------------------------------------------------------------------------


def _bucket_for(length: int, buckets: Sequence[int]) -> int:
    """Smallest bucket that holds ``length`` (callers cut to the largest first)."""
    return next(b for b in buckets if b >= length)


class Preprocessor(ABC):
    """Base wrapper: subclasses produce arrays, the base fits them to the graph."""

    kind: ClassVar[ProcessorKind]

    def __init__(self, metadata: ModelMetadata) -> None:
        self.metadata = metadata
        self.pad_values: Mapping[str, int] = {}
        """Per input, the value that lengthens its sequence axis so that a request can run in a longer
        bucket (masked out); empty when the model's requests never change bucket."""

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
            out[spec.name] = np.ascontiguousarray(array, dtype=spec.dtype)
        rows = {self._row_dim(name): a.shape[0] for name, a in out.items()}
        if any(n < 1 for n in rows.values()):
            raise InvalidRequest("an input has no rows")
        return Prepared(out, tuple(sorted(key.items())), truncated, context)

    def _row_dim(self, input_name: str) -> str:
        spec = self.metadata.input(input_name)
        dim = spec.shape[0] if spec is not None else None
        return dim if isinstance(dim, str) else "batch"

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
            context["alignment"] = self._alignment(encoding)
        return pad_to_bucket(self.tokenizer, encoding, self.buckets), truncated, context

    def _alignment(self, encoding: Any) -> TokenAlignment:
        """The row's token alignment; takes the offsets and special-token mask out of ``encoding``."""
        ids = [int(i) for i in encoding["input_ids"][0]]
        return TokenAlignment(
            ids=tuple(ids),
            tokens=tuple(self.tokenizer.convert_ids_to_tokens(ids)),
            offsets=tuple((int(start), int(end)) for start, end in encoding.pop("offset_mapping")[0]),
            special=tuple(bool(flag) for flag in encoding.pop("special_tokens_mask")[0]),
            sequence_ids=tuple(encoding.sequence_ids(0)),
            word_ids=tuple(encoding.word_ids(0)),
            unk_id=self.tokenizer.unk_token_id,
            cls_id=self.tokenizer.cls_token_id,
            detokenize=self.tokenizer.convert_tokens_to_string,
        )


def prompt_length(tokenizer: Any, prompt: str) -> int:
    """Tokens a prompt takes at the start of a text, its leading special token included and a trailing
    one (SEP, EOS) not: how sentence-transformers measures it to leave the prompt out of pooling."""
    ids = list(tokenizer(prompt)["input_ids"])
    special = set(getattr(tokenizer, "all_special_ids", ()))
    return len(ids) - 1 if ids and ids[-1] in special else len(ids)


def sequence_pad_values(metadata: ModelMetadata, tokenizer: Any) -> dict[str, int]:
    """How the tokenizer pads each token input, when the attention mask hides padding from the model.

    Empty (requests keep their own bucket) without an ``attention_mask`` input, or when another
    input runs along the sequence too (its padding value is unknown).
    """
    if metadata.input("attention_mask") is None:
        return {}
    known = {
        "input_ids": int(tokenizer.pad_token_id or 0),
        "attention_mask": 0,
        "token_type_ids": int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
    }
    along = [spec.name for spec in metadata.inputs if any(d in metadata.sequence_dims for d in spec.shape)]
    if any(name not in known for name in along):
        return {}
    return {name: known[name] for name in along}


def tokenize_text(
    tokenizer: Any, texts: Sequence[tuple[str, str | None]], buckets: Sequence[int], **extra: Any
) -> tuple[Any, bool]:
    """Tokenize rows unpadded, cut at the largest bucket (flagged); ``extra`` goes to the tokenizer."""
    firsts = [t for t, _ in texts]
    pairs = [p for _, p in texts]
    with_pairs = any(p is not None for p in pairs)
    kwargs: dict[str, Any] = {"text_pair": [p or "" for p in pairs]} if with_pairs else {}
    encoding = tokenizer(firsts, truncation=False, verbose=False, **kwargs, **extra)
    truncated = max(len(ids) for ids in encoding["input_ids"]) > buckets[-1]
    if truncated:
        encoding = tokenizer(
            firsts, truncation=True, max_length=buckets[-1], verbose=False, **kwargs, **extra
        )
    return encoding, truncated


def pad_to_bucket(tokenizer: Any, encoding: Any, buckets: Sequence[int]) -> dict[str, np.ndarray]:
    """Pad every row to the smallest bucket that holds the longest one."""
    length = _bucket_for(max(len(ids) for ids in encoding["input_ids"]), buckets)
    padded = tokenizer.pad(encoding, padding="max_length", max_length=length, return_tensors="np")
    return {k: np.asarray(v) for k, v in padded.items()}


def encode_text(
    tokenizer: Any, texts: Sequence[tuple[str, str | None]], buckets: Sequence[int]
) -> tuple[dict[str, np.ndarray], bool]:
    """Tokenize rows, cut at the largest bucket (flagged), pad all to one bucket length."""
    encoding, truncated = tokenize_text(tokenizer, texts, buckets)
    return pad_to_bucket(tokenizer, encoding, buckets), truncated


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


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
        self.resize = _resize_to_graph(self._pixels, metadata.image_size)

    def _pixels(self, image: Image.Image, extra: Mapping[str, Any]) -> np.ndarray:
        features = self.image_processor(images=[_rgb(image)], return_tensors="np", **extra)
        return np.asarray(features["pixel_values"])

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
        length = _bucket_for(len(audio), buckets)
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


def sample_frames(frames: Sequence[Image.Image], count: int) -> list[Image.Image]:
    """Exactly ``count`` frames: evenly spaced when there are more, last repeated when fewer."""
    if not frames:
        raise InvalidRequest("a video needs at least one frame")
    if len(frames) >= count:
        picks = np.linspace(0, len(frames) - 1, num=count).round().astype(int)
        return [frames[i] for i in picks]
    return list(frames) + [frames[-1]] * (count - len(frames))


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

    def _pixels(self, image: Image.Image, extra: Mapping[str, Any]) -> np.ndarray:
        features = self.image_processor(images=[_rgb(image)], return_tensors="np", **extra)
        return np.asarray(features["pixel_values"])


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
