"""Flow: which offsets are answered, what may be committed, when partitions pause, rebalances.

Invariant 1 of DESIGN.md is kept here with worker/kafka/offsets.py: a partition is committed only
past a contiguous run of answered messages. Backpressure pauses every partition above
``max_in_flight`` requests or ``max_in_flight_bytes`` and resumes below half of both; while
paused the consumer is still polled, so aiokafka's max_poll_interval_ms keeps the membership.

Rewinds only move a partition back: a give-up rewinds only while its message is still tracked
in the epoch it was fetched in (worker/kafka/offsets.py), and the seek is made by the fetch loop
between rounds (``apply_seeks``), to the lowest offset given up since the last round. Records
of a round that a rewind overtook are refused by the tracker and read again after the seek. A
round that a revoke overtook is dropped whole and its partitions sought to their committed
offsets (``generation``): aiokafka's getmany waits out a reassignment and then returns records
of the new assignment, so such a round's records could belong to either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import ConsumerStoppedError, KafkaError

from worker.kafka.offsets import OffsetTracker
from worker.settings import Settings

log = logging.getLogger(__name__)

#: The longest the commit before a revoke and the quarantine's release after it may take together (aiokafka
#: retries a commit while the coordinator is away); also the bound of one try to seek to committed offsets.
REVOKE_COMMIT_S = 5.0
#: The first and the longest pause between tries to read the committed offsets to seek to.
SEEK_RETRY_S = 0.5
SEEK_RETRY_MAX_S = 4.0


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
        #: awaited with the revoked partitions after their commit, before they are forgotten (quarantine),
        #: and the seconds left of REVOKE_COMMIT_S for it
        self.on_revoking: Callable[[Collection[TopicPartition], float], Awaitable[None]] | None = None
        #: called after a rewind or a revoke dropped tracked work (the worker drops it from its batchers)
        self.on_dropped: Callable[[], None] | None = None
        #: called each time the committed offsets to seek to could not be read (readiness counts it)
        self.on_seek_failed: Callable[[BaseException], None] | None = None
        #: awaited before partitions are sought to their committed offsets (exactly-once: until no
        #: transaction of theirs is still committing, else the offsets read would miss its commit)
        self.before_seek_to_committed: Callable[[Collection[TopicPartition]], Awaitable[None]] | None = None
        #: exactly-once: the offset this worker's own last transaction committed for a partition, which the
        #: group's committed offsets may not show yet (a transaction's markers are written after its commit)
        self.own_commit: Callable[[TopicPartition], int | None] | None = None
        #: by owner (the quarantine, the transactions), the partitions it keeps paused whatever backpressure
        #: does: a resume of every partition would let them be read before their turn
        self.kept_paused: dict[str, Callable[[], Collection[TopicPartition]]] = {}
        #: partition -> lowest offset given up since the fetch loop last sought
        self._seeks: dict[TopicPartition, int] = {}
        #: moved by every revoke: a fetch round that a revoke overtook cannot tell the records of the
        #: old assignment from those of the new one (aiokafka's getmany waits out a reassignment)
        self.generation = 0

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
        """Commit every partition position that advanced (explicit offsets).

        A commit that fails or is cancelled (a bounded revoke) hands its positions back, so the
        next commit carries them.
        """
        async with self._commit_lock:
            commits = self.tracker.take_commits()
            if self.settings.delivery == "exactly-once":
                return  # offsets are committed inside the transactions only (worker/kafka/transactions.py)
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
                self.tracker.restore_commits(owned)
            except asyncio.CancelledError:
                self.tracker.restore_commits(owned)
                raise

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
                kept = set().union(*(partitions() for partitions in self.kept_paused.values()))
                self.consumer.resume(*(self.consumer.assignment() - kept))
            log.info("backpressure: %d requests (%d bytes) in flight, partitions resumed", count, held)

    def pause_all(self) -> None:
        """Stop fetching for good (drain)."""
        self.draining = True
        if self.consumer is not None:
            self.consumer.pause(*self.consumer.assignment())

    async def keep_membership(self, wait_ms: int) -> None:
        """While every assigned partition is paused, poll the consumer anyway (for ``wait_ms``).

        aiokafka leaves the group once no ``getmany`` ran for max_poll_interval_ms
        (``SubscriptionState.fetcher_idle_time``, aiokafka 0.14); a poll over paused partitions
        returns nothing but counts. A record it returns all the same (a partition assigned during
        the wait) is sought back to, so it is read again by the fetch loop.
        """
        consumer = self.consumer
        if consumer is None or not consumer.assignment() or not consumer.assignment() <= consumer.paused():
            await asyncio.sleep(wait_ms / 1000)
            return
        try:
            taken = await consumer.getmany(timeout_ms=wait_ms, max_records=1)
        except ConsumerStoppedError:
            raise
        except Exception as exc:
            # A broker error, or a record that does not decode in a partition resumed during the
            # wait: aiokafka raises before it takes that record, so the fetch loop meets it next
            # (and skips it to the DLQ); ending the loop here would rewind every partition.
            log.debug("polling the paused consumer failed: %r", exc)
            await asyncio.sleep(wait_ms / 1000)
            return
        for tp, records in taken.items():
            if records:
                consumer.seek(tp, records[0].offset)

    def redeliver(self, tp: TopicPartition, offset: int, epoch: int, why: BaseException) -> None:
        """Read ``offset`` of ``tp`` again (its answer could not be published); during a drain, leave it.

        Only a message still tracked in ``epoch`` rewinds its partition; the seek waits for the
        fetch loop (``apply_seeks``), which then goes to the lowest offset given up meanwhile.
        """
        if self.draining:
            log.warning("%s offset %d stays uncommitted (%s)", tp, offset, why)
            return
        if not self.tracker.rewind(tp, offset, epoch):
            log.info("%s offset %d was already dropped by a rewind or a revoke (%s)", tp, offset, why)
            return
        log.warning("%s offset %d will be read again (%s)", tp, offset, why)
        self._seeks[tp] = min(offset, self._seeks.get(tp, offset))
        if self.on_dropped is not None:
            self.on_dropped()

    def apply_seeks(self) -> None:
        """Seek every rewound partition to its lowest given-up offset (the fetch loop, between rounds)."""
        seeks, self._seeks = self._seeks, {}
        consumer = self.consumer
        if consumer is None:
            return
        for tp, offset in seeks.items():
            if tp in consumer.assignment():
                consumer.seek(tp, offset)

    async def partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        """Before partitions move away: answer what was fetched from them, commit (each bounded), then
        forget them."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.session_timeout_ms / 2000):
                await self.wait_answered(revoked)
        loop = asyncio.get_running_loop()
        # One budget for the commit and the quarantine's release: with one each, an outage held the callback
        # for the wait above plus both, 15 s, its bound (simulation seed 7420).
        deadline = loop.time() + REVOKE_COMMIT_S
        try:
            # aiokafka retries a commit for as long as the coordinator is away: bounded here,
            # so an outage cannot hold the rebalance (what is not committed is read again).
            async with asyncio.timeout_at(deadline):
                await self.commit()
        except TimeoutError:
            log.warning("the commit before a revoke took over %.0f s; abandoned", REVOKE_COMMIT_S)
        if self.on_revoking is not None:
            # Still tracked here: the quarantine tells a partition with records running from an idle one.
            await self.on_revoking(revoked, max(0.0, deadline - loop.time()))
        self.tracker.forget(revoked)
        self.generation += 1
        for tp in revoked:
            self._seeks.pop(tp, None)
        if self.on_revoked is not None:
            self.on_revoked(revoked)
        if self.on_dropped is not None:
            self.on_dropped()

    async def restart_from_committed(self) -> None:
        """Start every assigned partition over from its committed offset, as a revoke and re-assignment
        would: what a dead fetch round took from the client may be gone, its positions moved past it."""
        consumer = self.consumer
        assigned = consumer.assignment() if consumer is not None else set()
        if assigned:
            await self.partitions_revoked(assigned)
            await self.seek_to_committed(assigned)

    async def seek_to_committed(self, partitions: Collection[TopicPartition]) -> None:
        """Seek the assigned ones of ``partitions`` to their committed offsets, each try bounded by
        REVOKE_COMMIT_S and retried until one succeeds (or a drain begins).

        Their positions may be past records nobody tracks (a dropped round's): fetching on from there
        would let a later commit pass them. aiokafka waits for an absent coordinator with no bound,
        so a try that runs out counts as a failed fetch round (``on_seek_failed``) and is tried again.
        """
        delay = SEEK_RETRY_S
        while not self.draining:
            consumer = self.consumer
            assigned = [tp for tp in partitions if consumer is not None and tp in consumer.assignment()]
            if consumer is None or not assigned:
                return
            try:
                async with asyncio.timeout(REVOKE_COMMIT_S):
                    if self.before_seek_to_committed is not None:
                        await self.before_seek_to_committed(assigned)
                    committed = await consumer.seek_to_committed(*assigned)
                    for tp in assigned:
                        own = self.own_commit(tp) if self.own_commit is not None else None
                        if own is not None and own > (committed.get(tp) or 0):
                            consumer.seek(
                                tp, own
                            )  # never back over what this worker's transactions committed
                            committed[tp] = own
                    # Nothing committed yet: the group starts at the earliest offset (auto_offset_reset).
                    never = [tp for tp, offset in committed.items() if not offset]
                    if never:
                        await consumer.seek_to_beginning(*never)
                return
            except (TimeoutError, KafkaError) as exc:
                log.warning("the committed offsets of %s could not be read (%r); trying again", assigned, exc)
                if self.on_seek_failed is not None:
                    self.on_seek_failed(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, SEEK_RETRY_MAX_S)

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
