"""The one exception hierarchy for request failures; each maps to a stable error code."""

from __future__ import annotations

from typing import ClassVar

from schemas.codes import ErrorCode


class InferenceError(Exception):
    """A request that gets an error reply; ``code`` is what the client sees."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidJSON(InferenceError):
    """The message body is not JSON."""

    code = ErrorCode.INVALID_JSON


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


class Internal(InferenceError):
    """A fault on our side; logged with its traceback."""

    code = ErrorCode.INTERNAL
