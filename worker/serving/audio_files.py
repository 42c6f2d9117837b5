"""Audio files -> mono float32 samples at their own rate, counted as decoded; resampling with soxr."""

from __future__ import annotations

from collections.abc import Iterator

import av
import av.error
import numpy as np
import soxr

from schemas.limits import MAX_SAMPLING_RATE, MIN_SAMPLING_RATE
from worker.errors import PayloadTooLarge, UndecodableInput
from worker.serving.media import AUDIO_CODECS, AUDIO_FORMATS, codec_context, codec_name, open_container
from worker.serving.media_limits import AVLimits


def decode_audio(raw: bytes, limits: AVLimits) -> tuple[np.ndarray, int]:
    """Any audio file FFmpeg reads -> mono float32 samples at the file's own rate, and that rate.

    Channels are averaged, as the worker always did for WAV files; resampling to the model's
    rate is the processor's job (``resample``), since only it knows the rate.
    """
    with open_container(raw, "audio", AUDIO_FORMATS) as container:
        if not container.streams.audio:
            raise UndecodableInput("audio: the file has no audio stream")
        stream = container.streams.audio[0]
        codec_context(stream, "audio", AUDIO_CODECS)
        if not stream.rate or stream.rate <= 0:
            raise UndecodableInput(f"audio: the {codec_name(stream)!r} stream has no sampling rate")
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
        raise UndecodableInput(f"audio: the {codec_name(stream)!r} stream is corrupt ({exc})") from exc
    except ValueError as exc:  # PyAV's resampler refuses a frame whose rate, layout or format changed
        raise UndecodableInput(
            f"audio: the {codec_name(stream)!r} stream changes format mid-stream ({exc})"
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
