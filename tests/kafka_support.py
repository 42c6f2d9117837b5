"""Helpers for tests that talk to a real broker: wire inputs of the stored samples, raw topics, hand-built batches.

The stored samples (tests/references.py) name files; requests carry them as base64. A
``TopicReader`` reads whole topics from the beginning without a consumer group (no join
delay on tansu), so a test sees every reply, DLQ copy or request that reached a topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy
from aiokafka.record.util import calc_crc32c

# The request builders live in bench/samples.py (the soak run builds its stream with them too).
from bench.samples import b64 as b64
from bench.samples import b64_file as b64_file
from bench.samples import request_bytes as request_bytes
from bench.samples import wire_inputs as wire_inputs
from tests.references import TINY
from worker.app import Worker
from worker.kafka.topics import max_message_bytes
from worker.kafka.tracing import Tracing
from worker.serving.registry import ServedModel, load_models
from worker.settings import Settings

Record = ConsumerRecord[bytes, bytes]


def headers_of(record: Record) -> dict[str, bytes]:
    """A record's headers as a dict (the last value wins for repeated names)."""
    return {key: bytes(value) for key, value in record.headers or ()}


def body_of(record: Record) -> Any:
    """A record's JSON body."""
    return json.loads(record.value or b"")


@contextlib.asynccontextmanager
async def raw_producer(bootstrap_servers: str, **config: Any) -> AsyncIterator[AIOKafkaProducer]:
    """A plain producer (acks=all; no idempotence, which tansu refuses); ``config`` goes to aiokafka."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers, acks="all", enable_idempotence=False, **config
    )
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


async def replica_counts(bootstrap_servers: str, topics: list[str]) -> dict[str, set[int]]:
    """The number of replicas of each partition of each topic, as the cluster's metadata lists them.

    A topic just created may be described with no partitions yet (one CI run: the broker answering from
    metadata the controller had not yet sent it): described again until each has some, for up to 10 s.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        async with asyncio.timeout(10):
            described = await admin.describe_topics(topics)
            while not all(t["partitions"] for t in described):
                await asyncio.sleep(0.05)
                described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    return {t["topic"]: {len(p["replicas"]) for p in t["partitions"]} for t in described}


async def allow_records_up_to(bootstrap_servers: str, kind: str, topic: str, max_bytes: int) -> None:
    """Let `topic` take records up to `max_bytes`, as an operator does for a topic of large requests.

    Apache Kafka refuses records over 1 MiB unless the topic says otherwise; tansu has no limit
    to raise (and no AlterConfigs), so on tansu this does nothing.
    """
    if kind == "tansu":
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        [response] = await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": str(max_bytes)})]
        )
        assert all(error == 0 for error, *_ in response.resources), response
        # The controller has it now; the broker applies it from the metadata log a moment later.
        async with asyncio.timeout(10):
            while await max_message_bytes(admin, [topic]) != max_bytes:  # noqa: ASYNC110 (broker state: no event to wait on)
                await asyncio.sleep(0.05)
    finally:
        await admin.close()


class TopicReader:
    """Reads topics from their first offset without a group; ``records`` grows as they arrive.

    The topics must exist before ``start()`` (a no-group subscription only sees topics the
    metadata knew at that moment).
    """

    def __init__(self, bootstrap_servers: str, *topics: str, client: Mapping[str, Any] | None = None) -> None:
        """`client`: aiokafka keyword arguments of its own (a secured broker's credentials)."""
        self.records: list[Record] = []
        self._bootstrap = bootstrap_servers
        self._client = dict(client or {})
        self._topics = topics
        self._markers: dict[bytes, int] = {}
        """Settle markers by key, and how many of each were read."""
        self._consumer = AIOKafkaConsumer(
            *topics,
            bootstrap_servers=bootstrap_servers,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            **self._client,
        )
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect and start reading in a background task."""
        await self._consumer.start()
        self._task = asyncio.create_task(self._read(), name="topic-reader")

    async def stop(self) -> None:
        """Stop reading and disconnect."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _read(self) -> None:
        async for record in self._consumer:
            if record.key in self._markers:
                self._markers[record.key] += 1
            else:
                self.records.append(record)
            self._arrived.set()

    async def settle(self, timeout: float = 20.0) -> list[Record]:  # noqa: ASYNC109
        """Every record the topics hold now, and no more to come from what was acknowledged before.

        Appends a marker record to each partition and waits until all markers were read: a
        partition is read in order, so whatever the broker acknowledged before is read by then.
        Call it once the producers under test are done (a drained worker), instead of sleeping
        "long enough" for a duplicate to show up. Markers are not kept in ``records``.
        """
        marker = f"settle-{uuid.uuid4().hex}".encode()
        self._markers[marker] = 0
        async with raw_producer(self._bootstrap, **self._client) as producer:
            sent = 0
            for topic in self._topics:
                for partition in sorted(await producer.partitions_for(topic)):
                    await producer.send_and_wait(topic, b"", key=marker, partition=partition)
                    sent += 1
        async with asyncio.timeout(timeout):
            while self._markers[marker] < sent:
                self._arrived.clear()
                await self._arrived.wait()
        return list(self.records)

    async def wait_until(
        self,
        predicate: Callable[[list[Record]], bool],
        timeout: float = 20.0,  # noqa: ASYNC109
    ) -> list[Record]:
        """The records read so far, once ``predicate`` holds for them; TimeoutError otherwise."""
        async with asyncio.timeout(timeout):
            while not predicate(self.records):
                self._arrived.clear()
                await self._arrived.wait()
        return list(self.records)

    async def wait_for(self, count: int, timeout: float = 20.0) -> list[Record]:  # noqa: ASYNC109
        """The records read so far, once there are at least ``count``."""
        return await self.wait_until(lambda records: len(records) >= count, timeout)


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Poll plain state the worker exposes no event for."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def read_to_the_end(worker: Worker, *readers: TopicReader) -> None:
    """Once ``worker`` holds no unanswered request, read each reader's topics to their end.

    Nothing unanswered means every reply and DLQ record of what it fetched was acknowledged, so
    each one, a duplicate included, is in the readers' ``records`` afterwards: no sleeping "long
    enough" for a duplicate to show up. Call it after waiting for the answers the test expects.
    """
    await until(lambda: worker.tracker.in_flight == 0)
    for reader in readers:
        await reader.settle()


def new_prefix() -> str:
    """A topic prefix no other test uses."""
    return f"kw{uuid.uuid4().hex[:12]}"


@contextlib.asynccontextmanager
async def serving(
    bootstrap: str,
    models: Mapping[str, ServedModel],
    prefix: str | None = None,
    *,
    spans: Tracing | None = None,
    **knobs: Any,
) -> AsyncIterator[Worker]:
    """A started Worker on `prefix` (default: a fresh one) and its own group, holding its partitions;
    drained and stopped after. ``spans``: where its spans go (tests of tracing); ``knobs``: settings."""
    prefix = prefix or new_prefix()
    settings = Settings(
        bootstrap_servers=bootstrap,
        topic_prefix=prefix,
        group_id=f"{prefix}.workers",
        session_timeout_ms=3000,
        heartbeat_interval_ms=500,
        drain_timeout_s=knobs.pop("drain_timeout_s", 10),
        **knobs,
    )
    worker = Worker(settings, models, spans)
    await worker.start()
    try:
        # A bound, not a target: on a loaded 2-core machine a fresh group on a fresh Apache Kafka topic
        # once took over 10 s to be assigned (CI, 2026-12-06).
        await until(lambda: worker.ready, timeout=30.0)
        yield worker
    finally:
        await worker.drain()
        await worker.stop()


def tiny_models(folder: Path, *names: str) -> dict[str, ServedModel]:
    """Only the named tiny models, loaded from links in ``folder`` (a test's own models dir)."""
    for name in names:
        (folder / name).symlink_to(TINY / name, target_is_directory=True)
    return load_models(folder)


# --- record batches built by hand, sent as a producer sends them ------------------------------


def build_batch(entries: list[tuple[bytes, list[tuple[str, bytes | None]]]], codec: int = 0) -> bytearray:
    """One record batch as a producer sends it (aiokafka's pure-Python builder writes any header name)."""
    builder = _DefaultRecordBatchBuilderPy(
        magic=2,
        compression_type=codec,
        is_transactional=False,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    for offset_delta, (value, headers) in enumerate(entries):
        builder.append(offset_delta, timestamp=None, key=None, value=value, headers=headers)
    return builder.build()


def spoil_compressed(batch: bytearray) -> bytes:
    """The batch with the middle half of its compressed records flipped and its CRC-32C computed again.

    A producer computes the CRC over what it sends, so a batch that does not inflate still has a valid
    one. The v2 batch header (Kafka's protocol guide): CRC at bytes 17-20, covering byte 21 (attributes)
    on; the records start at byte 61. (Eight flipped bytes were not enough: zstd inflated them unnoticed.)
    """
    spoilt = bytearray(batch)
    size = len(spoilt) - 61
    for i in range(61 + size // 4, 61 + 3 * size // 4):
        spoilt[i] ^= 0x5A
    struct.pack_into(">I", spoilt, 17, calc_crc32c(bytes(spoilt[21:])))
    return bytes(spoilt)


class ProduceRefused(Exception):
    """The broker answered a raw produce with an error code (``args[0]``)."""


async def produce_batch(bootstrap: str, tp: TopicPartition, batch: bytes) -> int:
    """Send one prebuilt batch to the partition's leader as a raw ProduceRequest; returns its base offset
    (ProduceRefused with the broker's error code if it refuses the batch)."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        client.add_topic(tp.topic)
        leader = None
        for _ in range(100):  # a topic created just now may have no leader in the metadata yet
            await client.force_metadata_update()
            leader = client.cluster.leader_for_partition(tp)
            if leader is not None and leader >= 0:
                break
            await asyncio.sleep(0.1)
        response = await client.send(
            leader, ProduceRequest(None, -1, 10_000, [(tp.topic, [(tp.partition, batch)])])
        )
        [(_, [(_, error_code, base_offset, *_)])] = response.topics
        if error_code != 0:
            raise ProduceRefused(error_code)
        return int(base_offset)
    finally:
        await client.close()
