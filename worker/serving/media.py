"""Audio and video containers opened safely with PyAV (FFmpeg inside its wheels), under the limits.

Decoding is worker/serving/audio_files.py and worker/serving/video_files.py. Every container is opened from memory with a short list of demuxers: FFmpeg's playlist and
concat demuxers (HLS, ``ffconcat``) would otherwise open further files or URLs named in a message.
Only the codecs the README names are decoded (``AUDIO_CODECS``, ``VIDEO_CODECS``): the demuxers
above reach some 550 FFmpeg decoders through codec tags otherwise. What a container declares
(duration, frame count, frame size, sampling rate) is checked before decoding; FFmpeg's own
``max_pixels`` refuses a larger frame before its buffer is allocated, in stream probing as in
decoding; audio samples and video frames are counted as they are decoded, since a header can lie.
"""

from __future__ import annotations

import io

import av
import av.error

from worker.errors import UndecodableInput

#: Demuxers for audio files: WAV/W64, FLAC, MP3, Ogg (Vorbis, Opus), MP4/M4A/MOV, Matroska/WebM, ADTS AAC, AIFF, CAF, AMR, AU.
AUDIO_FORMATS = "wav,w64,flac,mp3,ogg,mov,mp4,m4a,matroska,webm,aac,aiff,caf,amr,au"
#: Demuxers for video files: MP4/MOV, Matroska/WebM, AVI. Each declares its streams in its header, so
#: FFmpeg's probing runs their decoders under max_pixels (MPEG-TS and FLV find streams only by decoding).
VIDEO_FORMATS = "mov,mp4,m4a,matroska,webm,avi"
_PCM = ("s16", "s24", "s32", "f32", "f64")
#: Audio codecs decoded (FFmpeg's codec names): PCM in WAV/AIFF/AU/CAF, FLAC, MP3, Vorbis, Opus, AAC, ALAC, AMR.
AUDIO_CODECS = frozenset(
    {f"pcm_{kind}{order}" for kind in _PCM for order in ("le", "be")}
    | {"pcm_u8", "pcm_s8", "pcm_mulaw", "pcm_alaw"}
    | {"flac", "mp3", "vorbis", "opus", "aac", "alac", "amr_nb", "amr_wb"}
)
#: Video codecs decoded: H.264, H.265, VP8, VP9, AV1.
VIDEO_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1"})


def open_container(
    raw: bytes, what: str, formats: str, max_pixels: int | None = None
) -> av.container.InputContainer:
    """The container in ``raw``, opened from memory with only the demuxers ``formats`` names."""
    options = {"format_whitelist": formats}
    if max_pixels is not None:
        # Passed to the decoders FFmpeg's stream probing runs too: without it, av.open decodes a
        # 12000x12000 first frame (864 MB at 16 bits) before probe_video can read its size.
        options["max_pixels"] = str(max_pixels)
    try:
        # metadata_errors: a tag that is not UTF-8 would raise UnicodeDecodeError from av.open (fuzzing found it).
        return av.open(io.BytesIO(raw), mode="r", options=options, metadata_errors="replace")
    except av.error.FFmpegError as exc:
        raise UndecodableInput(f"{what}: the container is not a readable {what} format ({exc})") from exc


def codec_context(
    stream: av.stream.Stream, what: str, allowed: frozenset[str]
) -> av.codec.context.CodecContext:
    """The stream's codec context, if its codec is one the worker decodes."""
    context = stream.codec_context
    if context is None:
        raise UndecodableInput(f"{what}: the stream's codec is not one this FFmpeg build decodes")
    name = context.codec.canonical_name
    if name not in allowed:
        raise UndecodableInput(
            f"{what}: the {name!r} codec is not accepted; accepted: {', '.join(sorted(allowed))}"
        )
    return context


def declared_seconds(container: av.container.InputContainer, stream: av.stream.Stream) -> float | None:
    """The duration the stream (else the container) declares, if any."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def codec_name(stream: av.stream.Stream) -> str:
    """The stream's codec name, for messages."""
    context = stream.codec_context
    return context.name if context is not None else "unknown"
