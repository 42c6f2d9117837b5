"""Video files: the container probed against the limits, then only the frames a model needs decoded."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import av
import av.error
from PIL import Image

from worker.errors import PayloadTooLarge, UndecodableInput
from worker.serving.media import (
    VIDEO_CODECS,
    VIDEO_FORMATS,
    codec_context,
    codec_name,
    declared_seconds,
    open_container,
)
from worker.serving.media_limits import AVLimits

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
    with open_container(data, "video", VIDEO_FORMATS, limits.max_video_pixels) as container:
        stream = container.streams.video[0]
        # FFmpeg refuses a frame over max_pixels before allocating it: a later frame can be
        # larger than the header said (PNG, MJPEG and others change size per frame).
        codec_context(stream, "video", VIDEO_CODECS).options = {"max_pixels": str(limits.max_video_pixels)}
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
                f"video: the {codec_name(stream)!r} stream is corrupt or holds a frame over "
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
    with open_container(raw, "video", VIDEO_FORMATS, limits.max_video_pixels) as container:
        if not container.streams.video:
            raise UndecodableInput("video: the file has no video stream")
        stream = container.streams.video[0]
        codec_context(stream, "video", VIDEO_CODECS)
        width, height = int(stream.codec_context.width), int(stream.codec_context.height)
        if width * height > limits.max_video_pixels:
            raise PayloadTooLarge(
                f"video is {width}x{height} pixels a frame; the limit is {limits.max_video_pixels}"
            )
        declared = declared_seconds(container, stream)
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
