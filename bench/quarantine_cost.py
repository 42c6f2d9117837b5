"""What the poison-pill quarantine costs per request: marker produces per round, the time the fetch
loop waits for their acks, and the wall clock against the same worker with the quarantine passed
through (``python -m bench.quarantine_cost``; about two minutes on the embedded broker).

One in-process Worker (the tiny bert) on a fresh embedded broker, four request partitions: a flood
(every request produced at once) and a paced stream. Each marker write is counted and each
``Quarantine.admit`` (arming the round's markers, waiting for their acks) is timed by wrapping
them; the worker code is not changed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.samples import request_bytes
from bench.worker_processes import wait_until
from schemas.topics import requests_topic, results_topic
from worker.app import Worker
from worker.demo import TINY_MODELS
from worker.kafka.crash_markers import Marker
from worker.kafka.embedded_broker import EmbeddedBroker
from worker.kafka.fetching import Fetched
from worker.kafka.quarantine import Admitted
from worker.kafka.topics import create_topics
from worker.serving.registry import load_models
from worker.settings import Settings


class Meter:
    """Marker writes and admit times, counted by wrapping the worker's quarantine.

    ``baseline``: admit passes every round through untouched and writes nothing (the worker as it
    would run without the quarantine), for the wall-clock comparison.
    """

    def __init__(self, worker: Worker, *, baseline: bool) -> None:
        quarantine = worker.fetch_loop.quarantine
        assert quarantine is not None
        self.writes = 0
        self.admits: list[float] = []
        write = quarantine.markers.write
        admit = _pass_through if baseline else quarantine.admit

        async def counted_write(tp: TopicPartition, marker: Marker) -> None:
            self.writes += 1
            await write(tp, marker)

        async def timed_admit(
            fetched: Any, epochs: Mapping[TopicPartition, int], generation: int
        ) -> Admitted | None:
            started = time.perf_counter()
            try:
                return await admit(fetched, epochs, generation)
            finally:
                self.admits.append(time.perf_counter() - started)

        quarantine.markers.write = counted_write  # type: ignore[method-assign]
        quarantine.admit = timed_admit  # type: ignore[method-assign]

    def take(self) -> tuple[int, list[float]]:
        """Writes and admit times since the last call."""
        taken = (self.writes, self.admits)
        self.writes, self.admits = 0, []
        return taken


async def _pass_through(fetched: Fetched, epochs: Mapping[TopicPartition, int], generation: int) -> Admitted:
    return Admitted(fetched, [])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def _phase(
    name: str, meter: Meter, send: Callable[[], Awaitable[int]], answered: Callable[[], int]
) -> dict[str, Any]:
    meter.take()
    before = answered()
    started = time.perf_counter()
    count = await send()
    await wait_until(lambda: answered() >= before + count, 600, f"the replies of the {name} phase")
    wall = time.perf_counter() - started
    writes, admits = meter.take()
    return {
        "phase": name,
        "requests": count,
        "rounds": len(admits),
        "marker_writes": writes,
        "marker_writes_per_request": round(writes / count, 3),
        "admit_ms_p50": round(1000 * _percentile(admits, 0.5), 2),
        "admit_ms_p99": round(1000 * _percentile(admits, 0.99), 2),
        "admit_s_total": round(sum(admits), 3),
        "wall_s": round(wall, 2),
    }


async def measure(flood: int, rate: float, seconds: float, *, baseline: bool) -> list[dict[str, Any]]:
    """The flood and the paced phase on a fresh embedded broker; one row of figures each."""
    prefix = f"qc{uuid.uuid4().hex[:8]}"
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        topic = requests_topic("text", prefix)
        await create_topics(bootstrap, [topic, results_topic("text", prefix)], 4)
        settings = Settings.model_validate(
            {"bootstrap_servers": bootstrap, "topic_prefix": prefix, "group_id": f"{prefix}-g"}
        )
        worker = Worker(settings, load_models(TINY_MODELS / "bert"))
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False)
        replies = AIOKafkaConsumer(
            results_topic("text", prefix),
            bootstrap_servers=bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
        )
        seen = 0

        async def read() -> None:
            nonlocal seen
            async for _ in replies:
                seen += 1

        await worker.start()
        await producer.start()
        await replies.start()
        reader = asyncio.create_task(read())
        sent = 0

        async def produce(count: int) -> None:
            nonlocal sent
            acks = []
            for _ in range(count):
                body = request_bytes(f"r{sent}", "bert", {"text": f"request {sent}: the weather is fine"})
                acks.append(await producer.send(topic, body, key=f"r{sent}".encode()))
                sent += 1
            await asyncio.gather(*acks)

        async def flood_all() -> int:
            await produce(flood)
            return flood

        async def paced() -> int:
            count = int(rate * seconds)
            for _ in range(count):
                await produce(1)
                await asyncio.sleep(1 / rate)
            return count

        try:
            await wait_until(lambda: worker.ready, 60, "the worker ready")
            meter = Meter(worker, baseline=baseline)
            rows = [
                await _phase("flood", meter, flood_all, lambda: seen),
                await _phase(f"paced {rate:g}/s", meter, paced, lambda: seen),
            ]
            return [{"quarantine": not baseline, **row} for row in rows]
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await replies.stop()
            await producer.stop()
            await worker.drain()
            await worker.stop()


def main() -> None:
    """Print the figures as JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--flood", type=int, default=2000, help="requests produced at once")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second in the paced phase")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the paced phase")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each configuration, alternating")
    args = parser.parse_args()
    for _ in range(args.repeats):
        for baseline in (False, True):
            for row in asyncio.run(measure(args.flood, args.rate, args.seconds, baseline=baseline)):
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
