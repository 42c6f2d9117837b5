"""Audio and video files -> samples and frames, with PyAV (FFmpeg inside its wheels), under the limits.

Every container is opened from memory with a short list of demuxers: FFmpeg's playlist and
concat demuxers (HLS, ``ffconcat``) would otherwise open further files or URLs named in a message.
Only the codecs the README names are decoded (``AUDIO_CODECS``, ``VIDEO_CODECS``): the demuxers
above reach some 550 FFmpeg decoders through codec tags otherwise. What a container declares
(duration, frame count, frame size, sampling rate) is checked before decoding; FFmpeg's own
``max_pixels`` refuses a larger frame before its buffer is allocated, in stream probing as in
decoding; audio samples and video frames are counted as they are decoded, since a header can lie.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import av
import av.error
import numpy as np
import soxr
from PIL import Image

from schemas.limits import MAX_SAMPLING_RATE, MIN_SAMPLING_RATE
from worker.errors import InvalidRequest, PayloadTooLarge, UndecodableInput

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


@dataclass(frozen=True)
class AVLimits:
    """The bounds this module enforces; ``MediaLimits.av`` fills them."""

    max_audio_seconds: float
    max_video_seconds: float
    max_video_frames_decoded: int
    max_video_pixels: int


def _open(raw: bytes, what: str, formats: str, max_pixels: int | None = None) -> av.container.InputContainer:
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


def _decoder(stream: av.stream.Stream, what: str, allowed: frozenset[str]) -> av.codec.context.CodecContext:
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


def _declared_seconds(container: av.container.InputContainer, stream: av.stream.Stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _codec_name(stream: av.stream.Stream) -> str:
    context = stream.codec_context
    return context.name if context is not None else "unknown"


# --- audio ---------------------------------------------------------------------------------


def decode_audio(raw: bytes, limits: AVLimits) -> tuple[np.ndarray, int]:
    """Any audio file FFmpeg reads -> mono float32 samples at the file's own rate, and that rate.

    Channels are averaged, as the worker always did for WAV files; resampling to the model's
    rate is the processor's job (``resample``), since only it knows the rate.
    """
    with _open(raw, "audio", AUDIO_FORMATS) as container:
        if not container.streams.audio:
            raise UndecodableInput("audio: the file has no audio stream")
        stream = container.streams.audio[0]
        _decoder(stream, "audio", AUDIO_CODECS)
        if not stream.rate or stream.rate <= 0:
            raise UndecodableInput(f"audio: the {_codec_name(stream)!r} stream has no sampling rate")
        _check_rate(int(stream.rate))
        # No check of the declared duration: MP3 and ADTS files without an index only estimate it from
        # the bitrate. Decoding stops as soon as the samples pass the limit, so the cost stays bounded.
        chunks, rate = _decode_audio_stream(container, stream, limits)
    if not chunks:
        raise UndecodableInput("audio: the stream holds no decodable samples")
    return np.concatenate(chunks).astype(np.float32, copy=False), rate


def _check_rate(rate: int) -> None:
    # The rate divides the decoded samples into seconds: a header claiming 2 GHz would make 300 s of
    # audio look like 7 ms. Refused like a raw array's rate outside the same range (schemas.limits).
    if not MIN_SAMPLING_RATE <= rate <= MAX_SAMPLING_RATE:
        raise PayloadTooLarge(
            f"audio: the sampling rate is {rate} Hz; accepted: {MIN_SAMPLING_RATE} to {MAX_SAMPLING_RATE} Hz"
        )


def _decode_audio_stream(
    container: av.container.InputContainer, stream: av.audio.stream.AudioStream, limits: AVLimits
) -> tuple[list[np.ndarray], int]:
    # Planar float keeps every codec's own rate and channels: one row per channel.
    converter = av.AudioResampler(format="fltp")
    chunks: list[np.ndarray] = []
    rate = int(stream.rate)
    samples = 0
    try:
        for frame in _audio_frames(container, stream, converter):
            rate = int(frame.sample_rate)
            _check_rate(rate)
            planes = frame.to_ndarray()
            chunks.append(planes.mean(axis=0, dtype=np.float32))
            samples += planes.shape[1]
            # Counted as decoded: a header that under-states the duration stops here, not in memory.
            if samples / rate > limits.max_audio_seconds:
                raise PayloadTooLarge(
                    f"audio is more than {limits.max_audio_seconds:g} s; the limit is {limits.max_audio_seconds:g} s"
                )
    except av.error.FFmpegError as exc:
        raise UndecodableInput(f"audio: the {_codec_name(stream)!r} stream is corrupt ({exc})") from exc
    except ValueError as exc:  # PyAV's resampler refuses a frame whose rate, layout or format changed
        raise UndecodableInput(
            f"audio: the {_codec_name(stream)!r} stream changes format mid-stream ({exc})"
        ) from exc
    return chunks, rate


def _audio_frames(
    container: av.container.InputContainer,
    stream: av.audio.stream.AudioStream,
    converter: av.AudioResampler,
) -> Iterator[av.AudioFrame]:
    for frame in container.decode(stream):
        yield from converter.resample(frame)
    yield from converter.resample(None)


def resample(array: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Mono float32 samples from ``rate`` to ``target`` Hz (soxr, its default high quality)."""
    if rate == target:
        return array
    return np.asarray(soxr.resample(array.astype(np.float32, copy=False), rate, target), dtype=np.float32)


# --- video ---------------------------------------------------------------------------------


#: Decodes a clip's frames at the given indices: ``read_frames`` here, or a decoder process's.
FrameReader = Callable[[bytes, Sequence[int]], list[Image.Image]]


@dataclass(frozen=True)
class Clip:
    """A video file whose container passed the limits; frames are decoded on demand.

    The processor picks which frames it needs (that depends on the model), so only those are
    kept in memory, and decoding stops after the last one. ``reader`` decodes them elsewhere
    (worker/serving/sandbox.py); without one, ``read_frames`` here.
    """

    data: bytes
    total_frames: int
    fps: float | None
    width: int
    height: int
    limits: AVLimits
    reader: FrameReader | None = field(default=None, compare=False, repr=False)

    def frames(self, indices: Sequence[int]) -> list[Image.Image]:
        """The frames at ``indices`` (in order) as RGB images; past the clip's end, its last frame."""
        if self.reader is not None:
            return self.reader(self.data, indices)
        return read_frames(self.data, indices, self.limits)


def read_frames(data: bytes, indices: Sequence[int], limits: AVLimits) -> list[Image.Image]:
    """A clip's frames at ``indices`` (in order) as RGB images, decoded here; past its end, its last frame."""
    if not indices:
        return []
    wanted, stop = set(indices), max(indices)
    picked: dict[int, Image.Image] = {}
    last: av.VideoFrame | None = None
    last_index = -1
    with _open(data, "video", VIDEO_FORMATS, limits.max_video_pixels) as container:
        stream = container.streams.video[0]
        # FFmpeg refuses a frame over max_pixels before allocating it: a later frame can be
        # larger than the header said (PNG, MJPEG and others change size per frame).
        _decoder(stream, "video", VIDEO_CODECS).options = {"max_pixels": str(limits.max_video_pixels)}
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index >= limits.max_video_frames_decoded:
                    raise PayloadTooLarge(
                        f"video decodes to more than {limits.max_video_frames_decoded} frames"
                    )
                if frame.width * frame.height > limits.max_video_pixels:
                    raise PayloadTooLarge(
                        f"video frame is {frame.width}x{frame.height} pixels; "
                        f"the limit is {limits.max_video_pixels}"
                    )
                last, last_index = frame, index
                if index in wanted:
                    picked[index] = _rgb(frame)
                if index >= stop:
                    break
        except av.error.FFmpegError as exc:
            raise UndecodableInput(
                f"video: the {_codec_name(stream)!r} stream is corrupt or holds a frame over "
                f"{limits.max_video_pixels} pixels ({exc})"
            ) from exc
    if last is None:
        raise UndecodableInput("video: the stream holds no decodable frames")
    tail = picked[last_index] if last_index in picked else _rgb(last)
    return [picked.get(i, tail) for i in indices]


def _rgb(frame: av.VideoFrame) -> Image.Image:
    """A decoded frame as an RGB image (rgb24 through swscale, as transformers' ``read_video_pyav``)."""
    image: Image.Image = frame.to_image()  # type: ignore[no-untyped-call]
    return image


def probe_video(raw: bytes, limits: AVLimits) -> Clip:
    """Open a video file and check what its container says against the limits, decoding nothing."""
    with _open(raw, "video", VIDEO_FORMATS, limits.max_video_pixels) as container:
        if not container.streams.video:
            raise UndecodableInput("video: the file has no video stream")
        stream = container.streams.video[0]
        _decoder(stream, "video", VIDEO_CODECS)
        width, height = int(stream.codec_context.width), int(stream.codec_context.height)
        if width * height > limits.max_video_pixels:
            raise PayloadTooLarge(
                f"video is {width}x{height} pixels a frame; the limit is {limits.max_video_pixels}"
            )
        declared = _declared_seconds(container, stream)
        if declared is not None and declared > limits.max_video_seconds:
            raise PayloadTooLarge(f"video is {declared:.1f} s; the limit is {limits.max_video_seconds:g} s")
        if stream.frames > limits.max_video_frames_decoded:
            raise PayloadTooLarge(
                f"video has {stream.frames} frames; the limit is {limits.max_video_frames_decoded}"
            )
        total = _count_frames(container, stream, limits)
        fps = float(stream.average_rate) if stream.average_rate else None
    if total == 0:
        raise UndecodableInput("video: the stream holds no frames")
    return Clip(raw, total, fps, width, height, limits)


def _count_frames(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, limits: AVLimits
) -> int:
    """Frames in the stream, from its packets (demuxing only: WebM and MKV headers do not say)."""
    count = 0
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the flush packet demux() ends with
                continue
            count += 1
            if count > limits.max_video_frames_decoded:
                raise PayloadTooLarge(f"video has more than {limits.max_video_frames_decoded} frames")
    except av.error.FFmpegError as exc:
        raise UndecodableInput(f"video: the container is corrupt ({exc})") from exc
    return count


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
