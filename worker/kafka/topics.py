"""Idempotent topic creation and deletion (the names themselves are wire format: schemas/topics.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    KafkaError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
    for_code,
)

log = logging.getLogger(__name__)

#: How long a worker that may not create its topics looks for missing ones before it stops, and how often.
MISSING_GRACE_S = 5.0
MISSING_RECHECK_S = 0.5

#: The most replicas a created topic gets unless told otherwise: Kafka's own default for its internal
#: topics (offsets, transactions), so losing one broker of three loses no reply, DLQ record or marker.
MAX_DEFAULT_REPLICAS = 3
#: From this many replicas up, a topic the worker creates asks for two in sync before a write (acks=all)
#: is acknowledged: an acknowledged reply, DLQ record or marker then survives the loss of any one broker.
#: With two replicas it stays at the broker's default: two in sync would stop every write while one is down.
IN_SYNC_FROM_REPLICAS = 3


def track_topic(producer: AIOKafkaProducer, topic: str) -> None:
    """Keep ``topic`` in ``producer``'s metadata for good; call it before each send to ``topic``.

    aiokafka (0.14) replaces a producer's metadata with that of the topics it tracks (every topic while it
    tracks none), and tracks a topic only once a send finds it missing. So the first send to a topic the
    metadata lacks (one created since) made that topic the only one: records already queued for the others
    lost their leader and waited out ``request_timeout_ms`` (40 s), re-asking for metadata in a tight loop.
    With every written topic tracked before its first send, a refresh keeps them all (docs/kafka-notes.md).
    """
    producer.client.add_topic(topic)  # a no-op once tracked; else it starts a refresh (nothing to wait for)


async def replicas(admin: AIOKafkaAdminClient, wanted: int | None) -> int:
    """``wanted``, else as many replicas as the cluster has brokers (those its metadata lists), up to
    MAX_DEFAULT_REPLICAS: 1 on a single broker, 3 on a cluster of three or more."""
    if wanted is not None:
        return wanted
    brokers = (await admin.describe_cluster()).get("brokers") or []
    return max(1, min(MAX_DEFAULT_REPLICAS, len(brokers)))


async def create_topics(
    bootstrap_servers: str,
    names: Iterable[str],
    partitions: int = 1,
    *,
    replication_factor: int | None = None,
    timeout_ms: int = 10_000,
    client_kwargs: dict[str, Any] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet; returns the names it created.

    Existing topics are left as they are (their partition count is not changed). ``replication_factor``
    None: as many replicas as the cluster has brokers, up to three (``replicas``).
    """
    if partitions < 1 or (replication_factor is not None and replication_factor < 1):
        raise ValueError("partitions and replication_factor must be at least 1")
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return []
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap_servers, request_timeout_ms=timeout_ms, **(client_kwargs or {})
    )
    await admin.start()
    try:
        copies = await replicas(admin, replication_factor)
        response = await admin.create_topics(
            [NewTopic(name, partitions, copies) for name in wanted], timeout_ms=timeout_ms
        )
    finally:
        await admin.close()
    return _created(response)


def _created(response: Any) -> list[str]:
    """The topics a CreateTopics response says were created; raises for any failure but "exists".

    aiokafka reports per-topic failures in the response instead of raising.
    """
    created = []
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


class MissingTopics(RuntimeError):
    """The worker's own topics do not exist and it may not create them."""

    def __init__(self, missing: list[str], *, refused: str | None = None) -> None:
        """`refused`: the broker's answer when the worker tried to create them and was not allowed."""
        if refused is None:
            why = "WORKER_CREATE_TOPICS is off: "
            hint = " (create them, or let the worker create its own topics)"
        else:
            why = "the broker refused to create them: "
            hint = f" ({refused}; create them, or grant the worker's principal Create)"
        super().__init__("these topics do not exist and " + why + ", ".join(missing) + hint)
        self.missing = missing


async def ensure_topics(
    admin: AIOKafkaAdminClient,
    names: Iterable[str],
    partitions: int,
    *,
    create: bool,
    replication_factor: int | None = None,
    configs: dict[str, str] | None = None,
) -> list[str]:
    """Check the worker's own topics exist; create the missing ones only when ``create``. Returns the created.

    Not allowed to create them, it looks for missing ones for MISSING_GRACE_S before it gives up.
    Created with ``replication_factor`` replicas (None: ``replicas``) and ``durability``'s settings for them.
    ``configs`` (topic settings such as cleanup.policy) are asked for too; a broker that refuses them gets
    the topics without.
    """
    missing = await _missing(admin, names)
    if missing and not create:
        # A topic the operator just created reaches each broker's metadata a moment after CreateTopics
        # returns (the controller has it then), and the check asks any one broker.
        missing = await _until_listed(admin, missing)
        if missing:
            raise MissingTopics(missing)
    if not missing:
        return []
    copies = await replicas(admin, replication_factor)
    configs = durability(copies) | (configs or {})
    if configs:
        try:
            return await _create(
                admin, [NewTopic(name, partitions, copies, topic_configs=configs) for name in missing]
            )
        except MissingTopics:
            raise
        except KafkaError as exc:
            log.warning(
                "the broker refused topic settings %s (%r); creating %s without", configs, exc, missing
            )
    return await _create(admin, [NewTopic(name, partitions, copies) for name in missing])


def durability(copies: int) -> dict[str, str]:
    """The settings of a created topic with ``copies`` replicas that keep an acknowledged write: two replicas
    in sync (``min.insync.replicas``) from IN_SYNC_FROM_REPLICAS up, else the broker's default."""
    return {"min.insync.replicas": "2"} if copies >= IN_SYNC_FROM_REPLICAS else {}


async def _missing(admin: AIOKafkaAdminClient, names: Iterable[str]) -> list[str]:
    """Those of ``names`` the cluster's topic list lacks, in their order."""
    existing = set(await admin.list_topics())
    return [name for name in dict.fromkeys(names) if name not in existing]


async def _create(admin: AIOKafkaAdminClient, topics: list[NewTopic]) -> list[str]:
    try:
        created = _created(await admin.create_topics(topics))
    except (TopicAuthorizationFailedError, ClusterAuthorizationFailedError) as exc:
        # Not a broker that is away: retrying cannot help, so the worker stops with the names.
        raise MissingTopics([t.name for t in topics], refused=repr(exc)) from exc
    # Apache Kafka serves a new topic in its metadata a moment after CreateTopics returns. A consumer
    # that joined its group before then was assigned none of its partitions (the assignor logged "No
    # partition metadata"), and learnt of them only at its next metadata refresh (CI: not ready in 30 s).
    await _until_listed(admin, await _missing(admin, created))
    return created


async def _until_listed(admin: AIOKafkaAdminClient, missing: list[str]) -> list[str]:
    """Ask again every MISSING_RECHECK_S, for up to MISSING_GRACE_S, until the broker lists ``missing``;
    returns those still missing then."""
    deadline = time.monotonic() + MISSING_GRACE_S
    while missing and time.monotonic() < deadline:
        await asyncio.sleep(MISSING_RECHECK_S)
        missing = await _missing(admin, missing)
    return missing


async def max_message_bytes(admin: AIOKafkaAdminClient, topics: Iterable[str]) -> int | None:
    """The smallest ``max.message.bytes`` the broker reports for ``topics`` (None: it reports none).

    A topic's value already folds in the broker's ``message.max.bytes`` when the topic does not
    override it, so the topics the worker writes to are all there is to ask about.
    """
    resources = [
        ConfigResource(ConfigResourceType.TOPIC, name, {"max.message.bytes": None}) for name in topics
    ]
    limits = []
    for response in await admin.describe_configs(resources):
        for error_code, _message, _type, _name, entries, *_ in response.resources:
            if error_code != 0:
                continue
            limits += [int(entry[1]) for entry in entries if entry[0] == "max.message.bytes" and entry[1]]
    return min(limits) if limits else None
