"""The first round of a partition after its assignment: its last marker read, a crash counted, the records
to read one at a time and those to answer as poison named (the rules are worker/kafka/crash_markers.py)."""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaConsumer, TopicPartition

from worker.kafka.crash_markers import HANDOVERS_PER_CRASH, Marker, Suspicion, recover
from worker.kafka.fetching import Fetched
from worker.kafka.held_records import PartitionState
from worker.kafka.marker_log import MarkerLog

# The logger of the part this is a piece of: its records keep the name operators and tests filter by.
log = logging.getLogger("worker.kafka.quarantine")


class CrashCounting:
    """The quarantine's crash counting: markers read at a partition's first round, its suspicion, the
    markers armed with the counts inherited, the records named as poison."""

    markers: MarkerLog
    consumer: AIOKafkaConsumer
    me: str
    max_crashes: int
    _partitions: dict[TopicPartition, PartitionState]
    _read_since_assigned: set[TopicPartition]

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
            self._partitions[tp] = PartitionState(suspicion, marker)

    def _armed(self, state: PartitionState, upto: int, *, alone: bool) -> Marker:
        s = state.suspicion
        # Each named record's count rides along in every marker (innocent records before it run alone
        # first; a hand-over may come between): a crash then names whichever record runs alone.
        return Marker(
            upto,
            True,
            s.crashes,
            alone,
            s.suspect_to,
            self.me,
            handed=s.handed,
            resumed_at=s.resumed_at,
            poison=s.poison,
            poison_crashes=s.poison_crashes,
            alone_crashes=s.named,
        )

    def _poison(self, tp: TopicPartition, state: PartitionState, offset: int) -> int:
        crashes = state.poisoned.get(offset, state.suspicion.crashes_of(offset))
        if offset not in state.poisoned:
            log.error(
                "%s offset %d killed its worker %d times: answered as poison_suspected, not run again",
                tp,
                offset,
                crashes,
            )
            state.poisoned[offset] = crashes
        # Its crashes are explained: the records behind it run whole again. The markers written from now
        # on carry the verdict, so an owner that resumes at it (a commit past it failed) answers it again.
        state.suspicion = Suspicion(poison=offset, poison_crashes=crashes)
        return crashes
