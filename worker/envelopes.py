"""A request's coordinates on the way in, and its answer on the way out."""

from __future__ import annotations

from dataclasses import dataclass

from aiokafka import TopicPartition

from schemas import ErrorDetail, Modality
from worker.routing import Refusal


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
