"""Bytes -> images and waveforms, with every size bounded before anything is decompressed."""

from __future__ import annotations

import base64
import binascii
import io
import wave
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from worker.errors import PayloadTooLarge, UndecodableInput


@dataclass(frozen=True)
class MediaLimits:
    """Upper bounds for decoded media; exceeding one is a payload_too_large error."""

    max_image_pixels: int = 4096 * 4096
    max_audio_seconds: float = 60.0
    max_video_frames: int = 64


def b64decode(data: str, what: str) -> bytes:
    """Strict base64 (standard alphabet, data: URL prefix allowed)."""
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UndecodableInput(f"{what} is not valid base64") from exc


def decode_image(raw: bytes, limits: MediaLimits, what: str = "image") -> Image.Image:
    """PNG/JPEG/... bytes -> RGB image; the pixel count is checked from the header first."""
    try:
        image = Image.open(io.BytesIO(raw))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UndecodableInput(f"{what} is not a readable image") from exc
    width, height = image.size
    # Checked before load(): a decompression bomb is rejected without being inflated.
    if width * height > limits.max_image_pixels:
        raise PayloadTooLarge(f"{what} is {width}x{height} pixels; the limit is {limits.max_image_pixels}")
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UndecodableInput(f"{what} is truncated or corrupt") from exc
    return image.convert("RGB")


def decode_wav(raw: bytes, limits: MediaLimits) -> tuple[np.ndarray, int]:
    """PCM WAV bytes -> mono float32 waveform in [-1, 1] and its sampling rate."""
    try:
        with wave.open(io.BytesIO(raw)) as wav:
            channels, width, rate, frames = (
                wav.getnchannels(),
                wav.getsampwidth(),
                wav.getframerate(),
                wav.getnframes(),
            )
            if rate <= 0 or channels <= 0:
                raise UndecodableInput("audio has no sampling rate or channels")
            if frames / rate > limits.max_audio_seconds:
                raise PayloadTooLarge(
                    f"audio is {frames / rate:.1f} s; the limit is {limits.max_audio_seconds:g} s"
                )
            data = wav.readframes(frames)
    except (wave.Error, EOFError, OSError) as exc:
        raise UndecodableInput(f"audio is not a readable PCM WAV file ({exc})") from exc
    samples = _pcm_to_float(data, width)
    usable = len(samples) - len(samples) % channels
    return samples[:usable].reshape(-1, channels).mean(axis=1).astype(np.float32), rate


def _pcm_to_float(data: bytes, width: int) -> np.ndarray:
    if width == 1:
        return (np.frombuffer(data, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 2:
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    if width == 3:
        bytes3 = np.frombuffer(data[: len(data) - len(data) % 3], dtype=np.uint8).reshape(-1, 3)
        ints = (
            bytes3[:, 0].astype(np.int32)
            | bytes3[:, 1].astype(np.int32) << 8
            | bytes3[:, 2].astype(np.int32) << 16
        )
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)
        return ints.astype(np.float32) / float(1 << 23)
    if width == 4:
        return np.frombuffer(data, dtype="<i4").astype(np.float32) / float(1 << 31)
    raise UndecodableInput(f"audio sample width {width} bytes is not supported")


def check_waveform(array: np.ndarray, sampling_rate: int, limits: MediaLimits) -> np.ndarray:
    """A raw sample array from JSON: finite, 1-D, within the length limit."""
    if sampling_rate <= 0:
        raise UndecodableInput("sampling_rate must be positive")
    if array.ndim != 1 or array.size == 0:
        raise UndecodableInput("audio array must be a non-empty list of numbers")
    if array.size / sampling_rate > limits.max_audio_seconds:
        raise PayloadTooLarge(
            f"audio is {array.size / sampling_rate:.1f} s; the limit is {limits.max_audio_seconds:g} s"
        )
    if not np.all(np.isfinite(array)):
        raise UndecodableInput("audio array holds NaN or infinite values")
    return array.astype(np.float32)
