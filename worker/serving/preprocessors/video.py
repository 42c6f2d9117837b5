"""Video: frames sampled as the model's pipeline samples them, through its video or image processor."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from worker.errors import InvalidRequest
from worker.serving.frame_sampling import pipeline_indices, sample_frames, uniform_indices
from worker.serving.inputs import (
    ModelInput,
    VideoFileInput,
    VideoInput,
)
from worker.serving.metadata import MetadataError, ModelMetadata, ProcessorKind
from worker.serving.preprocessors.base import Preprocessor
from worker.serving.preprocessors.image import resize_to_graph, rgb
from worker.serving.video_files import Clip


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
        self.resize = resize_to_graph(lambda image, extra: self._pixels([image], extra), metadata.image_size)
        # A video processor samples evenly over the whole clip; with an image processor (VideoMAE and kin)
        # transformers' video-classification pipeline reads the clip's first frames instead.
        self.samples_whole_clip = (metadata.folder / "video_preprocessor_config.json").is_file()

    def clip_indices(self, clip: Clip) -> list[int]:
        """Which frames of a video file this model's transformers preprocessing would take."""
        if self.samples_whole_clip:
            return uniform_indices(clip.total_frames, self.frames)
        return pipeline_indices(self.frames)

    def _pixels(self, frames: Sequence[Image.Image], extra: Mapping[str, Any]) -> np.ndarray:
        clip = [rgb(frame) for frame in sample_frames(frames, self.frames)]
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
