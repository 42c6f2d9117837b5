"""The intake's settings: request preparation, the media limits and the decoder processes."""

from __future__ import annotations

from dataclasses import fields

from pydantic import BaseModel, Field

from worker.serving.media_limits import MediaLimits

#: The media limits' defaults (worker/serving/media_limits.py), written there once.
_MEDIA = MediaLimits()


class IntakeAndMedia(BaseModel):
    """How requests are prepared: message size, media limits, decoding in limited processes."""

    intake_concurrency: int = Field(
        4,
        ge=1,
        description="Requests prepared (parsed, decoded, preprocessed) at once, each on its own intake "
        "thread, apart from the inference threads: a slow one holds one thread, the others keep flowing. "
        "Fetching waits while every thread is busy.",
    )
    prepare_timeout_s: float = Field(
        10.0,
        gt=0,
        description="How long one request's preparation may take before it is answered payload_too_large "
        "(its thread stays taken until the work ends; the decoders' own limits bound that).",
    )
    max_message_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest request message accepted (payload_too_large above)."
    )
    max_text_chars: int = Field(
        _MEDIA.max_text_chars, ge=1, description="Longest text accepted, in characters."
    )
    max_image_pixels: int = Field(
        _MEDIA.max_image_pixels,
        ge=1,
        description="Largest image accepted (width x height), checked before decoding.",
    )
    max_audio_seconds: float = Field(
        _MEDIA.max_audio_seconds, gt=0, description="Longest audio accepted, in seconds."
    )
    max_video_frames: int = Field(
        _MEDIA.max_video_frames, ge=1, description="Most video frames accepted in one request."
    )
    max_video_seconds: float = Field(
        _MEDIA.max_video_seconds, gt=0, description="Longest video file accepted, in seconds."
    )
    max_video_frames_decoded: int = Field(
        _MEDIA.max_video_frames_decoded,
        ge=1,
        description="Most frames one video file may hold (checked before decoding where the container says).",
    )
    max_video_pixels: int = Field(
        _MEDIA.max_video_pixels,
        ge=1,
        description="Largest video frame accepted (width x height), checked before decoding.",
    )
    max_jpeg_scans: int = Field(
        _MEDIA.max_jpeg_scans,
        ge=1,
        description="Most scans one JPEG may hold, counted in its bytes before decoding: each scan is a "
        "pass over the whole image (about 5.6 ms of CPU at 4096x4096; Pillow and libjpeg write about 10).",
    )
    decode_isolation: bool = Field(
        True,
        description="Decode image, audio and video files in decoder processes, each decode under "
        "decode_cpu_seconds and decode_memory_mib; a breach kills only that process. Off: in the "
        "worker's own executor, bounded by the media limits alone.",
    )
    decoder_processes: int = Field(
        2, ge=1, description="Decoder processes (decode_isolation); each holds about 110 MiB."
    )
    decode_cpu_seconds: float = Field(
        10.0,
        gt=0,
        description="CPU time one decode may use in a decoder process (RLIMIT_CPU); one that has not "
        "answered within three times this of wall time is stopped too. Over: payload_too_large. Decoding "
        "all 1,800 frames of a 1080p H.264 clip takes about 3.6 s.",
    )
    decode_memory_mib: int = Field(
        768,
        ge=64,
        description="Address space one decode may add to its decoder process's idle size (RLIMIT_AS). "
        "Over: payload_too_large or undecodable_input.",
    )

    def media_limits(self) -> MediaLimits:
        """The media limits these settings set (every field of ``MediaLimits`` is a setting of that name)."""
        return MediaLimits(**{f.name: getattr(self, f.name) for f in fields(MediaLimits)})
