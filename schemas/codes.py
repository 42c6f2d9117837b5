"""The stable error codes of the wire format."""

from enum import StrEnum


class ErrorCode(StrEnum):
    """Why a request got an error reply instead of a result."""

    INVALID_JSON = "invalid_json"
    INVALID_REQUEST = "invalid_request"
    UNKNOWN_MODEL = "unknown_model"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNDECODABLE_INPUT = "undecodable_input"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INTERNAL = "internal"
