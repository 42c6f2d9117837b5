"""The load generator: JSON requests produced to Kafka, replies timed by their record timestamps."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.stats import percentiles

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Send and reply times of one load run, by request id."""

    sent: dict[str, float]
    received: dict[str, tuple[float, bytes]]
    offered_rate: float | None

    @property
    def answered(self) -> int:
        """Replies that arrived."""
        return len(self.received)

    def latencies_ms(self) -> list[float]:
        """Reply time minus send time, per answered request."""
        return [1000 * (self.received[i][0] - t) for i, t in self.sent.items() if i in self.received]

    def throughput(self) -> float:
        """Requests per second from the first send to the last reply."""
        if not self.received:
            return 0.0
        last = max(t for t, _ in self.received.values())
        return self.answered / max(last - min(self.sent.values()), 1e-9)

    def summary(self) -> dict[str, Any]:
        """Throughput, latency percentiles, and what the worker's replies say about batching."""
        batch_sizes, inference_ms, queue_ms, errors = [], [], [], 0
        for _, body in self.received.values():
            reply = json.loads(body)
            if "error" in reply:
                errors += 1
            timing = reply.get("timing")
            if timing:
                batch_sizes.append(float(timing["batch_size"]))
                inference_ms.append(float(timing["inference_ms"]))
                queue_ms.append(float(timing["queue_ms"]))
        summary: dict[str, Any] = {
            "requests": len(self.sent),
            "answered": self.answered,
            "errors": errors,
            "offered_per_s": round(self.offered_rate, 1) if self.offered_rate else None,
            "throughput_per_s": round(self.throughput(), 1),
            "latency_ms": percentiles(self.latencies_ms(), (50, 90, 99)),
        }
        if batch_sizes:
            summary["batch_size"] = {
                "mean": round(float(np.mean(batch_sizes)), 1),
                **percentiles(batch_sizes),
            }
            summary["batch_inference_ms"] = percentiles(inference_ms, (50, 90, 99))
            # From the request's producer timestamp to the start of its batch: intake + batcher wait.
            summary["queue_ms"] = percentiles(queue_ms, (50, 90, 99))
        return summary


class LoadClient:
    """Produces JSON requests and times the replies, which every system sends to one private topic."""

    def __init__(self, bootstrap: str, model: str) -> None:
        self.bootstrap = bootstrap
        self.reply_topic = f"bench-replies-{uuid.uuid4().hex[:8]}"
        self.model = model
        self._received: dict[str, tuple[float, bytes]] = {}
        self._waiting: set[str] = set()
        self._done = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._producer: Any = None
        self._consumer: Any = None

    async def __aenter__(self) -> LoadClient:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

        from worker.kafka.topics import create_topics

        await create_topics(self.bootstrap, [self.reply_topic])
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, enable_idempotence=False, max_batch_size=512 * 1024
        )
        self._consumer = AIOKafkaConsumer(
            self.reply_topic,
            bootstrap_servers=self.bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            # Replies are timed by their record timestamps (set by the replier's producer), so a
            # slow fetch costs nothing; a short one would (tansu answers a fetch only when its
            # wait runs out: a 5 ms loop cost the broker a third of a core on 2 cores).
            fetch_max_wait_ms=100,
        )
        await self._producer.start()
        await self._consumer.start()
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self._consumer.stop()
        await self._producer.stop()

    async def _read(self) -> None:
        while True:
            fetched = await self._consumer.getmany(timeout_ms=50, max_records=2000)
            now = time.time()
            for records in fetched.values():
                for record in records:
                    key = record.key.decode() if record.key else ""
                    if key in self._waiting:
                        # CreateTime (type 0) is when the replier produced it; else when it arrived.
                        produced = record.timestamp / 1000 if record.timestamp_type == 0 else 0.0
                        self._received[key] = (produced if produced > 0 else now, record.value)
                        self._waiting.discard(key)
            if not self._waiting:
                self._done.set()
                self._consumer.pause(*self._consumer.assignment())  # no fetching between runs

    async def run(
        self, topic: str, texts: Sequence[str], *, rate: float | None = None, limit_s: float | None = None
    ) -> Run:
        """Send one request per text to ``topic`` (all at once, or ``rate`` per second); await the replies."""
        prefix = uuid.uuid4().hex[:8]
        bodies = [
            (f"{prefix}-{i}", json.dumps({"id": f"{prefix}-{i}", "model": self.model, "inputs": {"text": t}}))
            for i, t in enumerate(texts)
        ]
        self._received = {}
        self._waiting = {rid for rid, _ in bodies}
        self._done.clear()
        self._consumer.resume(*self._consumer.assignment())
        sent: dict[str, float] = {}
        began = time.perf_counter()
        for index, (rid, body) in enumerate(bodies):
            if rate:
                delay = began + index / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif index % 64 == 0:
                await asyncio.sleep(0)  # let the reply reader take early replies
            sent[rid] = time.time()  # the clock Kafka record timestamps use
            await self._producer.send(
                topic,
                body.encode(),
                key=rid.encode(),
                headers=[("correlation_id", rid.encode()), ("reply_to", self.reply_topic.encode())],
            )
        limit = limit_s if limit_s is not None else 120 + len(texts) / 2  # a safety net, not a target
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._done.wait(), limit)
        self._waiting = set()
        if len(self._received) < len(sent):
            log.warning(
                "%d of %d requests unanswered after %.0f s", len(sent) - len(self._received), len(sent), limit
            )
        return Run(sent, self._received, rate)
