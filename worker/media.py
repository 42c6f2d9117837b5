"""Audio and video files -> samples and frames, with PyAV (FFmpeg inside its wheels), under the limits.

Every container is opened from memory with a short list of demuxers: FFmpeg's playlist and
concat demuxers (HLS, ``ffconcat``) would otherwise open further files or URLs named in a message.
What a video container declares (duration, frame count, frame size) is checked before decoding;
audio samples and video frames are counted as they are decoded, since a header can lie.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import av
import av.error
import numpy as np
import soxr
from PIL import Image

from worker.errors import InvalidRequest, PayloadTooLarge, UndecodableInput

#: Demuxers for audio files: WAV/W64, FLAC, MP3, Ogg (Vorbis, Opus), MP4/M4A/MOV, Matroska/WebM, ADTS AAC, AIFF, CAF, AMR, AU.
AUDIO_FORMATS = "wav,w64,flac,mp3,ogg,mov,mp4,m4a,matroska,webm,aac,aiff,caf,amr,au"
#: Demuxers for video files: MP4/MOV, Matroska/WebM, AVI, MPEG-TS, Ogg, FLV.
VIDEO_FORMATS = "mov,mp4,m4a,matroska,webm,avi,mpegts,ogg,flv"


@dataclass(frozen=True)
class AVLimits:
    """The bounds this module enforces; ``MediaLimits.av`` fills them."""

    max_audio_seconds: float
    max_video_seconds: float
    max_video_frames_decoded: int
    max_video_pixels: int


def _open(raw: bytes, what: str, formats: str) -> av.container.InputContainer:
    try:
        return av.open(io.BytesIO(raw), mode="r", options={"format_whitelist": formats})
    except av.error.FFmpegError as exc:
        raise UndecodableInput(f"{what}: the container is not a readable {what} format ({exc})") from exc


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
        if stream.codec_context is None:
            raise UndecodableInput("audio: the stream's codec is not one this FFmpeg build decodes")
        if not stream.rate or stream.rate <= 0:
            raise UndecodableInput(f"audio: the {_codec_name(stream)!r} stream has no sampling rate")
        # No check of the declared duration: MP3 and ADTS files without an index only estimate it from
        # the bitrate. Decoding stops as soon as the samples pass the limit, so the cost stays bounded.
        chunks, rate = _decode_audio_stream(container, stream, limits)
    if not chunks:
        raise UndecodableInput("audio: the stream holds no decodable samples")
    return np.concatenate(chunks).astype(np.float32, copy=False), rate


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


@dataclass(frozen=True)
class Clip:
    """A video file whose container passed the limits; frames are decoded on demand.

    The processor picks which frames it needs (that depends on the model), so only those are
    kept in memory, and decoding stops after the last one.
    """

    data: bytes
    total_frames: int
    fps: float | None
    width: int
    height: int
    limits: AVLimits

    def frames(self, indices: Sequence[int]) -> list[Image.Image]:
        """The frames at ``indices`` (in order) as RGB images; past the clip's end, its last frame."""
        if not indices:
            return []
        wanted, stop = set(indices), max(indices)
        picked: dict[int, Image.Image] = {}
        last: av.VideoFrame | None = None
        last_index = -1
        with _open(self.data, "video", VIDEO_FORMATS) as container:
            stream = container.streams.video[0]
            try:
                for index, frame in enumerate(container.decode(stream)):
                    if index >= self.limits.max_video_frames_decoded:
                        raise PayloadTooLarge(
                            f"video decodes to more than {self.limits.max_video_frames_decoded} frames"
                        )
                    if frame.width * frame.height > self.limits.max_video_pixels:
                        raise PayloadTooLarge(
                            f"video frame is {frame.width}x{frame.height} pixels; "
                            f"the limit is {self.limits.max_video_pixels}"
                        )
                    last, last_index = frame, index
                    if index in wanted:
                        picked[index] = _rgb(frame)
                    if index >= stop:
                        break
            except av.error.FFmpegError as exc:
                raise UndecodableInput(
                    f"video: the {_codec_name(stream)!r} stream is corrupt ({exc})"
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
    with _open(raw, "video", VIDEO_FORMATS) as container:
        if not container.streams.video:
            raise UndecodableInput("video: the file has no video stream")
        stream = container.streams.video[0]
        context = stream.codec_context
        if context is None:
            raise UndecodableInput("video: the stream's codec is not one this FFmpeg build decodes")
        width, height = int(context.width), int(context.height)
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
