"""A steady stream is fetched in rounds of several records; at low load a record goes on at once.

Against a real broker (both kinds): a real aiokafka consumer under the worker's PartitionFetcher.
The arrival rate is primed through the fetcher's own estimator (``arrivals``), and the linger is
long (2 s) against a record every 50 ms, so the assertions hold on a slow, busy machine.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from aiokafka import AIOKafkaConsumer

from tests.kafka_support import raw_producer, until
from worker.kafka.fetching import PartitionFetcher
from worker.kafka.topics import create_topics

pytestmark = [pytest.mark.kafka, pytest.mark.asyncio]

LINGER_MS = 2000


async def _consumer(bootstrap: str, topic: str) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"g-{topic}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=20,
    )
    await consumer.start()
    await until(lambda: bool(consumer.assignment()), timeout=30)
    return consumer


async def test_a_steady_stream_is_taken_in_rounds_of_several_records(kafka_bootstrap: str) -> None:
    topic = f"linger-{uuid.uuid4().hex[:8]}"
    await create_topics(kafka_bootstrap, [topic], partitions=1)
    consumer = await _consumer(kafka_bootstrap, topic)
    try:
        fetcher = PartitionFetcher(consumer, linger_ms=LINGER_MS)
        loop = asyncio.get_running_loop()
        fetcher.arrivals.add(loop.time(), 100)  # a stream of about 100 records a second so far
        async with raw_producer(kafka_bootstrap) as producer:

            async def stream() -> None:
                for i in range(10):
                    await producer.send_and_wait(topic, f"r{i}".encode())
                    await asyncio.sleep(0.05)

            streaming = asyncio.create_task(stream())
            began = time.monotonic()
            round_ = await fetcher.fetch(256, timeout_ms=10_000)
            took = time.monotonic() - began
            await streaming
        assert len(round_.records) >= 5, (
            "the records that came within the linger joined the first one's round"
        )
        assert [r.value for r in round_.records] == [f"r{i}".encode() for i in range(len(round_.records))]
        assert took >= LINGER_MS / 1000 * 0.9
    finally:
        await consumer.stop()


async def test_at_low_load_a_round_goes_on_with_its_first_record(kafka_bootstrap: str) -> None:
    topic = f"linger-{uuid.uuid4().hex[:8]}"
    await create_topics(kafka_bootstrap, [topic], partitions=1)
    consumer = await _consumer(kafka_bootstrap, topic)
    try:
        fetcher = PartitionFetcher(consumer, linger_ms=LINGER_MS)  # no arrivals yet: an idle stream
        async with raw_producer(kafka_bootstrap) as producer:
            await producer.send_and_wait(topic, b"only")
            began = time.monotonic()
            round_ = await fetcher.fetch(256, timeout_ms=10_000)
            took = time.monotonic() - began
        assert [r.value for r in round_.records] == [b"only"]
        assert took < LINGER_MS / 1000 / 2, "nothing else was due: no linger"
        assert fetcher.arrivals.per_s(asyncio.get_running_loop().time()) > 0, "the round counts as an arrival"
    finally:
        await consumer.stop()
