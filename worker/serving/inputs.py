"""Decoded inputs: what the wire format becomes once validated and decoded, and what the engine takes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from worker.errors import InvalidRequest
from worker.serving.metadata import Bucket
from worker.serving.video_files import Clip

#: transformers' ZeroShotImageClassificationPipeline default, for a request that names no template.
DEFAULT_HYPOTHESIS_TEMPLATE = "This is a photo of {}."


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
    hypothesis_template: str = DEFAULT_HYPOTHESIS_TEMPLATE

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
