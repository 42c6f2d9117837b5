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
    #: the request killed the worker that ran it max_crash_attempts times; it was skipped, not run again
    POISON_SUSPECTED = "poison_suspected"
    INTERNAL = "internal"
