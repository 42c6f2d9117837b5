"""A test's own request stream over real worker processes (bench/worker_processes.py starts them).

Requests go out through a raw aiokafka producer and replies come back through a
group-less consumer: the tests see the wire, not the project's client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

# The process helpers live in bench/worker_processes.py (the soak and chaos runs use them too).
from bench.worker_processes import FAST_GROUP_FLAGS as FAST_GROUP_FLAGS
from bench.worker_processes import Reply, WorkerProcess, read_from_start, wait_until
from bench.worker_processes import WorkerLauncher as WorkerLauncher
from bench.worker_processes import replies_agree as replies_agree
from schemas.topics import requests_topic, results_topic
from worker.kafka.topics import create_topics


@dataclass
class Stream:
    """A test's own topics: text requests (N partitions) and one single-partition reply topic.

    Requests go out with a raw producer, round-robin over the partitions; a group-less
    consumer collects every reply by request id. A sentinel record on the reply topic
    (``settle()``) marks the point up to which every earlier reply has been collected.

    tansu can skip a batch for a reader at the end of a partition that several producers write at
    once (the workers' replies; docs/kafka-notes.md): a wait that would fail reads the reply topic
    again from its start first, taking only the offsets the collector has not seen (``catch_up``).
    """

    bootstrap: str
    prefix: str = field(default_factory=lambda: f"p{uuid.uuid4().hex[:12]}")
    partitions: int = 4
    #: what the reply collector reads: read_committed skips replies of aborted or open transactions
    isolation_level: str = "read_uncommitted"
    #: an idempotent request producer: a send retried after a lost acknowledgement (a network cut) is not
    #: written twice; the embedded broker refuses it (InitProducerId)
    idempotent: bool = False
    sent: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (partition, offset)
    replies: dict[str, list[Reply]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.group_id = f"{self.prefix}-group"
        self.requests_topic = requests_topic("text", self.prefix)
        self.reply_topic = f"{self.prefix}.replies.stream"
        self.results_topic = results_topic("text", self.prefix)
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._sentinels: set[str] = set()
        #: reply-topic offsets taken (by the collector or a catch-up), each once
        self._taken: set[int] = set()
        self._next = 0

    async def start(self) -> None:
        await create_topics(self.bootstrap, [self.requests_topic], self.partitions)
        await create_topics(self.bootstrap, [self.reply_topic], 1)
        # Idempotence off unless asked: the embedded broker refuses InitProducerId (docs/kafka-notes.md).
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=self.idempotent, linger_ms=5
        )
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            self.reply_topic,
            bootstrap_servers=self.bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            isolation_level=self.isolation_level,
        )
        await self._consumer.start()
        self._reader = asyncio.create_task(self._read(self._consumer), name="reply-collector")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        async for record in consumer:
            self._take(record)

    def _take(self, record: ConsumerRecord[bytes, bytes]) -> bool:
        """Collect one reply-topic record, once per offset; whether it was new."""
        if record.offset in self._taken:
            return False
        self._taken.add(record.offset)
        headers = {k: bytes(v).decode() for k, v in record.headers or () if v is not None}
        if "sentinel" in headers:
            self._sentinels.add(headers["sentinel"])
            return True
        body = json.loads(record.value)
        key = record.key.decode() if record.key is not None else None
        reply = Reply(body["id"], key, headers.get("correlation_id"), body)
        self.replies.setdefault(reply.id, []).append(reply)
        return True

    async def catch_up(self) -> int:
        """Read the reply topic again from its start, collecting what the collector skipped; how many."""
        found = 0
        for record in await read_from_start(self.bootstrap, self.reply_topic, self.isolation_level):
            found += self._take(record)
        if found:
            print(f"the reply collector had skipped {found} records; a read from the start found them")
        return found

    def body(self, request_id: str, text: str = "the weather is fine") -> bytes:
        return json.dumps(
            {"id": request_id, "model": "bert", "inputs": {"text": f"request {request_id}: {text}"}}
        ).encode()

    async def send(
        self,
        count: int,
        partition: int | None = None,
        reply_to: str | None = None,
        text: str = "the weather is fine",
    ) -> list[str]:
        """Produce ``count`` requests (round-robin over partitions, or all to ``partition``); acked on return."""
        assert self._producer is not None, "Stream.start() first"
        ids, deliveries = [], []
        for _ in range(count):
            request_id = f"{self.prefix}-{self._next:06d}"
            target = self._next % self.partitions if partition is None else partition
            self._next += 1
            deliveries.append(
                await self._producer.send(
                    self.requests_topic,
                    self.body(request_id, text),
                    key=request_id.encode(),
                    partition=target,
                    headers=[
                        ("correlation_id", request_id.encode()),
                        ("reply_to", (reply_to or self.reply_topic).encode()),
                        ("content-type", b"application/json"),
                    ],
                )
            )
            ids.append(request_id)
        for request_id, metadata in zip(ids, await asyncio.gather(*deliveries), strict=True):
            self.sent[request_id] = (metadata.partition, metadata.offset)
        return ids

    @contextlib.asynccontextmanager
    async def steadily(self, per_tick: int, tick_s: float = 0.05) -> AsyncIterator[list[str]]:
        """Send ``per_tick`` requests every ``tick_s`` while the block runs; yields the growing list of ids."""
        sent: list[str] = []
        producing = asyncio.Event()
        producing.set()

        async def produce() -> None:
            while producing.is_set():
                sent.extend(await self.send(per_tick))
                await asyncio.sleep(tick_s)

        producer = asyncio.create_task(produce())
        try:
            yield sent
        finally:
            producing.clear()
            await producer

    def answered(self, ids: Iterable[str] | None = None) -> int:
        """How many of ``ids`` (all sent when None) have at least one reply."""
        return sum(1 for request_id in (self.sent if ids is None else ids) if request_id in self.replies)

    def missing(self, ids: Iterable[str] | None = None) -> list[str]:
        return [i for i in (self.sent if ids is None else ids) if i not in self.replies]

    async def wait_answered(
        self, ids: Sequence[str] | None, within: float, watch: Iterable[WorkerProcess] = ()
    ) -> None:
        """Until every one of ``ids`` (all sent when None) has a reply (after a catch-up, at worst)."""
        wanted = list(self.sent if ids is None else ids)
        try:
            await wait_until(lambda: self.answered(wanted) == len(wanted), within, "replies", watch)
        except TimeoutError as timeout:
            await self.catch_up()
            missing = self.missing(wanted)
            if not missing:
                return
            where = ", ".join(f"{i} at {self.sent.get(i)}" for i in missing[:20])
            raise TimeoutError(
                f"replies to all {len(wanted)} requests: {len(missing)} missing, the reply topic read again "
                f"(id at (partition, offset): {where}); the group's committed offsets "
                f"{await self.committed()}, the ends {self.committed_end()}; "
                f"{await self.found_on(self.results_topic, missing)} of them on the results topic; "
                f"the reply collector {self._collector_state()}\n{timeout}"
            ) from None

    def _collector_state(self) -> str:
        reader = self._reader
        if reader is None or not reader.done():
            return "is running"
        return f"ended: {reader.exception()!r}" if not reader.cancelled() else "was cancelled"

    async def found_on(self, topic: str, ids: Collection[str]) -> str:
        """How many of ``ids`` have a record keyed by them on ``topic``; a failure to look, said."""
        try:
            records = await read_from_start(self.bootstrap, topic, self.isolation_level)
            keys = {r.key.decode() for r in records if r.key is not None}
        except Exception as exc:  # a diagnostic: never hide the failure it explains
            return f"? ({exc!r})"
        return str(len(keys & set(ids)))

    async def settle(self, within: float = 30.0) -> None:
        """Until every reply written before now has been collected (a sentinel went round)."""
        assert self._producer is not None
        token = uuid.uuid4().hex
        await self._producer.send_and_wait(self.reply_topic, b"{}", headers=[("sentinel", token.encode())])
        try:
            await wait_until(lambda: token in self._sentinels, within, "the reply-topic sentinel")
        except TimeoutError:
            await self.catch_up()
            if token not in self._sentinels:
                raise

    def duplicates(self) -> int:
        """Replies beyond the first, over all requests."""
        return sum(len(replies) - 1 for replies in self.replies.values())

    def committed_end(self) -> dict[int, int]:
        """Per partition, the offset after the last request sent to it (what a full commit reaches)."""
        ends: dict[int, int] = {}
        for partition, offset in self.sent.values():
            ends[partition] = max(ends.get(partition, 0), offset + 1)
        return ends

    async def committed(self) -> dict[int, int | None]:
        """The group's committed offset of each request partition (no join: committed() only)."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=self.group_id, enable_auto_commit=False
        )
        await consumer.start()
        try:
            return {
                p: await consumer.committed(TopicPartition(self.requests_topic, p))
                for p in range(self.partitions)
            }
        finally:
            await consumer.stop()
