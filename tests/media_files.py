"""Media the tests make themselves: tones in audio formats, short clips, images in each Pillow mode.

Encoded with PyAV and Pillow in memory (milliseconds each), so no binary fixture is committed
and every expected value (a 440 Hz tone, frame i painted grey level 4*i) is known by construction.
"""

from __future__ import annotations

import io
import struct
import zlib
from fractions import Fraction

import av
import numpy as np
from PIL import Image

TONE_HZ = 440.0
TONE_AMPLITUDE = 0.5
CLIP_FPS = 30
CLIP_SIZE = (64, 48)  # width, height: not the model's 32x32, so resizing is exercised

#: (name, container format, encoder) for each audio format the issue names.
AUDIO_FORMATS = {
    "wav": ("wav", "pcm_s16le"),
    "flac": ("flac", "flac"),
    "mp3": ("mp3", "libmp3lame"),
    "ogg-vorbis": ("ogg", "vorbis"),
    "opus": ("ogg", "libopus"),
    "m4a-aac": ("ipod", "aac"),
    "webm-opus": ("webm", "libopus"),
}
#: Encoders that need an option to run at all: FFmpeg's own Vorbis encoder is marked experimental.
_ENCODER_OPTIONS = {"vorbis": {"strict": "experimental"}}


def tone(rate: int, channels: int = 1, seconds: float = 1.0) -> np.ndarray:
    """A 440 Hz sine of amplitude 0.5, one row per channel (float32)."""
    t = np.arange(round(rate * seconds)) / rate
    wave = (TONE_AMPLITUDE * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)
    return np.tile(wave, (channels, 1))


def encode_audio(name: str, rate: int, channels: int, seconds: float = 1.0) -> bytes:
    """The tone as a file in format ``name`` (a key of AUDIO_FORMATS)."""
    container_format, codec = AUDIO_FORMATS[name]
    layout = "stereo" if channels == 2 else "mono"
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        stream.codec_context.options = _ENCODER_OPTIONS.get(codec, {})
        frame = av.AudioFrame.from_ndarray(tone(rate, channels, seconds), format="fltp", layout=layout)
        frame.sample_rate, frame.pts = rate, 0
        for packet in stream.encode(frame):  # PyAV converts to the encoder's format and frame size
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


def frame_pixels(index: int, size: tuple[int, int] = CLIP_SIZE) -> np.ndarray:
    """Frame ``index`` of a test clip: a flat grey of level 4*index, so a decoded frame tells its index."""
    width, height = size
    return np.full((height, width, 3), 4 * index, dtype=np.uint8)


def encode_clip(
    container_format: str, codec: str, frames: int = 2 * CLIP_FPS, size: tuple[int, int] = CLIP_SIZE
) -> bytes:
    """A clip of ``frames`` frames at 30 fps (2 s by default), frame i painted grey level 4*i."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=CLIP_FPS)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_pixels(index, size), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


def mp4_clip(frames: int = 2 * CLIP_FPS, size: tuple[int, int] = CLIP_SIZE) -> bytes:
    """A 2 s MP4/H.264 clip."""
    return encode_clip("mp4", "libx264", frames, size)


def webm_clip(frames: int = 2 * CLIP_FPS) -> bytes:
    """A 2 s WebM/VP9 clip."""
    return encode_clip("webm", "libvpx-vp9", frames)


def frames_read_directly(data: bytes, count: int) -> list[np.ndarray]:
    """The first ``count`` frames as RGB arrays, read with PyAV here rather than by the worker's code."""
    with av.open(io.BytesIO(data)) as container:
        frames = []
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == count:
                break
    return frames


def audio_read_directly(data: bytes) -> tuple[np.ndarray, int]:
    """An audio file as channel-averaged float samples and rate, read with PyAV here, not by the worker."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        chunks = [frame.to_ndarray() for frame in container.decode(stream)]
        rate = int(stream.rate)
    # mp3float decodes to planar float: one row per channel.
    return np.concatenate(chunks, axis=1).mean(axis=0), rate


# --- hostile files: small messages that decode into something huge ----------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def zeros_zlib(size: int, block: int = 1 << 20) -> bytes:
    """A zlib stream of ``size`` zero bytes, built in milliseconds for gigabytes.

    One block compressed after a full flush gives the same bytes every time, so it is repeated;
    the Adler-32 of n zeros is a = 1, b = n mod 65521.
    """
    if size <= block:
        return zlib.compress(b"\x00" * size)
    compressor = zlib.compressobj(9)
    head = compressor.compress(b"\x00" * block) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(b"\x00" * block) + compressor.flush(zlib.Z_FULL_FLUSH)
    count, rest = divmod(size, block)
    body = (
        head + again * (count - 1) + compressor.compress(b"\x00" * rest) + compressor.flush(zlib.Z_SYNC_FLUSH)
    )
    return body + b"\x03\x00" + struct.pack(">I", ((size % 65521) << 16) | 1)  # final empty block, Adler-32


def black_png(width: int, height: int, depth: int = 8) -> bytes:
    """An RGB PNG of ``depth`` bits per channel, all black: under 1 MB for 12000x12000 at 16 bits (864 MB decoded)."""
    header = struct.pack(">IIBBBBB", width, height, depth, 2, 0, 0, 0)
    rows = zeros_zlib(height * (1 + width * 3 * depth // 8))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", rows)
        + _png_chunk(b"IEND", b"")
    )


def ico_holding(png: bytes) -> bytes:
    """An ICO whose one entry is ``png``; its directory holds one byte per side (0: 256 or more)."""
    width, height = struct.unpack_from(">II", png, 16)
    entry = struct.pack(
        "<BBBBHHII", width if width < 256 else 0, height if height < 256 else 0, 0, 0, 1, 32, len(png), 6 + 16
    )
    return struct.pack("<HHH", 0, 1, 1) + entry + png


def png_mov(pngs: list[bytes], size: tuple[int, int]) -> bytes:
    """A MOV of PNG frames (one a second) whose header declares ``size``; each frame may say otherwise."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mov") as container:
        stream = container.add_stream("png", rate=1)
        stream.width, stream.height = size
        stream.pix_fmt = "rgb48be"
        for index, data in enumerate(pngs):
            packet = av.Packet(data)
            packet.pts = packet.dts = index
            packet.time_base, packet.stream = Fraction(1, 1), stream
            container.mux(packet)
    return buffer.getvalue()


def progressive_jpeg(size: int, scans: int) -> bytes:
    """A progressive JPEG whose last scan is repeated ``scans`` times: libjpeg warns and decodes each again."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (90, 120, 200)).save(buffer, "JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    last = data.rindex(b"\xff\xda")
    return data[:-2] + data[last:-2] * scans + b"\xff\xd9"


def vorbis_claiming(seconds: int, claimed_rate: int, rate: int = 8000) -> bytes:
    """Stereo Vorbis in Matroska, ``seconds`` of a tone at ``rate``, its identification header saying ``claimed_rate``."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as container:
        stream = container.add_stream("vorbis", rate=rate, layout="stereo")
        stream.codec_context.options = _ENCODER_OPTIONS["vorbis"]
        wave = tone(rate, 2, seconds)
        for start in range(0, wave.shape[1], rate * 10):
            frame = av.AudioFrame.from_ndarray(
                wave[:, start : start + rate * 10].copy(), format="fltp", layout="stereo"
            )
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    data = bytearray(buffer.getvalue())
    rate_at = data.index(b"\x01vorbis") + 12  # after the packet type, "vorbis", version and channel count
    data[rate_at : rate_at + 4] = struct.pack("<I", claimed_rate)
    return bytes(data)


def _vp8_packets(size: tuple[int, int], frames: int) -> list[av.Packet]:
    encoder = av.CodecContext.create("libvpx", "w")
    encoder.width, encoder.height = size  # type: ignore[attr-defined]
    encoder.pix_fmt, encoder.time_base = "yuv420p", Fraction(1, CLIP_FPS)  # type: ignore[attr-defined]
    packets: list[av.Packet] = []
    for index in range(frames):
        frame = av.VideoFrame.from_ndarray(frame_pixels(index, size), format="rgb24").reformat(
            format="yuv420p"
        )
        frame.pts = index
        packets += encoder.encode(frame)  # type: ignore[attr-defined]
    return packets + encoder.encode(None)  # type: ignore[attr-defined]


def webm_growing(first: tuple[int, int], later: tuple[int, int], frames: int = 2) -> bytes:
    """A VP8 WebM whose header says ``first``; after ``frames`` frames a keyframe of size ``later`` follows."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="webm") as container:
        stream = container.add_stream("libvpx", rate=CLIP_FPS)
        stream.width, stream.height = first
        stream.pix_fmt = "yuv420p"
        for index, packet in enumerate(_vp8_packets(first, frames) + _vp8_packets(later, frames)):
            packet.stream, packet.pts, packet.dts = stream, index, index
            packet.time_base = Fraction(1, CLIP_FPS)
            container.mux(packet)
    return buffer.getvalue()
