"""Poison-pill quarantine: a request that kills its worker costs at most ``max_crash_attempts`` crashes.

Offsets are committed only after an answer, so a request that kills its process (OOM kill, a
crash in native decoder code, an abort) would come back to every worker of the group for ever.
Before a fetched round of a partition runs, its owner writes a *marker* for the partition to the
``<prefix>.quarantine`` topic (keyed by group/topic/partition, compacted where the broker
supports it) and waits for the broker's acknowledgement: "offsets up to ``upto`` may be running
here". Offset-commit metadata is not enough: the embedded broker drops it.

The next owner of a partition reads the marker at its first round. The marker still armed at
the offset the group resumes from (and not written by this very process) means the owner died
with those records running: one crash is counted, and the partition is read one record at a
time through ``upto``, each record armed alone with the count inherited. A crash while one
record runs alone names it; once a named record reaches ``max_crash_attempts`` crashes it is not
run again but answered with ``poison_suspected`` (error reply + DLQ record) and committed past.

A revoke or drain with nothing left running disarms the marker (the count of a partition still
being read one at a time goes with it), so a rebalance without a crash counts nothing. One whose
bounded wait ends with records still running marks it ``revoked``: its writer was alive when it let
go. The next owner counts no crash for that, and reads whole rounds; only ``HANDOVERS_PER_CRASH``
such hand-overs in a row at the same resume offset count as one crash (a killer slower than a
rebalance, or a process killed after it let go). A partition that was fully answered is never
charged: the group resumes past the marker's ``upto``.
The pure rules are ``recover``, ``Suspicion`` and ``Marker`` (worker/kafka/crash_markers.py), the
markers' topic is ``MarkerLog`` (worker/kafka/marker_log.py); ``Quarantine`` is the Kafka shell, with
the crash counting of ``CrashCounting`` (worker/kafka/crash_counting.py) and the holding of ``HeldRecords``
(worker/kafka/held_records.py).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from schemas.topics import quarantine_topic
from worker.errors import PoisonSuspected
from worker.kafka.clients import KafkaClients
from worker.kafka.crash_counting import CrashCounting
from worker.kafka.crash_markers import Marker
from worker.kafka.fetching import Fetched
from worker.kafka.held_records import HeldRecords, PartitionState
from worker.kafka.marker_log import COMPACTED, MarkerLog
from worker.kafka.messages import Origin, Outgoing, rejection
from worker.kafka.offsets import OffsetTracker
from worker.settings import Settings

log = logging.getLogger(__name__)

#: Longest a drain waits to disarm markers (the broker may be away); a revoke gives it what is left of the
#: budget it shares with the commit before it (worker/flow.py, REVOKE_COMMIT_S).
RELEASE_BUDGET_S = 5.0


@dataclass
class Admitted:
    """A round after the quarantine: the records to run, and the ones to answer as poison instead."""

    fetched: Fetched
    #: each with the crashes it caused
    poisoned: list[tuple[ConsumerRecord[Any, Any], int]]


class Quarantine(HeldRecords, CrashCounting):
    """Arms markers before rounds run, counts crashes at the first round after an assignment, holds
    suspect partitions to one record at a time, and names the records to answer as poison."""

    def __init__(
        self,
        log_: MarkerLog,
        consumer: AIOKafkaConsumer,
        tracker: OffsetTracker[TopicPartition],
        wait_until: Callable[[Callable[[], bool]], Awaitable[None]],
        generation: Callable[[], int],
        *,
        max_crashes: int,
    ) -> None:
        self.markers = log_
        self.consumer = consumer
        #: the flow's tracker: unanswered records of a partition, and its epoch (moved by rewinds, revokes)
        self.tracker = tracker
        #: waits until a predicate holds, re-checked as requests are answered (the flow's)
        self.wait_until = wait_until
        #: the flow's revoke count: a round that a revoke overtook is not admitted
        self.generation = generation
        self.max_crashes = max_crashes
        self.me = uuid.uuid4().hex
        self._partitions: dict[TopicPartition, PartitionState] = {}
        #: partitions whose assignment came before the last read of the topic (their markers are known)
        self._read_since_assigned: set[TopicPartition] = set()
        #: admit and release one at a time: a revoke during a round's marker writes disarms what they armed
        self._lock = asyncio.Lock()

    async def admit(
        self, fetched: Fetched, epochs: Mapping[TopicPartition, int], generation: int
    ) -> Admitted | None:
        """Before a round runs (it is fetched in ``epochs`` and the flow's ``generation``): count crashes
        of newly owned partitions, let one record of a suspect partition through (the rest wait here),
        arm each partition's marker and wait for the acks. None: a revoke overtook the round."""
        async with self._lock:
            if self.generation() != generation:
                return None
            admitted = await self._admit(fetched, epochs)
            if self.generation() != generation:
                # A revoke whose release gave up waiting for these writes: what it could not forget goes
                # now (a marker armed here stays armed, the safe side).
                self._forget(self._partitions.keys() - self.consumer.assignment())
                return None
            return admitted

    async def _admit(self, fetched: Fetched, epochs: Mapping[TopicPartition, int]) -> Admitted:
        await self._recover(fetched)
        records: list[ConsumerRecord[Any, Any]] = []
        poisoned: list[tuple[ConsumerRecord[Any, Any], int]] = []
        undecodable = list(fetched.undecodable)
        arming: dict[TopicPartition, Marker] = {}
        #: partition -> the first record of this round sent back to the broker (its backlog waits)
        sent_back: dict[TopicPartition, int] = {}
        for tp, taken in _by_partition(fetched.records).items():
            state = self._partitions.get(tp)
            if state is None:
                continue  # revoked while this round waited: the next owner reads it from the commit
            if epochs.get(tp, 0) != self.tracker.epoch(tp):
                # A rewind overtook the round (a give-up while it was fetched): none of it is tracked, and
                # the flow seeks the partition back. Taken for the next records, it would end the
                # one-at-a-time reading before the rewound ones come back (simulation seed 10227).
                continue
            if state.backlog:
                # A resume of every partition (backpressure) let it fetch past records still waiting
                # here: those are read again later, so what waits here stays within one fetch.
                self.consumer.seek(tp, taken[0].offset)
                sent_back[tp] = taken[0].offset
                self._hold(tp, state)
                continue
            first = taken[0].offset
            if first in state.poisoned or state.suspicion.poisoned(first, self.max_crashes):
                poisoned.append((taken[0], self._poison(tp, state, first)))
                taken = taken[1:]
                if not taken:
                    continue
                first = taken[0].offset
            if state.suspicion.suspect(first):
                if self.pending(tp):  # its one record still runs
                    state.backlog = taken
                else:
                    records.append(taken[0])
                    state.backlog = taken[1:]
                    arming[tp] = self._armed(state, first, alone=True)
                state.epoch = epochs.get(tp, 0)
                self._hold(tp, state)
            else:
                if state.suspicion.suspect_to >= 0:
                    log.info("%s: past the records read one at a time; whole rounds again", tp)
                    state.suspicion = state.suspicion.whole_rounds()
                records += taken
                last = taken[-1].offset
                written = state.written
                # Only a live marker of this process covers the round: another's says nothing of it, and
                # under one it left revoked (a hand-over, assigned back since) its death with the round
                # running would count as a hand-over, not a crash.
                covered = (
                    written is not None
                    and written.armed
                    and not written.revoked
                    and written.writer == self.me
                    and last <= written.upto
                )
                if not covered:
                    arming[tp] = self._armed(state, last, alone=False)
        assigned = self.consumer.assignment()
        for tp, state in self._partitions.items():
            if state.backlog and tp in assigned:
                self._defer_undecodable(tp, state, undecodable, sent_back.get(tp))
        await self._write(arming)
        return Admitted(Fetched(records, undecodable), poisoned)

    async def release(
        self, partitions: Collection[TopicPartition], budget_s: float = RELEASE_BUDGET_S
    ) -> None:
        """Partitions leave (revoke, drain): disarm the markers of those with nothing running (within
        ``budget_s``), forget them.

        A partition with records still running (the revoke's or drain's wait ran out) keeps its marker
        armed but ``revoked``: this process let it go alive, so the next owner counts no crash for it
        (HANDOVERS_PER_CRASH of them in a row count one). Counting it as a crash cost the chaos soak
        its p99 (26 s against 8 s) and 160 duplicates: the next owner read those partitions one
        record at a time, so its own revokes ran out more often.
        """
        releasing = {}
        try:
            async with asyncio.timeout(budget_s):
                async with self._lock:  # a round's marker writes land first, then are disarmed here
                    for tp, state in self._forget(partitions).items():
                        written = state.written
                        # Another process's marker stays as it is: the crash counted from it is not written yet.
                        if written is None or not written.armed or written.writer != self.me:
                            continue
                        if self.pending(tp):
                            releasing[tp] = replace(written, revoked=True)
                        else:
                            releasing[tp] = replace(written, armed=False, alone=False)
                    await self._write(releasing)
        except (KafkaError, OSError, TimeoutError) as exc:
            # Left as they were: the next owner may count one crash too many, which is the safe side.
            log.warning(
                "could not disarm the quarantine markers of %s: %r", sorted(releasing or partitions), exc
            )
            self._forget(partitions)

    def _forget(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, PartitionState]:
        """Stop owning ``partitions`` here; returns the states they had."""
        partitions = set(partitions)
        self._read_since_assigned -= partitions
        # In partition order: the markers are written in this order (a set's order follows string hashing).
        return {
            tp: state for tp in sorted(partitions) if (state := self._partitions.pop(tp, None)) is not None
        }

    async def close(self, budget_s: float) -> None:
        """Stop the marker producer and reader, within ``budget_s`` whatever the broker does."""
        try:
            async with asyncio.timeout(budget_s):
                await self.markers.close()
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning("closing the quarantine's clients failed: %r", exc)

    # --- inside ------------------------------------------------------------------------------

    async def _write(self, markers: dict[TopicPartition, Marker], *, forgotten: bool = False) -> None:
        fresh = markers if forgotten else {tp: m for tp, m in markers.items() if self._written(tp) != m}
        if not fresh:
            return
        await asyncio.gather(*(self.markers.write(tp, m) for tp, m in fresh.items()))
        for tp, marker in fresh.items():
            if tp in self._partitions:
                self._partitions[tp].written = marker

    def _written(self, tp: TopicPartition) -> Marker | None:
        state = self._partitions.get(tp)
        return state.written if state is not None else None


async def open_quarantine(
    settings: Settings,
    clients: KafkaClients,
    tracker: OffsetTracker[TopicPartition],
    wait_until: Callable[[Callable[[], bool]], Awaitable[None]],
    generation: Callable[[], int],
) -> Quarantine:
    """The quarantine of a connected worker: its topic made sure of and its marker clients made by
    ``clients.marker_clients`` (the seam a simulation fakes), then started."""
    assert clients.consumer is not None
    topic = quarantine_topic(settings.topic_prefix)
    producer, reader = await clients.marker_clients(topic, COMPACTED)
    markers = MarkerLog(topic, settings.group_id, producer, reader)
    await markers.start()
    return Quarantine(
        markers, clients.consumer, tracker, wait_until, generation, max_crashes=settings.max_crash_attempts
    )


def _by_partition(
    records: list[ConsumerRecord[Any, Any]],
) -> dict[TopicPartition, list[ConsumerRecord[Any, Any]]]:
    grouped: dict[TopicPartition, list[ConsumerRecord[Any, Any]]] = {}
    for record in records:
        grouped.setdefault(TopicPartition(record.topic, record.partition), []).append(record)
    return grouped


def poison_answer(origin: Origin, key: bytes | None, crashes: int) -> Outgoing:
    """The error reply (and DLQ copy) of a request skipped as poison; its body is not parsed (it may be
    what crashed), so the request id is the record's key."""
    request_id = key.decode("utf-8", "replace") if key else None
    message = f"this request was running each time a worker died ({crashes} times); it was skipped"
    return rejection(origin, request_id, None, PoisonSuspected.code, message)
