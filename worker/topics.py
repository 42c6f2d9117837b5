"""Kafka topic names of the service, and idempotent topic creation."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, UnknownTopicOrPartitionError, for_code

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


def private_reply_topic(prefix: str = DEFAULT_PREFIX) -> str:
    """A fresh `<prefix>.replies.<uuid>` topic name for one client's replies."""
    return f"{prefix}.replies.{uuid.uuid4().hex}"


async def create_topics(
    bootstrap_servers: str,
    names: Iterable[str],
    partitions: int = 1,
    *,
    replication_factor: int = 1,
    timeout_ms: int = 10_000,
) -> list[str]:
    """Create the topics that do not exist yet; returns the names it created.

    Existing topics are left as they are (their partition count is not changed).
    """
    if partitions < 1 or replication_factor < 1:
        raise ValueError("partitions and replication_factor must be at least 1")
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return []
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=timeout_ms)
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(name, partitions, replication_factor) for name in wanted],
            timeout_ms=timeout_ms,
        )
    finally:
        await admin.close()
    created = []
    # aiokafka reports per-topic failures in the response instead of raising.
    for topic, code, *rest in response.topic_errors:
        if code == 0:
            created.append(topic)
        elif code != TopicAlreadyExistsError.errno:
            message = rest[0] if rest else None
            raise for_code(code)(f"creating topic {topic!r}: {message}")
    return created


async def delete_topics(bootstrap_servers: str, names: Iterable[str], *, timeout_ms: int = 10_000) -> None:
    """Delete topics; ones that do not exist are ignored."""
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=timeout_ms)
    await admin.start()
    try:
        response = await admin.delete_topics(wanted, timeout_ms=timeout_ms)
    finally:
        await admin.close()
    for topic, code, *_ in response.topic_error_codes:
        if code not in (0, UnknownTopicOrPartitionError.errno):
            raise for_code(code)(f"deleting topic {topic!r}")
