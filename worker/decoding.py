"""Validated requests -> decoded model inputs; every size is bounded before anything is inflated.

schemas/ has already checked structure, base64 and file signatures; this turns the bytes
into pixels, samples and arrays under the worker's limits (settings).
"""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from schemas import (
    AudioArrayInputs,
    AudioFileInputs,
    ImageInputs,
    ImageTextInputs,
    InferTensor,
    Request,
    TextInputs,
    VideoInputs,
    ZeroShotImageInputs,
)
from worker.errors import InvalidRequest, PayloadTooLarge, UndecodableInput
from worker.processors import (
    AudioInput,
    ImageInput,
    ModelInput,
    MultimodalInput,
    TensorInput,
    TextInput,
    VideoInput,
)


@dataclass(frozen=True)
class MediaLimits:
    """Upper bounds for decoded media; exceeding one is a payload_too_large error."""

    max_image_pixels: int = 4096 * 4096
    max_audio_seconds: float = 60.0
    max_video_frames: int = 64
    max_text_chars: int = 100_000


def decode_image(raw: bytes, limits: MediaLimits, what: str = "image") -> Image.Image:
    """PNG/JPEG/... bytes -> RGB image; the pixel count is checked from the header first."""
    try:
        image = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as exc:  # PIL's own ceiling, far above ours, checked at open
        raise PayloadTooLarge(f"{what} claims more pixels than any limit allows") from exc
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
    if width < 1:
        raise UndecodableInput("audio sample width is 0 bytes")
    data = data[: len(data) - len(data) % width]  # a truncated file may end mid-sample
    if width == 1:
        return (np.frombuffer(data, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 2:
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    if width == 3:
        bytes3 = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3)
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


_NUMPY_DTYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


def tensor_to_array(tensor: InferTensor) -> np.ndarray:
    """One Open Inference Protocol tensor as a numpy array of its shape and datatype."""
    return np.asarray(tensor.data, dtype=_NUMPY_DTYPES[tensor.datatype.value]).reshape(tensor.shape)


def _text(value: str, limits: MediaLimits) -> str:
    if len(value) > limits.max_text_chars:
        raise PayloadTooLarge(f"text is {len(value)} characters; the limit is {limits.max_text_chars}")
    return value


def decode_inputs(request: Request, limits: MediaLimits) -> ModelInput:
    """The request's inputs decoded into what the model's processor takes."""
    inputs = request.inputs
    if isinstance(inputs, list):
        names = [t.name for t in inputs]
        if len(set(names)) != len(names):
            raise InvalidRequest("tensor names must be unique")
        return TensorInput({t.name: tensor_to_array(t) for t in inputs})
    if isinstance(inputs, TextInputs):
        pair = None if inputs.text_pair is None else _text(inputs.text_pair, limits)
        return TextInput(_text(inputs.text, limits), pair)
    if isinstance(inputs, ImageInputs):
        return ImageInput(decode_image(inputs.image, limits))
    if isinstance(inputs, AudioFileInputs):
        array, rate = decode_wav(inputs.audio, limits)
        return AudioInput(array, rate)
    if isinstance(inputs, AudioArrayInputs):
        array = check_waveform(np.asarray(inputs.array, dtype=np.float64), inputs.sampling_rate, limits)
        return AudioInput(array, inputs.sampling_rate)
    if isinstance(inputs, VideoInputs):
        if len(inputs.frames) > limits.max_video_frames:
            raise PayloadTooLarge(f"{len(inputs.frames)} frames; the limit is {limits.max_video_frames}")
        return VideoInput([decode_image(f, limits, f"frame {i}") for i, f in enumerate(inputs.frames)])
    if isinstance(inputs, ZeroShotImageInputs):
        template = inputs.hypothesis_template or "This is a photo of {}."
        return MultimodalInput(
            decode_image(inputs.image, limits), tuple(inputs.candidate_labels), hypothesis_template=template
        )
    if isinstance(inputs, ImageTextInputs):
        return MultimodalInput(decode_image(inputs.image, limits), text=_text(inputs.text, limits))
    raise InvalidRequest(f"unsupported inputs {type(inputs).__name__}")
