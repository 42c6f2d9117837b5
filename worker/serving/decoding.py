"""Validated requests -> decoded model inputs; every size is bounded before anything is inflated.

schemas/ has already checked structure, base64, byte sizes and image signatures; this turns the
bytes into pixels, samples, frames and arrays under the worker's limits (settings). Audio and
video files go through PyAV (worker/serving/media.py). ``decode_inputs`` is a plain function: it runs in
process or in a decoder process (worker/serving/sandbox.py) alike.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from schemas import (
    AudioArrayInputs,
    AudioFileInputs,
    ImageInputs,
    ImageTextInputs,
    InferTensor,
    Request,
    TextInputs,
    VideoFileInputs,
    VideoInputs,
    ZeroShotImageInputs,
)
from worker.errors import InvalidRequest, PayloadTooLarge, UndecodableInput
from worker.serving import audio_files, video_files
from worker.serving.inputs import (
    DEFAULT_HYPOTHESIS_TEMPLATE,
    AudioInput,
    ImageInput,
    ModelInput,
    MultimodalInput,
    TensorInput,
    TextInput,
    VideoFileInput,
    VideoInput,
)
from worker.serving.media_limits import MediaLimits


def bound_pillow(limits: MediaLimits) -> None:
    """Pillow's own decompression-bomb ceiling set from the limits (a process-wide setting).

    Pillow raises at open above twice its ceiling: the last guard for a plugin that decodes inside
    ``Image.open``. Its warning between one and two times is dropped: ``decode_image`` refuses
    those itself, right after open.
    """
    Image.MAX_IMAGE_PIXELS = max(limits.max_image_pixels, limits.max_video_pixels)
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)


_ICO = b"\x00\x00\x01\x00"
_PNG = b"\x89PNG\r\n\x1a\n"


def _embedded_sizes(raw: bytes) -> list[tuple[int, int]]:
    """Width and height of each image an ICO file holds, read from the PNG or BMP header of each.

    Pillow decodes an ICO's largest image inside ``Image.open``, before its size can be checked,
    and the directory's one-byte sizes cannot say more than 256: only the embedded header tells.
    """
    (count,) = struct.unpack_from("<H", raw, 4)
    sizes = []
    for entry in range(count):
        at = 6 + 16 * entry
        if at + 16 > len(raw):
            raise UndecodableInput("image: the ICO directory is truncated")
        size, offset = struct.unpack_from("<II", raw, at + 8)
        data = raw[offset : offset + min(size, 32)]
        if data.startswith(_PNG) and len(data) >= 24:
            sizes.append(struct.unpack_from(">II", data, 16))
        elif len(data) >= 12:  # a BMP info header: its height counts the image and its AND mask
            width, height = struct.unpack_from("<ii", data, 4)
            sizes.append((abs(width), abs(height) // 2))
        else:
            raise UndecodableInput("image: an ICO entry points outside the file")
    return sizes


def _check_before_open(raw: bytes, limits: MediaLimits, max_pixels: int, what: str) -> None:
    """What Pillow would spend before its size check: an ICO's embedded images, a JPEG's scans."""
    if raw.startswith(_ICO) and len(raw) >= 6:
        for width, height in _embedded_sizes(raw):
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"{what} holds a {width}x{height} image; the limit is {max_pixels} pixels"
                )
    if raw.startswith(b"\xff\xd8"):
        # Each SOS marker starts a scan over the whole image. Entropy-coded data cannot hold the
        # marker (0xFF is stuffed), so counting bytes over-counts only markers inside APPn segments.
        scans = raw.count(b"\xff\xda")
        if scans > limits.max_jpeg_scans:
            raise PayloadTooLarge(f"{what} is a JPEG of {scans} scans; the limit is {limits.max_jpeg_scans}")


def decode_image(
    raw: bytes, limits: MediaLimits, what: str = "image", max_pixels: int | None = None
) -> Image.Image:
    """Any image file Pillow opens -> RGB, as transformers' ``load_image`` converts it.

    The pixel count (``max_pixels``, by default the image limit) is checked from the headers
    before anything is inflated; an animated GIF/WebP gives its first frame.
    """
    max_pixels = limits.max_image_pixels if max_pixels is None else max_pixels
    _check_before_open(raw, limits, max_pixels, what)
    try:
        image = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as exc:  # PIL's own ceiling, far above ours, checked at open
        raise PayloadTooLarge(f"{what} claims more pixels than any limit allows") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UndecodableInput(f"{what} is not a readable image") from exc
    width, height = image.size
    # Checked before load(): a decompression bomb is rejected without being inflated.
    if width * height > max_pixels:
        raise PayloadTooLarge(f"{what} is {width}x{height} pixels; the limit is {max_pixels}")
    try:
        image.load()
        return to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UndecodableInput(f"{what} is truncated or corrupt") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied, then RGB: what transformers' ``load_image`` does to every image.

    Palette, alpha, CMYK, greyscale and 16-bit modes take Pillow's own conversion, as there.
    """
    return ImageOps.exif_transpose(image).convert("RGB")


def decode_audio(raw: bytes, limits: MediaLimits) -> tuple[np.ndarray, int]:
    """Any audio file FFmpeg reads -> mono float32 waveform in [-1, 1] and its own sampling rate."""
    return audio_files.decode_audio(raw, limits.av)


def decode_video(raw: bytes, limits: MediaLimits) -> VideoFileInput:
    """A video file whose container passed the limits; its processor decodes the frames it samples."""
    return VideoFileInput(video_files.probe_video(raw, limits.av))


class MediaDecoder(Protocol):
    """Where image, audio and video files are decoded: this process (InProcess) or a decoder process."""

    def image(self, raw: bytes, what: str, max_pixels: int) -> Image.Image:
        """An image file -> RGB within ``max_pixels``."""
        ...

    def audio(self, raw: bytes) -> tuple[np.ndarray, int]:
        """An audio file -> mono float32 samples and their rate."""
        ...

    def video(self, raw: bytes) -> video_files.Clip:
        """A video file checked against the limits; frames are decoded when the processor asks."""
        ...


@dataclass(frozen=True)
class InProcess:
    """Decodes in the calling thread: tests, the pipeline API, and ``decode_isolation`` off."""

    limits: MediaLimits

    def image(self, raw: bytes, what: str, max_pixels: int) -> Image.Image:
        """``decode_image`` here."""
        return decode_image(raw, self.limits, what, max_pixels)

    def audio(self, raw: bytes) -> tuple[np.ndarray, int]:
        """``decode_audio`` here."""
        return decode_audio(raw, self.limits)

    def video(self, raw: bytes) -> video_files.Clip:
        """``video_files.probe_video`` here."""
        return video_files.probe_video(raw, self.limits.av)


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


def decode_frames(frames: list[bytes], limits: MediaLimits, decoder: MediaDecoder) -> list[Image.Image]:
    """A request's list of frame images, held to the video limits: frame count and pixels per frame.

    Decoded RGB bytes are at most ``max_video_frames * max_video_pixels * 3`` (401 MB at the defaults).
    """
    if len(frames) > limits.max_video_frames:
        raise PayloadTooLarge(f"{len(frames)} frames; the limit is {limits.max_video_frames}")
    return [decoder.image(frame, f"frame {i}", limits.max_video_pixels) for i, frame in enumerate(frames)]


def _text(value: str, limits: MediaLimits) -> str:
    if len(value) > limits.max_text_chars:
        raise PayloadTooLarge(f"text is {len(value)} characters; the limit is {limits.max_text_chars}")
    return value


def decode_inputs(request: Request, limits: MediaLimits, decoder: MediaDecoder | None = None) -> ModelInput:
    """The request's inputs decoded into what the model's processor takes.

    Media files go through ``decoder`` (by default in this thread); texts, raw audio arrays and
    tensors are checked here, their size bounded by the wire format and ``max_text_chars``.
    """
    decoder = decoder or InProcess(limits)
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
        return ImageInput(decoder.image(inputs.image, "image", limits.max_image_pixels))
    if isinstance(inputs, AudioFileInputs):
        array, rate = decoder.audio(inputs.audio)
        return AudioInput(array, rate)
    if isinstance(inputs, AudioArrayInputs):
        array = check_waveform(np.asarray(inputs.array, dtype=np.float64), inputs.sampling_rate, limits)
        return AudioInput(array, inputs.sampling_rate)
    if isinstance(inputs, VideoInputs):
        return VideoInput(decode_frames(inputs.frames, limits, decoder))
    if isinstance(inputs, VideoFileInputs):
        return VideoFileInput(decoder.video(inputs.video))
    if isinstance(inputs, ZeroShotImageInputs):
        template = inputs.hypothesis_template or DEFAULT_HYPOTHESIS_TEMPLATE
        image = decoder.image(inputs.image, "image", limits.max_image_pixels)
        return MultimodalInput(image, tuple(inputs.candidate_labels), hypothesis_template=template)
    if isinstance(inputs, ImageTextInputs):
        image = decoder.image(inputs.image, "image", limits.max_image_pixels)
        return MultimodalInput(image, text=_text(inputs.text, limits))
    raise InvalidRequest(f"unsupported inputs {type(inputs).__name__}")
