"""The worker's request failures, one class per code, under the one hierarchy in ``schemas.errors``.

``InferenceError`` itself lives in ``schemas.errors``; ``schemas.RequestRejected``
(bytes that are no valid request) is one too, so one ``except InferenceError`` catches every failure.
"""

from __future__ import annotations

from schemas.codes import ErrorCode
from schemas.errors import InferenceError

__all__ = [
    "DeadlineExceeded",
    "InvalidRequest",
    "PayloadTooLarge",
    "PoisonSuspected",
    "UndecodableInput",
    "UnknownModel",
]


class InvalidRequest(InferenceError):
    """JSON that does not match the request schema or the model's inputs."""

    code = ErrorCode.INVALID_REQUEST


class UnknownModel(InferenceError):
    """The request names a model this worker does not serve."""

    code = ErrorCode.UNKNOWN_MODEL


class PayloadTooLarge(InferenceError):
    """A size limit (bytes, tokens, pixels, seconds, frames) was exceeded."""

    code = ErrorCode.PAYLOAD_TOO_LARGE


class UndecodableInput(InferenceError):
    """Base64, image or audio data that cannot be decoded."""

    code = ErrorCode.UNDECODABLE_INPUT


class DeadlineExceeded(InferenceError):
    """The request's deadline passed before it could be answered."""

    code = ErrorCode.DEADLINE_EXCEEDED


class PoisonSuspected(InferenceError):
    """The request was running each time a worker died, max_crash_attempts times: skipped, not run."""

    code = ErrorCode.POISON_SUSPECTED
