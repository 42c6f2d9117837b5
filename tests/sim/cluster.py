"""A fake Kafka cluster and the fakes of the few aiokafka surfaces the worker uses (worker/kafka/clients.py).

Semantics copied from aiokafka 0.14 (read in its sources), only as far as the worker can see them:
- ``getmany`` parses a partition's records from the start of the record batch that holds the
  position (Kafka returns whole batches; ``PartitionRecords._unpack_records`` parses each record,
  headers included, before it drops those below the position), lazily, stopping after ``max_records``.
  So a record whose header name is not UTF-8 fails every fetch positioned after it in its batch, and a
  fetch positioned before it that asks for enough records to reach it; a batch that does not inflate
  fails every fetch positioned inside it with ``zlib.error`` (gzip) or ``cramjam.DecompressionError``.
  Partitions are drained one after another and each one's position moves as it goes: an exception in
  a later partition loses the records already taken from the earlier ones.
- While the broker is away, fetch errors stay inside aiokafka's fetch task: ``getmany`` returns
  nothing after its timeout. ``commit`` retries retriable errors with no time bound and raises
  ``CommitFailedError`` once the member was dropped from the group.
- Rebalances are eager: every partition is revoked (the listener's coroutine awaited, fetching held),
  then the new ones assigned, unpaused, at their committed offsets (``auto_offset_reset=earliest``).
  With a second worker in the group (``Plan.peer``), a member joining or leaving rebalances both, and no
  member is assigned before every live member's revoke returned; a crashed member's partitions stay
  unowned until its session expires (or its successor joins).
- A member that has not called ``getmany`` for ``max_poll_interval_ms`` (300 s, aiokafka's default;
  the worker does not set it) leaves the group; it rejoins on its next ``getmany``. A member whose
  session expired during an outage (``session_timeout_ms``) is dropped and rejoins likewise.
- Exactly-once: a partition the group gives another member is fenced there (that member's InitProducerId of
  the partition's transactional id), after this worker's revoke. A member dropped during an outage finds its
  partitions fenced likewise if the seed has another member to take them over (``Plan.taken_over_when_dropped``).
- The producer waits up to ``request_timeout_ms`` (40 s) for the metadata of a topic it has not written
  to yet and then raises ``UnknownTopicOrPartitionError``; a record of a known topic that the broker
  does not acknowledge within 40 s fails its delivery future with ``KafkaTimeoutError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cramjam
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import (
    CommitFailedError,
    ConsumerStoppedError,
    IllegalStateError,
    KafkaConnectionError,
    KafkaTimeoutError,
    NodeNotReadyError,
    NotLeaderForPartitionError,
    ProducerFenced,
    RequestTimedOutError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)

from tests.sim.clock import EPOCH_S, SimLoop
from worker.kafka.partition_producers import transactional_id
from worker.kafka.record_batches import BatchRead

if TYPE_CHECKING:
    from tests.sim.faults import Scheduler
    from tests.sim.transactions import TxnCoordinator
    from worker.settings import Settings

log = logging.getLogger(__name__)

#: aiokafka's request_timeout_ms default: the producer's metadata wait and delivery bound.
REQUEST_TIMEOUT_S = 40.0
#: aiokafka's max_poll_interval_ms default (the worker does not set it).
MAX_POLL_INTERVAL_S = 300.0


@dataclass
class SimRecord:
    """One request record as the test client produced it; ``kind`` says what the worker must make of it."""

    offset: int
    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]]
    #: good | invalid (a reply + DLQ) | bad_header (DLQ) | corrupt (its batch does not inflate) | poison
    #: (kills its worker: answered poison_suspected, with a DLQ record, after max_crash_attempts crashes)
    kind: str
    request_id: str | None
    reply_to: str | None = None


@dataclass
class SimBatch:
    """A producer's record batch; ``codec`` set: compressed bytes that do not inflate (CRC valid)."""

    records: list[SimRecord]
    codec: str | None = None

    @property
    def base(self) -> int:
        return self.records[0].offset

    @property
    def next_offset(self) -> int:
        return self.records[-1].offset + 1


@dataclass
class Published:
    """A record the broker acknowledged on an output topic."""

    topic: str
    key: bytes | None
    value: bytes
    headers: dict[str, str]
    at: float
    correlation_id: str


def _decode_error(batch: SimBatch) -> BaseException:
    if batch.codec == "gzip":
        return zlib.error("Error -3 while decompressing data: invalid block type")
    return cramjam.DecompressionError(f"{batch.codec}: corrupt input")


def _offset_of(value: Any) -> int:
    return value if isinstance(value, int) else int(value[0])  # OffsetAndMetadata is a named tuple


def _bad_header_error() -> UnicodeDecodeError:
    return UnicodeDecodeError("utf-8", b"\xff\xfe", 0, 1, "invalid start byte")


class Cluster:
    """Topics as batch lists, committed offsets, one consumer group, outages; records what happened."""

    def __init__(self, loop: SimLoop, sched: Scheduler, partitions: list[TopicPartition]) -> None:
        self.loop = loop
        self.sched = sched
        self.partitions = partitions
        self.logs: dict[TopicPartition, list[SimBatch]] = {tp: [] for tp in partitions}
        self.committed: dict[TopicPartition, int] = {}
        self.outputs: list[Published] = []
        self.topics: set[str] = set()
        self.refused_for_good: set[str] = set()
        #: times the poison request killed the worker (tests.sim.faults.FaultyPreprocessor)
        self.poison_kills = 0
        #: of those, kills of a process whose last marker of the poison's partition said it had let the
        #: partition go alive (revoked, its records still running): the next owner counts a hand-over
        self.handover_kills = 0
        #: crashes with other causes (the plan's crash windows)
        self.other_crashes = 0
        #: topic -> time until which its acks fail with a retriable error (a leader moving)
        self.refused_until: dict[str, float] = {}
        self.connected = True
        self.outage_began = 0.0
        self.member: FakeConsumer | None = None
        #: the second worker's consumer while it is in the group (``Plan.peer``); it gets what ``share`` leaves
        self.peer: FakeConsumer | None = None
        #: what the first worker keeps of ``share`` while the second is in the group
        self.peer_keep: set[TopicPartition] = set(partitions)
        #: when the first worker crashed with the second in the group, while its session has not expired yet
        self.lingering_since: float | None = None
        #: members whose revoke (of the rebalance under way) has not returned yet: no member is assigned before
        self.revoking: set[FakeConsumer] = set()
        self._sync_waiters: list[asyncio.Future[None]] = []
        #: the partitions the group gives this worker now (all, or fewer while another member holds some)
        self.share: set[TopicPartition] = set(partitions)
        self._waiters: list[asyncio.Future[None]] = []
        self._graves: list[asyncio.Future[None]] = []
        #: (time, cause, partition or None): crash, rebalance, rewind; what may explain a duplicate
        self.causes: list[tuple[float, str, TopicPartition | None]] = []
        #: (time, partition, offset) of every record getmany returned
        self.fetches: list[tuple[float, TopicPartition, int]] = []
        self.getmany_calls: list[float] = []
        #: (time, topic, correlation id) of each publish the producer refused for want of metadata
        self.unknown_topic: list[tuple[float, str, str]] = []
        self.trace: list[str] = []
        self.checker: Any = None  # tests.sim.invariants.Checker, set by the run
        #: the quarantine topic's one partition: (key, value) in offset order; it outlives every worker
        self.markers: list[tuple[bytes | None, bytes]] = []
        self.session_timeout_s = 10.0
        #: exactly-once seeds: transactional ids, their epochs and open transactions (tests/sim/transactions.py)
        self.transactions: TxnCoordinator | None = None

    # --- time and change -----------------------------------------------------------------

    def note(self, text: str) -> None:
        """One line of the replayable trace."""
        self.trace.append(f"{self.loop.now:10.4f} {text}")

    async def forever(self) -> None:
        """What a crashed process's calls wait on: a future kept here, so that the garbage collector does not
        destroy the waiting task (and say so) while the run goes on."""
        waiter = self.loop.create_future()
        self._graves.append(waiter)
        await waiter

    def changed(self) -> None:
        """Wake every fetch waiting for records or for the broker to come back."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_change(self, limit_s: float) -> None:
        """Wait until something changed or ``limit_s`` passed."""
        waiter = self.loop.create_future()
        self._waiters.append(waiter)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter, limit_s)

    async def wait_connected(self, limit_s: float | None = None) -> bool:
        """Wait for the broker to be reachable (at most ``limit_s``); True once it is."""
        deadline = None if limit_s is None else self.loop.now + limit_s
        while not self.connected:
            left = None if deadline is None else deadline - self.loop.now
            if left is not None and left <= 0:
                return False
            await self.wait_change(1.0 if left is None else min(left, 1.0))
        return True

    # --- the request topics --------------------------------------------------------------

    def end(self, tp: TopicPartition) -> int:
        batches = self.logs[tp]
        return batches[-1].next_offset if batches else 0

    def append(self, tp: TopicPartition, batch: SimBatch) -> None:
        self.logs[tp].append(batch)
        self.note(f"append {tp.partition} {batch.base}..{batch.next_offset - 1} codec={batch.codec}")
        self.changed()

    def records(self) -> list[tuple[TopicPartition, SimRecord]]:
        return [(tp, r) for tp, batches in self.logs.items() for b in batches for r in b.records]

    # --- outages, rebalances -------------------------------------------------------------

    def cut(self) -> None:
        self.connected = False
        self.outage_began = self.loop.now
        self.note("outage begins")

    def cut_for(self, length_s: float) -> None:
        """An outage the scheduler starts in the middle of a call; it ends by itself (or when faults stop)."""
        if not self.connected:
            return
        self.cut()
        began = self.outage_began

        def end() -> None:
            if not self.connected and self.outage_began == began:
                self.restore()

        self.loop.call_later(length_s, end)

    def restore(self) -> None:
        self.connected = True
        self.note("outage ends")
        if self.loop.now - self.outage_began > self.session_timeout_s:
            # No heartbeat reached the coordinator for a whole session: the members were dropped.
            for member in self.members():
                member.drop("session expired during the outage")
        self.changed()

    def rebalance(self, share: set[TopicPartition]) -> None:
        """Another member joins or leaves: the group moves partitions, this worker keeps ``share``."""
        self.share = set(share)
        self.note(f"rebalance share={sorted(tp.partition for tp in share)}")
        self._reassign_all()

    # --- the group's members ---------------------------------------------------------------

    def members(self) -> list[FakeConsumer]:
        """The consumers in the group now: the first worker's, then the second's."""
        return [m for m in (self.member, self.peer) if m is not None]

    def share_of(self, consumer: FakeConsumer) -> set[TopicPartition]:
        """What the group assigns ``consumer``. An imaginary member holds what ``share`` leaves; with the second
        worker in the group the first keeps ``peer_keep`` of the rest (while it is alive, or crashed within its
        session) and the second takes the others."""
        if consumer is not self.peer:
            return self.share & self.peer_keep if self.peer is not None else set(self.share)
        first = self.peer_keep if self.member is not None or self.lingering_since is not None else set()
        return self.share - first

    def join(self, consumer: FakeConsumer) -> None:
        """A member subscribes: the group rebalances every member (only itself when it is alone)."""
        if consumer.is_peer:
            self.peer = consumer
            kept = sorted(tp.partition for tp in self.peer_keep)
            self.note(f"a second worker joins; the first keeps {kept}")
        else:
            self.member = consumer
            self.lingering_since = None
        self._reassign_all()

    def leave(self, consumer: FakeConsumer, *, crashed: bool) -> None:
        """A member is gone: stopped (it leaves the group at once) or crashed (its partitions stay its own until
        its session expires, when another member is in the group to take them)."""
        if self.member is consumer:
            self.member = None
        elif self.peer is consumer:
            self.peer = None
            self.note("the second worker leaves")
        else:
            return
        self.revoking.discard(consumer)
        self.synced()
        if not self.members():
            return
        if crashed and not consumer.is_peer:
            self.lingering_since = self.loop.now
            self.loop.call_later(self.session_timeout_s, self._expire_lingering, self.loop.now)
        else:
            self._reassign_all()

    def _expire_lingering(self, crashed_at: float) -> None:
        if self.lingering_since == crashed_at:  # not since replaced by a successor, or by a later crash
            self.lingering_since = None
            self.note("the crashed worker's session expires")
            self._reassign_all()

    def _reassign_all(self) -> None:
        for member in self.members():
            member.reassign()

    def synced(self) -> None:
        """A member's revoke returned (or the member is gone): wake the members waiting to be assigned."""
        waiters, self._sync_waiters = self._sync_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def all_revoked(self) -> None:
        """Wait until no live member is still revoking (at once, without yielding, when none is)."""
        while any(not m.dead for m in self.revoking if m in self.members()):
            waiter = self.loop.create_future()
            self._sync_waiters.append(waiter)
            await waiter

    def record_output(
        self, topic: str, key: bytes | None, value: bytes, headers: dict[str, str], correlation_id: str
    ) -> None:
        self.outputs.append(Published(topic, key, value, headers, self.loop.now, correlation_id))
        self.note(f"ack {topic} key={key!r} {sorted(headers.items())}")
        if self.checker is not None:
            self.checker.on_output(self.outputs[-1])


class FakeConsumer:
    """AIOKafkaConsumer as the worker uses it: group membership, positions, pause, fetch, commit."""

    def __init__(self, cluster: Cluster, settings: Settings) -> None:
        self.cluster = cluster
        self.loop = cluster.loop
        self.group_id = settings.group_id
        self.session_timeout_s = settings.session_timeout_ms / 1000
        self.max_poll_interval_s = getattr(settings, "max_poll_interval_ms", None)
        self.max_poll_interval_s = (
            MAX_POLL_INTERVAL_S if self.max_poll_interval_s is None else self.max_poll_interval_s / 1000
        )
        self.listener: ConsumerRebalanceListener | None = None
        self._assigned: set[TopicPartition] = set()
        self._paused: set[TopicPartition] = set()
        self._positions: dict[TopicPartition, int] = {}
        self._stable = asyncio.Event()
        self._rebalancing: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self.dropped = False
        self.stopped = False
        self.dead = False
        self._fetching = 0
        self._last_fetch_ended = self.loop.now
        #: the second worker's consumer (``Plan.peer``): its trace lines say so
        self.is_peer = False

    def note(self, text: str) -> None:
        self.cluster.note(f"[second] {text}" if self.is_peer else text)

    # --- membership ----------------------------------------------------------------------

    def subscribe(self, topics: list[str], listener: ConsumerRebalanceListener) -> None:
        self.listener = listener
        self.cluster.join(self)
        self._watch = asyncio.create_task(self._watch_polls())

    def reassign(self) -> None:
        """Start a rebalance: revoke everything (awaiting the listener), then assign the share."""
        if self._rebalancing is not None and not self._rebalancing.done():
            self._rebalancing.cancel()
        self._stable.clear()
        self.cluster.revoking.add(self)
        self._rebalancing = asyncio.create_task(self._rebalance())

    async def _rebalance(self) -> None:
        previous = set(self._assigned)
        began = self.loop.now
        if self.listener is not None:
            try:
                await self.listener.on_partitions_revoked(previous)
            except Exception:
                log.exception("on_partitions_revoked failed (aiokafka logs and goes on)")
        if self.cluster.checker is not None:
            self.cluster.checker.on_revoke_done(began, previous)
        self.cluster.revoking.discard(self)
        self.cluster.synced()
        await self.cluster.all_revoked()
        if self.dead or self.stopped:
            return
        self.dropped = False
        share = self.cluster.share_of(self)
        others = {tp for m in self.cluster.members() if m is not self for tp in self.cluster.share_of(m)}
        self._taken_over(previous - share - others)  # a live member's own InitProducerId fences them there
        self._assigned = share
        self._paused = set()
        self._positions = {tp: self.cluster.committed.get(tp, 0) for tp in share}
        self.cluster.causes.append((self.loop.now, "rebalance", None))
        positions = sorted((tp.partition, offset) for tp, offset in self._positions.items())
        self.note(f"assigned (partition, offset) {positions}")
        if self.listener is not None:
            try:
                await self.listener.on_partitions_assigned(set(share))
            except Exception:
                log.exception("on_partitions_assigned failed (aiokafka logs and goes on)")
        self._last_fetch_ended = self.loop.now
        self._stable.set()

    def drop(self, why: str) -> None:
        """The coordinator no longer knows this member: commits fail until it rejoins (next getmany)."""
        if self.dropped or self.dead or self.stopped:
            return
        self.dropped = True
        self.note(f"member dropped: {why}")
        if self.cluster.checker is not None:
            self.cluster.checker.on_member_dropped(why)
        if self.cluster.sched.plan.taken_over_when_dropped:
            self._taken_over(self._assigned)

    def _taken_over(self, partitions: Collection[TopicPartition]) -> None:
        """Exactly-once: another member was given ``partitions`` and opened their producers, fencing ours."""
        transactions = self.cluster.transactions
        if transactions is None:
            return
        for tp in sorted(partitions, key=lambda tp: tp.partition):
            tid = transactional_id(self.group_id, tp)
            self.cluster.note(f"another member opens {tid}")
            transactions.init_producer_id(tid, 60.0)

    async def _watch_polls(self) -> None:
        """aiokafka's heartbeat routine: leave the group after max_poll_interval without a getmany."""
        while not (self.dead or self.stopped):
            idle = 0.0 if self._fetching else self.loop.now - self._last_fetch_ended
            if self._assigned and not self.dropped and idle >= self.max_poll_interval_s:
                self.drop("max_poll_interval_ms passed without a getmany (paused too long)")
            await asyncio.sleep(max(1.0, self.max_poll_interval_s - idle))

    # --- the surfaces the worker calls ---------------------------------------------------

    def assignment(self) -> set[TopicPartition]:
        return set(self._assigned)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    def _owned(self, tp: TopicPartition) -> None:
        if tp not in self._assigned:
            raise IllegalStateError(f"No current assignment for partition {tp}")

    def pause(self, *partitions: TopicPartition) -> None:
        for tp in partitions:
            self._owned(tp)
            self._paused.add(tp)
        # One line, sorted: a set of partitions (the whole assignment) comes in the hash seed's order.
        self.note(f"pause {sorted(tp.partition for tp in partitions)}")

    def resume(self, *partitions: TopicPartition) -> None:
        for tp in partitions:
            self._owned(tp)
            self._paused.discard(tp)
        self.note(f"resume {sorted(tp.partition for tp in partitions)}")

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._owned(tp)
        if offset < self._positions.get(tp, 0):
            self.cluster.causes.append((self.loop.now, "rewind", tp))
        self._positions[tp] = offset
        self.note(f"seek {tp.partition} {offset}")

    async def position(self, tp: TopicPartition) -> int:
        await self._alive()
        self._owned(tp)
        return self._positions[tp]

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.cluster.end(tp) if tp in self._assigned else None

    async def _alive(self) -> None:
        if self.dead:
            await self.cluster.forever()  # a crashed process: nothing it started comes back
        if self.stopped:
            raise ConsumerStoppedError()

    async def committed(self, tp: TopicPartition) -> int | None:
        """The group's committed offset of ``tp`` (None when nothing was committed).

        aiokafka's ``fetch_committed_offsets`` retries a coordinator away with no time bound.
        """
        await self._alive()
        await self._coordinator()
        return self.cluster.committed.get(tp)

    async def _coordinator(self) -> None:
        """One round trip to the coordinator: waits for the broker for as long as it is away."""
        while True:
            await self.cluster.wait_connected()
            await asyncio.sleep(self.cluster.sched.ack_latency())
            await self._alive()
            if self.cluster.connected:
                return

    async def seek_to_committed(self, *partitions: TopicPartition) -> dict[TopicPartition, int | None]:
        """aiokafka 0.14 ``seek_to_committed``: each partition's committed offset, sought to where one
        is above 0 (the others stay where they are)."""
        for tp in partitions:
            self._owned(tp)
        committed: dict[TopicPartition, int | None] = {}
        # In order: the worker passes a set, whose order follows str hashing (PYTHONHASHSEED), and
        # each round trip draws from the seed's stream; sorted, a seed replays in any interpreter.
        for tp in sorted(partitions):
            offset = await self.committed(tp)
            committed[tp] = offset
            if offset and offset > 0 and tp in self._assigned:
                self.seek(tp, offset)
        return committed

    async def beginning_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The log start of each partition (0 here), from its leader."""
        await self._alive()
        await self._coordinator()
        return dict.fromkeys(partitions, 0)

    async def seek_to_beginning(self, *partitions: TopicPartition) -> bool:
        """aiokafka 0.14 ``seek_to_beginning``: an offset reset to the log start (0 here), waited for up
        to request_timeout_ms; True once done."""
        for tp in partitions:
            self._owned(tp)
        await self._alive()
        if not await self.cluster.wait_connected(REQUEST_TIMEOUT_S):
            return False
        await asyncio.sleep(self.cluster.sched.ack_latency())
        await self._alive()
        for tp in partitions:
            if tp in self._assigned:
                self.seek(tp, 0)
        return True

    async def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        """Commit explicit offsets: ints, (offset, metadata) pairs or OffsetAndMetadata, as aiokafka takes."""
        offsets = {tp: _offset_of(value) for tp, value in offsets.items()}
        await self._alive()
        if self.cluster.sched.commit_fault():
            # The group rebalanced under this member (the only way aiokafka's commit ends in
            # CommitFailedError): it rejoins on its next getmany.
            self.drop("simulated: the group rebalanced during a commit")
            self.cluster.causes.append((self.loop.now, "rebalance", None))
        cut = self.cluster.sched.cut_now()
        if cut is not None:
            self.cluster.cut_for(cut)  # the coordinator goes away while this commit is in flight
        await self._coordinator()  # aiokafka retries a coordinator away with no time bound
        if self.dropped:
            raise CommitFailedError("the group has already rebalanced")
        self.note(f"commit {sorted((tp.partition, o) for tp, o in offsets.items())}")
        if self.cluster.checker is not None:
            self.cluster.checker.on_commit(offsets)
        self.cluster.committed.update(offsets)

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        await self._alive()
        self._fetching += 1
        try:
            return await self._getmany(partitions, timeout_ms, max_records)
        finally:
            self._fetching -= 1
            self._last_fetch_ended = self.loop.now

    async def _getmany(
        self, partitions: Collection[TopicPartition], timeout_ms: int, max_records: int | None
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        cluster = self.cluster
        cluster.getmany_calls.append(self.loop.now)
        if self.dropped and (self._rebalancing is None or self._rebalancing.done()):
            self.reassign()  # rejoin
        await self._stable.wait()
        await self._alive()
        error = cluster.sched.getmany_fault()
        if error is not None:
            raise error
        deadline = self.loop.now + timeout_ms / 1000
        while True:
            if cluster.connected and self._stable.is_set():
                drained = self._drain(partitions, max_records)
                if drained:
                    return drained
            left = deadline - self.loop.now
            if left <= 0:
                return {}
            await cluster.wait_change(left)
            await self._alive()

    def _drain(
        self, partitions: Collection[TopicPartition], max_records: int | None
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        chosen = partitions or sorted(self._assigned)
        drained: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
        room = max_records
        for tp in chosen:
            if tp not in self._assigned or tp in self._paused:
                continue
            records = self._decode(tp, room)
            if not records:
                continue
            drained[tp] = records
            if room is not None:
                room -= len(records)
                if room <= 0:
                    break
        return drained

    def _decode(self, tp: TopicPartition, limit: int | None) -> list[ConsumerRecord[bytes, bytes]]:
        """The records from the position, parsed batch by batch from each batch's start."""
        position = self._positions[tp]
        taken: list[ConsumerRecord[bytes, bytes]] = []
        for batch in self.cluster.logs[tp]:
            if batch.next_offset <= position:
                continue
            if batch.codec is not None:
                raise _decode_error(batch)
            for record in batch.records:
                if record.kind == "bad_header":
                    raise _bad_header_error()
                if record.offset < position:
                    continue  # parsed, then dropped below the position (aiokafka does the same)
                taken.append(self._consumer_record(tp, record))
                if limit is not None and len(taken) >= limit:
                    break
            if limit is not None and len(taken) >= limit:
                break
        if taken:
            self._positions[tp] = taken[-1].offset + 1
            for r in taken:
                self.cluster.fetches.append((self.loop.now, tp, r.offset))
            self.note(f"fetched {tp.partition} {taken[0].offset}..{taken[-1].offset}")
        return taken

    def _consumer_record(self, tp: TopicPartition, r: SimRecord) -> ConsumerRecord[bytes, bytes]:
        return ConsumerRecord(
            topic=tp.topic,
            partition=tp.partition,
            offset=r.offset,
            timestamp=int((EPOCH_S + self.loop.now) * 1000),
            timestamp_type=0,
            key=r.key,
            value=r.value,
            checksum=None,
            serialized_key_size=len(r.key or b""),
            serialized_value_size=len(r.value),
            headers=tuple(r.headers),
        )

    async def stop(self) -> None:
        self.stopped = True
        self._stable.set()
        self.cluster.leave(self, crashed=False)
        for task in (self._watch, self._rebalancing):
            if task is not None and task is not asyncio.current_task():
                task.cancel()


@dataclass
class FakeClients:
    """Stands in for worker.kafka.clients.KafkaClients: the same five calls and two attributes."""

    cluster: Cluster
    settings: Settings
    consumer: FakeConsumer | None = None
    broker: Any = None
    admin: Any = None
    dead: bool = False
    #: the second worker's clients (``Plan.peer``)
    peer: bool = False
    _known: set[str] = field(default_factory=set)
    _acks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def max_request_size(self) -> int:
        return max(self.settings.max_message_bytes * 2, 1024 * 1024)

    async def connect(
        self, own_topics: list[str], subscribe: list[str], listener: ConsumerRebalanceListener
    ) -> None:
        await self._alive()
        delay = 0.5
        while not self.cluster.connected:  # KafkaClients.connect retries an unreachable broker
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
        self.cluster.topics.update(own_topics)
        self.consumer = FakeConsumer(self.cluster, self.settings)
        self.consumer.is_peer = self.peer
        self.consumer.subscribe(subscribe, listener)

    async def record_limit(self, written: list[str]) -> int:
        return min(self.settings.max_publish_bytes, self.max_request_size)

    async def marker_clients(self, topic: str, configs: dict[str, str]) -> tuple[Any, Any]:
        """The quarantine's producer and group-less reader, over the cluster's marker log."""
        await self._alive()
        self.cluster.topics.add(topic)
        return MarkerProducer(self), MarkerReader(self)

    async def list_topics(self) -> set[str]:
        await self._alive()
        if not self.cluster.connected:
            await asyncio.sleep(1.0)
            raise KafkaConnectionError("Unable to bootstrap from [('sim', 9092)]")
        return set(self.cluster.topics)

    async def publish(
        self, value: bytes, topic: str, key: bytes | None, headers: dict[str, str], correlation_id: str
    ) -> asyncio.Future[None]:
        await self._alive()
        cluster = self.cluster
        if cluster.transactions is not None and cluster.checker is not None:
            cluster.checker.flag("I5", "D12", f"outside {topic}", f"exactly-once: {correlation_id} published to "
                                 f"{topic} outside a transaction")  # fmt: skip
        await self.metadata(topic, correlation_id)
        ack: asyncio.Future[None] = cluster.loop.create_future()
        task = asyncio.create_task(self._deliver(ack, topic, key, value, dict(headers), correlation_id))
        self._acks.add(task)
        task.add_done_callback(self._acks.discard)
        return ack

    async def metadata(self, topic: str, correlation_id: str) -> None:
        """A record is sent (it may meet a cut): the producer's metadata wait for a topic it has not written
        to yet, up to the request timeout."""
        cluster = self.cluster
        cluster.note(f"publish {topic} {correlation_id}")
        cut = cluster.sched.cut_now()
        if cut is not None:
            cluster.cut_for(cut)  # the connection drops as this record is sent
        if topic not in self._known:
            if not await cluster.wait_connected(REQUEST_TIMEOUT_S) or topic not in cluster.topics:
                await self._alive()
                cluster.unknown_topic.append((cluster.loop.now, topic, correlation_id))
                raise UnknownTopicOrPartitionError(f"topic {topic} not in metadata after 40 s")
            await self._alive()
            self._known.add(topic)

    async def _deliver(
        self,
        ack: asyncio.Future[None],
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: dict[str, str],
        correlation_id: str,
    ) -> None:
        await self.acknowledge(
            ack, topic, lambda: self.cluster.record_output(topic, key, value, headers, correlation_id)
        )

    async def acknowledge(
        self,
        ack: asyncio.Future[None],
        topic: str,
        land: Callable[[], None],
        fenced: Callable[[], bool] = lambda: False,
    ) -> None:
        """The broker's answer to one record of ``topic``: ``land`` keeps the record, then ``ack`` is set; it fails
        past the request timeout while the broker is away, with ``ProducerFenced`` when ``fenced()`` (a
        transactional producer's), or as the broker refuses the topic."""
        cluster = self.cluster
        began = cluster.loop.now
        while True:
            if not cluster.connected:
                left = began + REQUEST_TIMEOUT_S - cluster.loop.now
                if left <= 0 or not await cluster.wait_connected(left):
                    self._fail(ack, topic, KafkaTimeoutError())
                    return
                continue
            await asyncio.sleep(cluster.sched.ack_latency())
            if self.dead:
                return
            if not cluster.connected:
                continue
            if fenced():
                self._fail(ack, topic, ProducerFenced())
            elif topic in cluster.refused_for_good:
                self._fail(ack, topic, TopicAuthorizationFailedError(topic))
            elif cluster.refused_until.get(topic, -1.0) > cluster.loop.now:
                self._fail(
                    ack, topic, cluster.sched.rng.choice([NotLeaderForPartitionError, RequestTimedOutError])()
                )
            else:
                land()
                if not ack.done():
                    ack.set_result(None)
            return

    def _fail(self, ack: asyncio.Future[None], topic: str, error: BaseException) -> None:
        self.cluster.note(f"ack of {topic} fails: {error!r}")
        if not ack.done():
            ack.set_exception(error)

    async def _alive(self) -> None:
        if self.dead:
            await self.cluster.forever()

    async def close(self, budget_s: float = 10.0) -> None:
        if self._acks:
            await asyncio.wait(list(self._acks), timeout=budget_s)  # the producer flushes on stop
        for task in list(self._acks):
            task.cancel()
        if self.consumer is not None:
            await self.consumer.stop()
        self.consumer = None

    def crash(self) -> None:
        """The process is gone: nothing unacknowledged reaches the broker, the member leaves the group."""
        self.dead = True
        for task in list(self._acks):
            task.cancel()
        consumer = self.consumer
        if consumer is not None:
            consumer.dead = True
            consumer._stable.set()
            self.cluster.leave(consumer, crashed=True)
            for task in (consumer._watch, consumer._rebalancing):
                if task is not None:
                    task.cancel()


class MarkerProducer:
    """The quarantine's producer (aiokafka's AIOKafkaProducer as MarkerLog uses it): a send waits for the
    broker through an outage, up to the request timeout, as the real one does."""

    def __init__(self, clients: FakeClients) -> None:
        self.clients = clients

    async def start(self) -> None:
        await self.clients._alive()

    async def partitions_for(self, topic: str) -> set[int]:
        await self.clients._alive()
        return {0}

    async def send_and_wait(
        self, topic: str, value: bytes, key: bytes | None = None, partition: int = 0
    ) -> None:
        cluster = self.clients.cluster
        await self.clients._alive()
        if not await cluster.wait_connected(REQUEST_TIMEOUT_S):
            raise KafkaTimeoutError()
        await asyncio.sleep(cluster.sched.ack_latency())
        await self.clients._alive()
        if not cluster.connected:
            raise KafkaTimeoutError()
        cluster.markers.append((key, value))
        cluster.note(f"marker {key!r}")

    async def stop(self) -> None:
        return None


class MarkerReader:
    """The quarantine's group-less reader of the marker log's one partition (AIOKafkaConsumer as
    MarkerLog uses it); getmany returns nothing while the broker is away."""

    def __init__(self, clients: FakeClients) -> None:
        self.clients = clients
        self.position_ = 0

    async def start(self) -> None:
        await self.clients._alive()

    def assign(self, partitions: list[TopicPartition]) -> None:
        return None

    async def seek_to_beginning(self, *partitions: TopicPartition) -> bool:
        self.position_ = 0
        return True

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        cluster = self.clients.cluster
        await self.clients._alive()
        if not await cluster.wait_connected(REQUEST_TIMEOUT_S):
            raise KafkaTimeoutError()
        return {tp: len(cluster.markers) for tp in partitions}

    async def position(self, tp: TopicPartition) -> int:
        return self.position_

    async def getmany(self, tp: TopicPartition, timeout_ms: int = 0) -> dict[TopicPartition, list[Any]]:
        cluster = self.clients.cluster
        await self.clients._alive()
        if not cluster.connected:
            await asyncio.sleep(timeout_ms / 1000)
            return {}
        await asyncio.sleep(cluster.sched.ack_latency())
        taken = cluster.markers[self.position_ :]
        records = [
            ConsumerRecord(tp.topic, 0, self.position_ + i, 0, 0, key, value, None, 0, 0, [])
            for i, (key, value) in enumerate(taken)
        ]
        self.position_ += len(taken)
        return {tp: records} if records else {}

    async def stop(self) -> None:
        return None


class FakeBatches:
    """worker.kafka.fetching.BatchReader over the fake cluster, as worker.kafka.record_batches.LeaderBatches reads:
    the batch holding an offset, decoded record by record, each record that fails named by its offset."""

    def __init__(self, consumer: FakeConsumer) -> None:
        self.consumer = consumer

    async def read(self, tp: TopicPartition, offset: int, limit: int) -> BatchRead | None:
        """The batch of ``tp`` holding ``offset`` from there on (at most ``limit`` good records)."""
        consumer, cluster = self.consumer, self.consumer.cluster
        await consumer._alive()
        if not cluster.connected:
            # aiokafka's client.send to a leader it has no connection to (AIOKafkaClient.send).
            raise NodeNotReadyError("Attempt to send a request to node which is not ready (node id 0).")
        await asyncio.sleep(cluster.sched.ack_latency())
        await consumer._alive()
        batch = next((b for b in cluster.logs[tp] if b.next_offset > offset), None)
        if batch is None:
            return None  # nothing there yet: no complete batch holds the offset
        start = max(batch.base, offset)
        if batch.codec is not None:
            why = f"{type(_decode_error(batch)).__name__}: {_decode_error(batch)}"
            return BatchRead([], [(o, why) for o in range(start, batch.next_offset)], batch.next_offset)
        out = BatchRead([], [], batch.next_offset)
        for record in batch.records:
            if record.offset < offset:
                continue
            if record.kind == "bad_header":
                error = _bad_header_error()
                out.failed.append((record.offset, f"{type(error).__name__}: {error}"))
                continue
            out.records.append(consumer._consumer_record(tp, record))
            if len(out.records) >= limit:
                out = BatchRead(out.records, out.failed, record.offset + 1)
                break
        failed = [o for o, _ in out.failed]
        cluster.note(f"batch read {tp.partition} {start}..{out.next_offset - 1} failed={failed}")
        return out
