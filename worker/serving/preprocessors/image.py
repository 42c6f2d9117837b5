"""Pictures: the image processor at the graph's H×W, alone (vision) or with texts (CLIP)."""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from worker.errors import InvalidRequest
from worker.serving.inputs import (
    ImageInput,
    ModelInput,
    MultimodalInput,
)
from worker.serving.metadata import MetadataError, ModelMetadata, ProcessorKind
from worker.serving.preprocessors.base import Preprocessor
from worker.serving.tokenizing import (
    encode_text,
    sequence_pad_values,
)


def rgb(image: Image.Image) -> Image.Image:
    """The image in RGB (converted where it is not)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def image_pixels(image_processor: Any, image: Image.Image, extra: Mapping[str, Any]) -> np.ndarray:
    """One image through an image processor: its ``pixel_values``, one row."""
    features = image_processor(images=[rgb(image)], return_tensors="np", **extra)
    return np.asarray(features["pixel_values"])


def resize_to_graph(run: Any, image_size: tuple[int, int] | None) -> dict[str, Any]:
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
        self.resize = resize_to_graph(self._pixels, metadata.image_size)

    def _encode(self, item: ModelInput) -> tuple[dict[str, np.ndarray], bool, dict[str, Any]]:
        if not isinstance(item, ImageInput):
            raise InvalidRequest(f"model {self.metadata.name!r} takes an image")
        return {"pixel_values": self._pixels(item.image, self.resize)}, False, {}


class MultimodalPreprocessor(Preprocessor):
    """Image + texts through the model's processor (CLIP): one image row, one row per text."""

    kind = ProcessorKind.MULTIMODAL_PROCESSOR

    def __init__(self, metadata: ModelMetadata, processor: Any) -> None:
        super().__init__(metadata)
        self.tokenizer = processor.tokenizer
        #: a fast tokenizer keeps its truncation setting in itself, set by each call: one call at a time
        self.tokenizing = threading.Lock()
        self.image_processor = processor.image_processor
        self._pixels = functools.partial(image_pixels, processor.image_processor)
        self.resize = resize_to_graph(self._pixels, metadata.image_size)
        buckets = metadata.sequence_lengths
        if not buckets:
            raise MetadataError(f"{metadata.onnx_path}: a multimodal model needs a sequence dim")
        self.buckets = buckets
        self.pad_values = sequence_pad_values(metadata, self.tokenizer)

    def _encode(self, item: ModelInput) -> tuple[dict[str, np.ndarray], bool, dict[str, Any]]:
        if not isinstance(item, MultimodalInput):
            raise InvalidRequest(f"model {self.metadata.name!r} takes an image with texts")
        texts = item.texts()
        with self.tokenizing:
            arrays, truncated = encode_text(self.tokenizer, [(t, None) for t in texts], self.buckets)
        arrays["pixel_values"] = self._pixels(item.image, self.resize)
        labels = list(item.candidate_labels) if item.candidate_labels else [item.text]
        return arrays, truncated, {"candidate_labels": labels}
