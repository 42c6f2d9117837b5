"""Topic names: part of the wire format, like the messages that travel on them."""

from __future__ import annotations

import uuid

from schemas.requests import Modality

DEFAULT_PREFIX = "inference"


def requests_topic(modality: Modality | str, prefix: str = DEFAULT_PREFIX) -> str:
    """`<prefix>.<modality>.requests`: where clients send requests of one modality."""
    return f"{prefix}.{Modality(modality).value}.requests"


def results_topic(modality: Modality | str, prefix: str = DEFAULT_PREFIX) -> str:
    """`<prefix>.<modality>.results`: replies to requests that carry no reply_to header."""
    return f"{prefix}.{Modality(modality).value}.results"


def dlq_topic(prefix: str = DEFAULT_PREFIX) -> str:
    """`<prefix>.dlq`: raw copies of rejected messages, the reason in their headers."""
    return f"{prefix}.dlq"


def quarantine_topic(prefix: str = DEFAULT_PREFIX) -> str:
    """`<prefix>.quarantine`: the workers' own crash markers, one key per group/topic/partition."""
    return f"{prefix}.quarantine"


def private_reply_topic(prefix: str = DEFAULT_PREFIX) -> str:
    """A fresh `<prefix>.replies.<uuid>` topic name for one client's replies."""
    return f"{prefix}.replies.{uuid.uuid4().hex}"
