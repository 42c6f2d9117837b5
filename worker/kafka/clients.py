"""The worker's Kafka clients: producer (FastStream), consumer and admin client, connected and closed here.

Connecting waits for a broker that does not answer yet (with backoff) but not for topics that
are missing and may not be created: that is a configuration error and ends the start.
Closing is bounded, whatever the broker does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from faststream.kafka import KafkaBroker

from worker.kafka.topics import MissingTopics, ensure_topics, max_message_bytes, track_topic
from worker.settings import Settings

log = logging.getLogger(__name__)


class KafkaClients:
    """Producer, consumer and admin client of one worker, built from its settings."""

    def __init__(self, settings: Settings) -> None:
        assert settings.bootstrap_servers
        self.settings = settings
        #: what the producer itself may send in one request; records stay under the broker's limit too
        self.max_request_size = max(settings.max_message_bytes * 2, 1024 * 1024)
        self.broker = KafkaBroker(
            # A list: FastStream wraps a string as one server, so "a:9092,b:9092" would be one bad host.
            [server.strip() for server in settings.bootstrap_servers.split(",")],
            acks="all",
            enable_idempotence=False,  # the embedded broker refuses idempotent producers
            max_batch_size=1024 * 1024,
            max_request_size=self.max_request_size,
            compression_type=None if settings.compression_type == "none" else settings.compression_type,
            security=settings.kafka_security(),
            logger=logging.getLogger("worker.kafka"),
            log_level=logging.DEBUG,
        )
        self.consumer: AIOKafkaConsumer | None = None
        self.admin: AIOKafkaAdminClient | None = None

    async def connect(
        self, own_topics: list[str], subscribe: list[str], listener: ConsumerRebalanceListener
    ) -> None:
        """Check (or create) the worker's own topics, start the producer, start and subscribe the consumer."""
        s = self.settings
        assert s.bootstrap_servers
        delay = 0.5
        while True:
            try:
                self.admin = AIOKafkaAdminClient(
                    bootstrap_servers=s.bootstrap_servers,
                    request_timeout_ms=10_000,
                    **s.kafka_client_kwargs(),
                )
                await self.admin.start()
                created = await ensure_topics(
                    self.admin,
                    own_topics,
                    s.partitions,
                    create=s.create_topics,
                    replication_factor=s.replication_factor,
                )
                if created:
                    log.info("created topics %s", ", ".join(created))
                await self.broker.start()
                self.consumer = AIOKafkaConsumer(
                    bootstrap_servers=s.bootstrap_servers,
                    group_id=s.group_id,
                    enable_auto_commit=False,  # offsets are committed only past answered messages
                    auto_offset_reset="earliest",
                    # exactly-once: requests of aborted transactions are never answered
                    isolation_level="read_committed" if s.delivery == "exactly-once" else "read_uncommitted",
                    fetch_max_wait_ms=s.fetch_max_wait_ms,
                    fetch_max_bytes=s.fetch_max_bytes,
                    max_partition_fetch_bytes=max(s.max_message_bytes, 1024 * 1024),
                    session_timeout_ms=s.session_timeout_ms,
                    heartbeat_interval_ms=s.heartbeat_interval_ms,
                    max_poll_interval_ms=s.max_poll_interval_ms,
                    **s.kafka_client_kwargs(),
                )
                await self.consumer.start()
                self.consumer.subscribe(subscribe, listener=listener)
                return
            except MissingTopics:
                await self.close()
                raise
            except (KafkaError, OSError) as exc:
                log.warning(
                    "Kafka at %s is not reachable (%s); retrying in %.1f s", s.bootstrap_servers, exc, delay
                )
                await self.close()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def record_limit(self, written: list[str]) -> int:
        """The largest record the broker takes on ``written`` topics: its max.message.bytes, else the setting."""
        assert self.admin is not None
        try:
            async with asyncio.timeout(5):
                reported = await max_message_bytes(self.admin, written)
        except (KafkaError, TimeoutError, OSError) as exc:
            log.info("the broker did not report max.message.bytes (%r)", exc)
            reported = None
        if reported is None:
            log.info("record size limit: %d bytes (max_publish_bytes)", self.settings.max_publish_bytes)
            return min(self.settings.max_publish_bytes, self.max_request_size)
        log.info("record size limit: %d bytes (the broker's max.message.bytes)", reported)
        return min(reported, self.max_request_size)

    async def marker_clients(
        self, topic: str, configs: dict[str, str]
    ) -> tuple[AIOKafkaProducer, AIOKafkaConsumer]:
        """The quarantine's own clients, not started: ``topic`` (one partition) made sure of first, created
        with ``configs`` where the broker takes them; a producer apart from the replies' batches, and a
        group-less reader (worker/kafka/quarantine.py ``MarkerLog`` is all that uses them)."""
        s = self.settings
        assert self.admin is not None and s.bootstrap_servers, "connect() first"
        if await ensure_topics(
            self.admin,
            [topic],
            1,
            create=s.create_topics,
            replication_factor=s.replication_factor,
            configs=configs,
        ):
            log.info("created topic %s", topic)
        reader = AIOKafkaConsumer(
            bootstrap_servers=s.bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            # It reads only up to an end it knows is there; brokers that answer a fetch only when its
            # wait expires (the embedded one) would otherwise add their wait to every catch-up.
            fetch_max_wait_ms=10,
            **s.kafka_client_kwargs(),
        )
        producer = AIOKafkaProducer(
            bootstrap_servers=s.bootstrap_servers,
            acks="all",
            enable_idempotence=False,  # the embedded broker refuses idempotent producers
            **s.kafka_client_kwargs(),
        )
        return producer, reader

    @property
    def producer(self) -> AIOKafkaProducer:
        """The aiokafka producer under the FastStream broker (``connect()`` started it)."""
        producer = self._started_producer()
        if producer is None:
            raise RuntimeError("the FastStream broker has no started aiokafka producer where 0.7 keeps it")
        return producer

    def _started_producer(self) -> AIOKafkaProducer | None:
        # FastStream 0.7 keeps it in its publisher's state and offers no accessor (a test pins the path).
        state = getattr(self.broker.config.producer, "_producer", None)
        producer = getattr(state, "producer", None)
        return producer if isinstance(producer, AIOKafkaProducer) else None

    async def list_topics(self) -> set[str]:
        """Every topic of the cluster (a metadata request naming none, so creating none)."""
        if self.admin is None:
            raise KafkaError("not connected")
        return set(await self.admin.list_topics())

    async def publish(
        self, value: bytes, topic: str, key: bytes | None, headers: dict[str, str], correlation_id: str
    ) -> Awaitable[Any]:
        """Queue one record in the producer; returns its delivery future (the broker's ack)."""
        producer = self._started_producer()
        if producer is not None:  # else FastStream's publish says what is wrong
            track_topic(producer, topic)
        ack: Awaitable[Any] = await self.broker.publish(
            value, topic, key=key, headers=headers, correlation_id=correlation_id, no_confirm=True
        )
        return ack

    async def close(self, budget_s: float = 10.0) -> None:
        """Stop consumer, producer and admin client, all within ``budget_s`` whatever the broker does."""
        closing: list[Awaitable[Any]] = [self.broker.stop()]
        if self.consumer is not None:
            closing.append(self.consumer.stop())
        if self.admin is not None:
            closing.append(self.admin.close())
        tasks = [asyncio.ensure_future(c) for c in closing]
        done, pending = await asyncio.wait(tasks, timeout=budget_s)
        for task in pending:
            task.cancel()
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.warning("closing a Kafka client failed: %r", task.exception())
        if pending:
            log.warning("%d Kafka clients did not close within %.1f s; abandoned", len(pending), budget_s)
        self.consumer = None
        self.admin = None
