"""Live parity for files: the worker given an MP3 or an MP4 vs transformers.pipeline on PyTorch.

The references are independent of the worker's decoding: for audio, transformers' audio-classification
pipeline gets the MP3 decoded by the test (PyAV, read here) and resampled by scipy (not soxr); for
video, transformers' own VideoClassificationPipeline opens the MP4 file itself with PyAV and samples it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch  # noqa: F401 - the torch job fails, not skips, without it

from models import tiny
from tests.media_files import encode_audio, mp4_clip
from tests.references import TINY, assert_pipeline_equal
from tests.test_media import resampled_independently
from worker import pipeline

pytestmark = pytest.mark.torch

#: The issue's bar for decoded files: same labels in the same order, scores within 1e-3.
FILE_TOLERANCE = 1e-3


@pytest.mark.parametrize("name", ["wav2vec2", "whisper-encoder"])
def test_a_44k_stereo_mp3_matches_the_live_audio_pipeline(name: str) -> None:
    mp3 = encode_audio("mp3", 44_100, 2)
    live = tiny.live_pipeline("audio-classification", TINY / name)
    reference = {"raw": resampled_independently(mp3, 16_000), "sampling_rate": 16_000}
    expected = tiny.plain(live(reference, top_k=None))
    worst = assert_pipeline_equal(pipeline(model=TINY / name)(mp3, top_k=None), expected, FILE_TOLERANCE)
    print(f"{name}: worst score difference {worst:.2e}")


def test_an_mp4_matches_the_live_video_pipeline(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    path.write_bytes(mp4_clip())
    live = tiny.live_pipeline("video-classification", TINY / "videomae")
    expected = tiny.plain(live(str(path), top_k=3))
    worst = assert_pipeline_equal(pipeline(model=TINY / "videomae")(path, top_k=3), expected, FILE_TOLERANCE)
    print(f"videomae: worst score difference {worst:.2e}")
