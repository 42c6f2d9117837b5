"""A request's coordinates on the way in, and its answer on the way out."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiokafka import TopicPartition

from schemas import ErrorCode, ErrorDetail, ErrorReply, Modality
from worker.kafka.routing import Refusal
from worker.kafka.tracing import RequestTrace


@dataclass
class Origin:
    """Where a message came from and where its answer goes."""

    modality: Modality
    tp: TopicPartition
    offset: int
    reply_topic: str
    correlation_id: str
    raw: bytes
    timestamp_ms: int
    #: the reply_to the client asked for, when it was not honoured, and why
    refused: tuple[str, Refusal] | None = None
    #: why the message is refused before it is parsed (an oversize header, say)
    rejected: str | None = None
    #: the partition's epoch when the message was fetched (worker/kafka/offsets.py): answers name it
    epoch: int = 0
    #: its place in its trace (W3C trace context), carried on to the reply and the DLQ record
    trace: RequestTrace = field(default_factory=RequestTrace)


@dataclass
class Outgoing:
    """One reply to publish, plus a DLQ copy when the request was rejected.

    ``body`` None: nothing to reply to (a record that could not be decoded); only the DLQ record goes.
    """

    origin: Origin
    request_id: str | None
    model: str | None
    body: bytes | None
    error: ErrorDetail | None = None


def rejection(
    origin: Origin, request_id: str | None, model: str | None, code: ErrorCode, message: str
) -> Outgoing:
    """The error answer for a request (and, by its ``error``, a DLQ copy)."""
    detail = ErrorDetail(code=code, message=message)
    body = ErrorReply(id=request_id, model=model, error=detail).model_dump_json().encode()
    return Outgoing(origin, request_id, model, body, detail)
