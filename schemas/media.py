"""Base64 media fields: checks syntax, size and file signature, and holds the decoded bytes.

Turning those bytes into pixels or samples is the worker's job; this only makes sure they
are plausibly the promised format, so nothing else reaches an image or audio decoder.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import PlainSerializer, PlainValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

from schemas.limits import MAX_MEDIA_B64_CHARS

_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG = b"\xff\xd8\xff"
_MAX_DATA_URL_HEADER = 128


def _is_image(data: bytes) -> bool:
    return data.startswith((_PNG, _JPEG))


def _is_wav(data: bytes) -> bool:
    return len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WAVE"


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

#: One PNG or JPEG file, base64 in JSON; the decoded file bytes in Python.
ImageB64 = Annotated[
    bytes,
    PlainValidator(_decoder("image", _is_image)),
    _SERIALIZER,
    WithJsonSchema(
        {
            "type": "string",
            "contentEncoding": "base64",
            "contentMediaType": "image/png, image/jpeg",
            "maxLength": MAX_MEDIA_B64_CHARS,
            "description": "A PNG or JPEG file: standard base64 without line breaks, or a data: URL.",
        }
    ),
]

#: One RIFF/WAVE file, base64 in JSON; the decoded file bytes in Python.
WavB64 = Annotated[
    bytes,
    PlainValidator(_decoder("audio", _is_wav)),
    _SERIALIZER,
    WithJsonSchema(
        {
            "type": "string",
            "contentEncoding": "base64",
            "contentMediaType": "audio/wav",
            "maxLength": MAX_MEDIA_B64_CHARS,
            "description": "A WAV (RIFF/WAVE) file: standard base64 without line breaks, or a data: URL.",
        }
    ),
]
