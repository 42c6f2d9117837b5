"""Base64 media fields: checks syntax, size and (for images) file signature, and holds the decoded bytes.

Turning those bytes into pixels, samples or frames is the worker's job. Images must carry the
signature of a format Pillow reads; audio and video files are any non-empty bytes, because the
worker's FFmpeg demuxers (a fixed list of them) are what recognise a container.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import PlainSerializer, PlainValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

from schemas.limits import MAX_MEDIA_B64_CHARS

_MAX_DATA_URL_HEADER = 128
#: Leading bytes of PNG, JPEG, GIF, BMP, TIFF (both byte orders), ICO and PNM (P1-P7) files.
_IMAGE_SIGNATURES = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"\x00\x00\x01\x00",
    *(b"P%d" % n for n in range(1, 8)),
)


def _is_image(data: bytes) -> bool:
    is_webp = len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    return is_webp or data.startswith(_IMAGE_SIGNATURES)


def _is_nonempty(data: bytes) -> bool:
    return len(data) > 0


def _decoder(kind: str, accepts: Callable[[bytes], bool]) -> Callable[[Any], bytes]:
    def decode(value: Any) -> bytes:
        if isinstance(value, bytes):
            data = value  # built in Python with the file bytes already at hand
        elif isinstance(value, str):
            if len(value) > MAX_MEDIA_B64_CHARS:
                raise PydanticCustomError(
                    "payload_too_large",
                    "{kind} is {size} base64 characters, the limit is {limit}",
                    {"kind": kind, "size": len(value), "limit": MAX_MEDIA_B64_CHARS},
                )
            if value.startswith("data:") and ";base64," in value[:_MAX_DATA_URL_HEADER]:
                value = value.split(",", 1)[1]  # browsers hand out data: URLs
            try:
                # validate=True: the default silently drops non-alphabet characters.
                data = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise PydanticCustomError(
                    "undecodable_input", "{kind} is not valid base64", {"kind": kind}
                ) from None
        else:
            raise PydanticCustomError("string_type", "Input should be a valid string")
        if not accepts(data):
            raise PydanticCustomError(
                "undecodable_input", "{kind} has the wrong file signature", {"kind": kind}
            )
        return data

    return decode


def _encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


_SERIALIZER = PlainSerializer(_encode, return_type=str, when_used="json")

#: One image file (PNG, JPEG, GIF, WebP, BMP, TIFF, ICO, PNM), base64 in JSON; the decoded file bytes in Python.
ImageB64 = Annotated[
    bytes,
    PlainValidator(_decoder("image", _is_image)),
    _SERIALIZER,
    WithJsonSchema(
        {
            "type": "string",
            "contentEncoding": "base64",
            "contentMediaType": "image/*",
            "maxLength": MAX_MEDIA_B64_CHARS,
            "description": "A PNG, JPEG, GIF, WebP, BMP, TIFF, ICO or PNM file (animated: the first frame): "
            "standard base64 without line breaks, or a data: URL.",
        }
    ),
]

#: One audio file, base64 in JSON; the decoded file bytes in Python.
AudioB64 = Annotated[
    bytes,
    PlainValidator(_decoder("audio", _is_nonempty)),
    _SERIALIZER,
    WithJsonSchema(
        {
            "type": "string",
            "contentEncoding": "base64",
            "contentMediaType": "audio/*",
            "minLength": 1,
            "maxLength": MAX_MEDIA_B64_CHARS,
            "description": "An audio file FFmpeg reads (WAV, FLAC, MP3, Ogg Vorbis/Opus, M4A/AAC, WebM, AIFF, ...): "
            "standard base64 without line breaks, or a data: URL. Mixed down to mono and resampled to the model's rate.",
        }
    ),
]

#: One video file, base64 in JSON; the decoded file bytes in Python.
VideoB64 = Annotated[
    bytes,
    PlainValidator(_decoder("video", _is_nonempty)),
    _SERIALIZER,
    WithJsonSchema(
        {
            "type": "string",
            "contentEncoding": "base64",
            "contentMediaType": "video/*",
            "minLength": 1,
            "maxLength": MAX_MEDIA_B64_CHARS,
            "description": "A video file FFmpeg reads (MP4, MOV, WebM, MKV, AVI; H.264, H.265, VP8, VP9, AV1, ...): "
            "standard base64 without line breaks, or a data: URL. Frames are sampled to the model's frame count.",
        }
    ),
]
