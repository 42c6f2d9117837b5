"""The quarantine topic: one partition's crash marker written (acknowledged), the latest ones read back."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from worker.kafka.crash_markers import Marker

#: The quarantine topic's settings where the broker takes them: only the latest marker per key matters.
COMPACTED = {"cleanup.policy": "compact"}

#: Longest the first round after an assignment waits to read the markers (it is then read again).
CATCH_UP_BUDGET_S = 30.0


class MarkerLog:
    """The quarantine topic: write one partition's marker (acknowledged), read back the latest ones.

    Markers have a producer of their own: behind the replies' batches in the shared producer a
    marker's ack took 14 ms (median) to 470 ms in a flood (bench/quarantine_cost.py), and each
    round waits for it.
    """

    def __init__(self, topic: str, group: str, producer: AIOKafkaProducer, reader: AIOKafkaConsumer) -> None:
        self.topic = topic
        self.group = group
        self.producer = producer
        self.reader = reader
        self._latest: dict[str, Marker] = {}
        self._source = TopicPartition(topic, 0)

    def key(self, tp: TopicPartition) -> str:
        """The marker's key: one per group, topic and partition."""
        return f"{self.group}/{tp.topic}/{tp.partition}"

    async def start(self) -> None:
        """Start the producer (its metadata for the topic fetched now, not at the first round) and the
        group-less reader on the topic's one partition, from its beginning."""
        await self.producer.start()
        await self.producer.partitions_for(self.topic)
        await self.reader.start()
        self.reader.assign([self._source])
        await self.reader.seek_to_beginning(self._source)
        await self.catch_up()  # the reader's first offset look-ups now, not in the first round

    async def write(self, tp: TopicPartition, marker: Marker) -> None:
        """Publish ``marker`` for ``tp``; returns once the broker has acknowledged it."""
        key = self.key(tp)
        await self.producer.send_and_wait(self.topic, marker.to_json(), key=key.encode(), partition=0)

    async def catch_up(self) -> None:
        """Read the topic up to its end as of now (only what arrived since the last call).

        Bounded (TimeoutError): aiokafka's getmany returns nothing for as long as the broker is away.
        """
        async with asyncio.timeout(CATCH_UP_BUDGET_S):
            end = (await self.reader.end_offsets([self._source]))[self._source]
            while await self.reader.position(self._source) < end:
                batches = await self.reader.getmany(self._source, timeout_ms=1000)
                for record in batches.get(self._source, []):
                    marker = Marker.from_json(record.value or b"")
                    if record.key is not None and marker is not None:
                        self._latest[record.key.decode("utf-8", "replace")] = marker

    def latest(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, Marker]:
        """The last marker of each partition as of the last ``catch_up``."""
        found = {tp: self._latest.get(self.key(tp)) for tp in partitions}
        return {tp: marker for tp, marker in found.items() if marker is not None}

    async def close(self) -> None:
        """Stop the producer and the reader."""
        await asyncio.gather(self.producer.stop(), self.reader.stop())
