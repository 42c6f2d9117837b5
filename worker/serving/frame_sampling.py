"""Which frames of a clip a model sees: the transformers pipelines' and video processors' index rules."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from worker.errors import InvalidRequest


def pipeline_indices(num_frames: int, frame_sampling_rate: int = 1) -> list[int]:
    """Frames transformers' video-classification pipeline reads when the model has an image processor.

    ``np.linspace(0, num_frames * frame_sampling_rate - 1, num=num_frames, dtype=np.int64)``, as in
    ``VideoClassificationPipeline.preprocess`` (transformers 4.57-5.x): the clip's first frames.
    """
    end = num_frames * frame_sampling_rate - 1
    return [int(i) for i in np.linspace(0, end, num=num_frames, dtype=np.int64)]


def uniform_indices(total_frames: int, num_frames: int) -> list[int]:
    """Frames a transformers video processor samples: ``arange(n) * total // n`` (``default_sample_indices_fn``).

    transformers refuses a clip with fewer frames than the model takes; here those repeat their last one.
    """
    if total_frames < num_frames:
        return list(range(total_frames)) + [total_frames - 1] * (num_frames - total_frames)
    return [int(i) for i in np.arange(num_frames, dtype=np.int64) * total_frames // num_frames]


def sample_frames(frames: Sequence[Image.Image], count: int) -> list[Image.Image]:
    """Exactly ``count`` frames: evenly spaced when there are more, last repeated when fewer."""
    if not frames:
        raise InvalidRequest("a video needs at least one frame")
    if len(frames) >= count:
        picks = np.linspace(0, len(frames) - 1, num=count).round().astype(int)
        return [frames[i] for i in picks]
    return list(frames) + [frames[-1]] * (count - len(frames))
