"""tansu's tailing readers can skip a batch that several producers write to one partition at once.

    python -m bench.tansu_tailing_readers [--producers 8] [--records 1500] [--hogs 4] [--rounds 2] [--apache]

tansu (the embedded broker) gives a produce its offsets first (the partition's high watermark moves on)
and stores the batch after; a fetch lists the batches stored below the high watermark and returns
those from the reader's position on. A batch whose offsets were given out but which is not stored yet
is skipped by a reader that fetches in between, when a later batch (another producer's) is stored
already: the reader's position moves past it, and it never reads it. A read from the start, later,
finds it. One producer per partition cannot meet it (aiokafka's producer has one request in flight per
broker); several can: the workers' replies on one reply topic, several clients' requests, the crash
markers of several workers.

This script writes ``--producers`` x ``--records`` records (batches of ten) to one partition of a fresh
embedded broker, with four consumers reading it as it grows, then reads it again from the start. On the
2-core project machine it took CPU pressure (``--hogs`` busy processes) to show: 2026-12-07, 4 hogs,
8 x 1,500 records: one round all 12,000 read by all four, the next 11,970 / 11,990 / 12,000 / 11,990 read
while a read from the start found all 12,000. ``--apache`` runs the same against Apache Kafka 4.4 (``make
kafka``'s jars), whose high watermark moves only once a batch is in the log: no gap there.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.worker_processes import read_from_start
from worker.kafka.apache_broker import ApacheKafka
from worker.kafka.embedded_broker import EmbeddedBroker
from worker.kafka.topics import create_topics

TOPIC = "tailing"
READERS = 4
BATCH = 10


def _hog(until: float) -> None:
    while time.monotonic() < until:
        pass


async def _produce(bootstrap: str, producer: int, records: int) -> None:
    client = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False, linger_ms=2)
    await client.start()
    try:
        for batch in range(records // BATCH):
            sends = [
                await client.send(TOPIC, b"x", key=f"{producer}-{batch}-{i}".encode(), partition=0)
                for i in range(BATCH)
            ]
            await asyncio.gather(*sends)
    finally:
        await client.stop()


async def one_round(producers: int, records: int, apache: bool = False) -> tuple[int, list[int], int]:
    """Written, read by each tailing reader, read from the start afterwards."""
    async with ApacheKafka() if apache else EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        await create_topics(bootstrap, [TOPIC], 1)
        readers = [
            AIOKafkaConsumer(
                TOPIC,
                bootstrap_servers=bootstrap,
                group_id=None,
                auto_offset_reset="earliest",
                fetch_max_wait_ms=5,
            )
            for _ in range(READERS)
        ]
        seen: list[set[bytes]] = [set() for _ in readers]

        async def tail(reader: AIOKafkaConsumer, keys: set[bytes]) -> None:
            async for record in reader:
                if record.key is not None:
                    keys.add(record.key)

        for reader in readers:
            await reader.start()
        tails = [asyncio.create_task(tail(r, k)) for r, k in zip(readers, seen, strict=True)]
        try:
            await asyncio.gather(*(_produce(bootstrap, p, records) for p in range(producers)))
            await asyncio.sleep(3)  # the tailing readers catch up with everything stored
        finally:
            for task in tails:
                task.cancel()
            await asyncio.gather(*tails, return_exceptions=True)
            for reader in readers:
                await reader.stop()
        again = {r.key for r in await read_from_start(bootstrap, TOPIC)}
    return producers * (records // BATCH) * BATCH, [len(k) for k in seen], len(again)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--producers", type=int, default=8)
    parser.add_argument("--records", type=int, default=1500, help="records per producer")
    parser.add_argument("--hogs", type=int, default=4, help="busy processes beside it (CPU pressure)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--apache", action="store_true", help="Apache Kafka 4.4 instead (the control)")
    args = parser.parse_args()
    hogs = [
        multiprocessing.Process(target=_hog, args=(time.monotonic() + 600,), daemon=True)
        for _ in range(args.hogs)
    ]
    for hog in hogs:
        hog.start()
    try:
        for n in range(args.rounds):
            written, tailed, again = asyncio.run(one_round(args.producers, args.records, args.apache))
            print(
                f"round {n + 1}: {written} written; tailing readers read {tailed}; a read from the start {again}"
            )
    finally:
        for hog in hogs:
            hog.terminate()


if __name__ == "__main__":
    main()
