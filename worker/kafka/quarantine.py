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
markers' topic is ``MarkerLog`` (worker/kafka/marker_log.py); ``Quarantine`` is the Kafka shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from schemas.topics import quarantine_topic
from worker.errors import PoisonSuspected
from worker.kafka.clients import KafkaClients
from worker.kafka.crash_markers import HANDOVERS_PER_CRASH, Marker, Suspicion, recover
from worker.kafka.fetching import Fetched
from worker.kafka.marker_log import COMPACTED, MarkerLog
from worker.kafka.messages import Origin, Outgoing, rejection
from worker.kafka.offsets import OffsetTracker
from worker.settings import Settings

log = logging.getLogger(__name__)

#: The fetch loop's wait for records while a record runs alone (fetch_timeout_ms otherwise).
HELD_FETCH_TIMEOUT_MS = 20
#: Longest the fetch loop waits for a record running alone to be answered before it looks around again.
HELD_WAIT_S = 0.5
#: Longest a drain waits to disarm markers (the broker may be away); a revoke gives it what is left of the
#: budget it shares with the commit before it (worker/flow.py, REVOKE_COMMIT_S).
RELEASE_BUDGET_S = 5.0


@dataclass
class _Partition:
    """One owned partition: its suspicion, its last written marker, offsets answered as poison."""

    suspicion: Suspicion
    written: Marker | None
    #: offset -> the crashes it caused (a redelivered one is answered as poison again)
    poisoned: dict[int, int] = field(default_factory=dict)
    #: paused here while its one record runs alone
    held: bool = False
    #: records fetched behind the one running alone, waiting here for their turn (offset order)
    backlog: list[ConsumerRecord[Any, Any]] = field(default_factory=list)
    #: the tracker's epoch the backlog was fetched in: a rewind since sends it back to the broker
    epoch: int = 0


@dataclass
class Admitted:
    """A round after the quarantine: the records to run, and the ones to answer as poison instead."""

    fetched: Fetched
    #: each with the crashes it caused
    poisoned: list[tuple[ConsumerRecord[Any, Any], int]]


class Quarantine:
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
        self._partitions: dict[TopicPartition, _Partition] = {}
        #: partitions whose assignment came before the last read of the topic (their markers are known)
        self._read_since_assigned: set[TopicPartition] = set()
        #: admit and release one at a time: a revoke during a round's marker writes disarms what they armed
        self._lock = asyncio.Lock()

    def pending(self, tp: TopicPartition) -> int:
        """Unanswered tracked records of ``tp``."""
        return self.tracker.pending([tp])

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
        for tp, taken in _by_partition(fetched.records).items():
            state = self._partitions.get(tp)
            if state is None:
                continue  # revoked while this round waited: the next owner reads it from the commit
            if state.backlog:
                # A resume of every partition (backpressure) let it fetch past records still waiting
                # here: those are read again later, so what waits here stays within one fetch.
                self.consumer.seek(tp, taken[0].offset)
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
                    state.suspicion = Suspicion()
                records += taken
                last = taken[-1].offset
                written = state.written
                # Only a marker of this process covers the round: another's (a revoked one) says nothing of it.
                covered = (
                    written is not None
                    and written.armed
                    and written.writer == self.me
                    and last <= written.upto
                )
                if not covered:
                    arming[tp] = self._armed(state, last, alone=False)
        assigned = self.consumer.assignment()
        for tp, state in self._partitions.items():
            if state.backlog and tp in assigned:
                self._defer_undecodable(tp, state.backlog[0].offset, undecodable)
        await self._write(arming)
        return Admitted(Fetched(records, undecodable), poisoned)

    def fetch_timeout_ms(self, usual_ms: int) -> int:
        """How long the next fetch may wait: short while a record runs alone, so the one behind it
        starts soon after its answer instead of after a fetch of the other partitions times out."""
        held = any(map(self._running_alone, self._partitions))
        return min(usual_ms, HELD_FETCH_TIMEOUT_MS) if held else usual_ms

    async def held_back(self) -> Fetched | None:
        """Records waiting here whose turn has come (their partition's one running record is answered),
        as a round for ``admit``; partitions with none left and nothing running are resumed.

        Held records are run from memory, not fetched again: a broker that answers a fetch only when
        its wait expires (the embedded one) would add that wait to every record.
        """
        out: list[ConsumerRecord[Any, Any]] = []
        assigned = self.consumer.assignment()
        if assigned and all(self._running_alone(tp) for tp in assigned):
            # Nothing else to fetch: wait for the answer instead of polling (a fetch would sleep).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HELD_WAIT_S):
                    await self.wait_until(lambda: not all(map(self._running_alone, assigned)))
        for tp, state in self._partitions.items():
            if state.backlog and self.tracker.epoch(tp) != state.epoch:
                # Rewound since: the flow seeks it (between rounds) to an offset tracked before them.
                log.info("%s was rewound: its held records are read again", tp)
                state.backlog = []
            if not state.held or self.pending(tp) or tp not in assigned:
                continue
            if state.backlog:
                out += state.backlog
                state.backlog = []
            else:
                state.held = False
                self.consumer.resume(tp)
        return Fetched(out, []) if out else None

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

    def _forget(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, _Partition]:
        """Stop owning ``partitions`` here; returns the states they had."""
        partitions = set(partitions)
        self._read_since_assigned -= partitions
        # In partition order: the markers are written in this order (a set's order follows string hashing).
        return {
            tp: state for tp in sorted(partitions) if (state := self._partitions.pop(tp, None)) is not None
        }

    def reread(self, partitions: Collection[TopicPartition]) -> None:
        """A round of ``partitions`` that was not tracked goes back to the broker (the caller seeks them to
        its first offsets): what waits here behind it goes too."""
        for tp in partitions:
            state = self._partitions.get(tp)
            if state is not None:
                state.backlog = []

    async def close(self, budget_s: float) -> None:
        """Stop the marker producer and reader, within ``budget_s`` whatever the broker does."""
        try:
            async with asyncio.timeout(budget_s):
                await self.markers.close()
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning("closing the quarantine's clients failed: %r", exc)

    # --- inside ------------------------------------------------------------------------------

    async def _recover(self, fetched: Fetched) -> None:
        starts: dict[TopicPartition, int] = {}
        for tp, offset in [(TopicPartition(r.topic, r.partition), r.offset) for r in fetched.records] + [
            (u.tp, u.offset) for u in fetched.undecodable
        ]:
            if tp not in self._partitions:
                starts[tp] = min(offset, starts.get(tp, offset))
        if not starts:
            return
        if not starts.keys() <= self._read_since_assigned:
            # Read once for every partition assigned by now: the previous owners' last markers were
            # acknowledged before the rebalance that assigned them here ended.
            self._read_since_assigned = set(self.consumer.assignment())
            await self.markers.catch_up()
        markers = self.markers.latest(starts)
        for tp, resume_at in starts.items():
            marker = markers.get(tp)
            suspicion = recover(marker, resume_at, self.me)
            if marker is not None and suspicion.crashed:
                running = (
                    f"offset {marker.upto} alone" if marker.alone else f"offsets {resume_at}..{marker.upto}"
                )
                log.error(
                    "%s: its last owner died with %s running (crash %d of %d allowed for it); "
                    "reading through offset %d one record at a time",
                    tp,
                    running,
                    suspicion.charged(marker.upto),
                    self.max_crashes,
                    suspicion.suspect_to,
                )
            elif suspicion.handed:
                log.info(
                    "%s: its last owner let it go alive with offsets %d..%d running (hand-over %d of %d "
                    "that count one crash); no crash counted",
                    tp,
                    resume_at,
                    marker.upto if marker is not None else resume_at,
                    suspicion.handed,
                    HANDOVERS_PER_CRASH,
                )
            self._partitions[tp] = _Partition(suspicion, marker)

    def _armed(self, state: _Partition, upto: int, *, alone: bool) -> Marker:
        s = state.suspicion
        named = s.named_crashes if alone and upto == s.named else 0
        return Marker(
            upto,
            True,
            s.crashes,
            alone,
            s.suspect_to,
            self.me,
            named,
            handed=s.handed,
            resumed_at=s.resumed_at,
        )

    def _poison(self, tp: TopicPartition, state: _Partition, offset: int) -> int:
        crashes = state.poisoned.get(offset, state.suspicion.charged(offset))
        if offset not in state.poisoned:
            log.error(
                "%s offset %d killed its worker %d times: answered as poison_suspected, not run again",
                tp,
                offset,
                crashes,
            )
            state.poisoned[offset] = crashes
        state.suspicion = Suspicion()  # its crashes are explained: the records behind it run whole again
        return crashes

    def _running_alone(self, tp: TopicPartition) -> bool:
        state = self._partitions.get(tp)
        return state is not None and state.held and self.pending(tp) > 0

    def _hold(self, tp: TopicPartition, state: _Partition) -> None:
        # Paused again each time: a resume of every partition (backpressure) may have let it go.
        state.held = True
        self.consumer.pause(tp)

    def _defer_undecodable(self, tp: TopicPartition, first_held: int, undecodable: list[Any]) -> None:
        """Undecodable records behind held ones are left for later: offsets are tracked in order."""
        later = [u.offset for u in undecodable if u.tp == tp and u.offset > first_held]
        if later:
            undecodable[:] = [u for u in undecodable if u.tp != tp or u.offset < min(later)]
            self.consumer.seek(tp, min(later))

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
