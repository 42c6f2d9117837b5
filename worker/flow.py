"""Flow: which offsets are answered, what may be committed, when partitions pause, rebalances.

Invariant 1 of DESIGN.md is kept here with worker/offsets.py: a partition is committed only
past a contiguous run of answered messages. Backpressure pauses every partition above
``max_in_flight`` requests or ``max_in_flight_bytes`` and resumes below half of both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from worker.offsets import OffsetTracker
from worker.settings import Settings

log = logging.getLogger(__name__)


class Flow:
    """Offsets, commits and pausing over one consumer (set once it is started)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self.consumer: AIOKafkaConsumer | None = None
        self.paused = False
        #: while draining nothing resumes, and newly assigned partitions start paused
        self.draining = False
        self._commit_lock = asyncio.Lock()
        self._progress = asyncio.Event()
        #: called with the revoked partitions once their answers are in (the fetcher forgets them)
        self.on_revoked: Callable[[Collection[TopicPartition]], None] | None = None
        #: awaited with the revoked partitions after their commit, before they are forgotten (quarantine)
        self.on_revoking: Callable[[Collection[TopicPartition]], Awaitable[None]] | None = None

    def progressed(self) -> None:
        """Wake whoever waits for answers (``wait_until``)."""
        self._progress.set()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate`` holds, re-checking whenever requests make progress."""
        while not predicate():
            self._progress.clear()
            await self._progress.wait()

    async def wait_answered(self, partitions: Collection[TopicPartition]) -> None:
        """Wait until nothing fetched from ``partitions`` is unanswered."""
        await self.wait_until(lambda: not self.tracker.pending(partitions))

    async def commit(self) -> None:
        """Commit every partition position that advanced (explicit offsets)."""
        async with self._commit_lock:
            commits = self.tracker.take_commits()
            consumer = self.consumer
            if consumer is None or not commits:
                return
            owned = {tp: offset for tp, offset in commits.items() if tp in consumer.assignment()}
            if not owned:
                return
            try:
                await consumer.commit(owned)
            except KafkaError as exc:
                # Lost partitions or a rebalance in progress: the messages come back, as duplicates at worst.
                log.warning("commit of %s failed: %s", owned, exc)

    def apply_backpressure(self) -> None:
        """Pause every partition above max_in_flight requests or bytes; resume below half of both."""
        s = self.settings
        count, held = self.tracker.in_flight, self.tracker.bytes_in_flight
        if not self.paused and (count >= s.max_in_flight or held >= s.max_in_flight_bytes):
            self.paused = True
            if self.consumer is not None:
                self.consumer.pause(*self.consumer.assignment())
            log.info("backpressure: %d requests (%d bytes) in flight, partitions paused", count, held)
        elif (
            self.paused
            and count <= s.max_in_flight // 2
            and held <= s.max_in_flight_bytes // 2
            and not self.draining
        ):
            self.paused = False
            if self.consumer is not None:
                self.consumer.resume(*self.consumer.assignment())
            log.info("backpressure: %d requests (%d bytes) in flight, partitions resumed", count, held)

    def pause_all(self) -> None:
        """Stop fetching for good (drain)."""
        self.draining = True
        if self.consumer is not None:
            self.consumer.pause(*self.consumer.assignment())

    def redeliver(self, tp: TopicPartition, offset: int, why: BaseException) -> None:
        """Read ``offset`` of ``tp`` again (its answer could not be published); during a drain, leave it."""
        if self.draining:
            log.warning("%s offset %d stays uncommitted (%s)", tp, offset, why)
            return
        log.warning("%s offset %d will be read again (%s)", tp, offset, why)
        self.tracker.rewind(tp, offset)
        if self.consumer is not None and tp in self.consumer.assignment():
            self.consumer.seek(tp, offset)

    async def partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        """Before partitions move away: answer what was fetched from them (bounded), commit, forget them."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.session_timeout_ms / 2000):
                await self.wait_answered(revoked)
        await self.commit()
        if self.on_revoking is not None:
            await self.on_revoking(revoked)
        self.tracker.forget(revoked)
        if self.on_revoked is not None:
            self.on_revoked(revoked)

    def partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        """New partitions start paused while backpressure or a drain holds the others."""
        if (self.paused or self.draining) and assigned and self.consumer is not None:
            self.consumer.pause(*assigned)


class Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Hands aiokafka's rebalance callbacks to the flow, logging each assignment."""

    def __init__(self, flow: Flow) -> None:
        self.flow = flow

    async def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        log.info("revoked partitions: (%s)", ", ".join(map(repr, sorted(revoked))))
        if revoked:
            await self.flow.partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        log.info("assigned to partitions: (%s)", ", ".join(map(repr, sorted(assigned))))
        self.flow.partitions_assigned(assigned)
