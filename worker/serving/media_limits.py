"""The bounds on decoded media, each default written once: the settings take theirs from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AVLimits:
    """The bounds the audio and video decoders enforce; ``MediaLimits.av`` fills them."""

    max_audio_seconds: float
    max_video_seconds: float
    max_video_frames_decoded: int
    max_video_pixels: int


@dataclass(frozen=True)
class MediaLimits:
    """Upper bounds for decoded media; exceeding one is a payload_too_large error."""

    max_image_pixels: int = 4096 * 4096
    max_audio_seconds: float = 60.0
    max_video_frames: int = 64
    max_text_chars: int = 100_000
    max_video_seconds: float = 60.0
    #: Frames in one video file (60 s at 30 fps); decoding stops after the last sampled one.
    max_video_frames_decoded: int = 1800
    max_video_pixels: int = 1920 * 1088
    #: Scans of one JPEG file: each costs a pass over the whole image (about 5.6 ms at 4096x4096).
    max_jpeg_scans: int = 64

    @property
    def av(self) -> AVLimits:
        """The bounds worker/serving/audio_files.py and video_files.py enforce on audio and video files."""
        return AVLimits(
            max_audio_seconds=self.max_audio_seconds,
            max_video_seconds=self.max_video_seconds,
            max_video_frames_decoded=self.max_video_frames_decoded,
            max_video_pixels=self.max_video_pixels,
        )
