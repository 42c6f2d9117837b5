"""Suspect partitions read one record at a time: the one record runs alone, the records fetched behind it
wait here for their turn (``Quarantine`` decides which partitions are suspect)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from worker.kafka.crash_markers import Marker, Suspicion
from worker.kafka.fetching import Fetched
from worker.kafka.offsets import OffsetTracker

# The logger of the part this is a piece of: its records keep the name operators and tests filter by.
log = logging.getLogger("worker.kafka.quarantine")

#: The fetch loop's wait for records while a record runs alone (fetch_timeout_ms otherwise).
HELD_FETCH_TIMEOUT_MS = 20
#: Longest the fetch loop waits for a record running alone to be answered before it looks around again.
HELD_WAIT_S = 0.5


@dataclass
class PartitionState:
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


class HeldRecords:
    """The quarantine's holding: a suspect partition paused while its one record runs alone, the records
    behind it run from memory when their turn comes."""

    consumer: AIOKafkaConsumer
    tracker: OffsetTracker[TopicPartition]
    wait_until: Callable[[Callable[[], bool]], Awaitable[None]]
    _partitions: dict[TopicPartition, PartitionState]

    def held_partitions(self) -> set[TopicPartition]:
        """The partitions paused here while a record of theirs runs alone (a backpressure resume skips them)."""
        return {tp for tp, state in self._partitions.items() if state.held}

    def pending(self, tp: TopicPartition) -> int:
        """Unanswered tracked records of ``tp``."""
        return self.tracker.pending([tp])

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

    def reread(self, partitions: Collection[TopicPartition]) -> None:
        """A round of ``partitions`` that was not tracked goes back to the broker (the caller seeks them to
        its first offsets): what waits here behind it goes too."""
        for tp in partitions:
            state = self._partitions.get(tp)
            if state is not None:
                state.backlog = []

    def _running_alone(self, tp: TopicPartition) -> bool:
        state = self._partitions.get(tp)
        return state is not None and state.held and self.pending(tp) > 0

    def _hold(self, tp: TopicPartition, state: PartitionState) -> None:
        state.held = True
        self.consumer.pause(tp)

    def _defer_undecodable(
        self, tp: TopicPartition, state: PartitionState, undecodable: list[Any], sent_back: int | None
    ) -> None:
        """Undecodable records behind held ones are left for later (offsets are tracked in order): the
        partition goes back to the first of them, or to the first record this round sent back
        (``sent_back``) if that is lower, and stays held until its turn comes."""
        later = [u.offset for u in undecodable if u.tp == tp and u.offset > state.backlog[0].offset]
        if later:
            undecodable[:] = [u for u in undecodable if u.tp != tp or u.offset < min(later)]
            self.consumer.seek(tp, min(later) if sent_back is None else min(min(later), sent_back))
            self._hold(tp, state)
