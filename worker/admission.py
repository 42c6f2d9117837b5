"""Admission: a fetched round tracked, each request prepared and queued in its batcher or answered.

Offsets enter the tracker here (``track``) in the epoch of their round; a record that reached no
batcher and no delivery is let go here too. A rewind or a revoke drops queued jobs (``drop_stale``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from aiokafka import TopicPartition

from worker.intake import Intake, Job
from worker.kafka.commits import Flow
from worker.kafka.fetching import Fetched
from worker.kafka.messages import Origin, Outgoing
from worker.kafka.offsets import OffsetTracker
from worker.kafka.quarantine import poison_answer
from worker.kafka.rounds import coordinates, first_offsets, tp_of
from worker.run_state import RunState
from worker.serving.batching import MicroBatcher
from worker.serving.metadata import Bucket

log = logging.getLogger(__name__)


class Admission:
    """Takes tracked rounds in: each request prepared on the intake's threads, then queued or answered."""

    def __init__(
        self,
        state: RunState,
        flow: Flow,
        intake: Intake,
        batchers: Mapping[str, MicroBatcher[Bucket, Job]],
        publish: Callable[[list[Outgoing]], Coroutine[Any, Any, None]],
    ) -> None:
        self._state = state
        self.flow = flow
        self.tracker: OffsetTracker[Any] = flow.tracker
        self.intake = intake
        self.batchers = batchers
        self._publish = publish

    def track(self, fetched: Fetched, epochs: Mapping[TopicPartition, int]) -> Fetched:
        """Track one round's records in the epochs they were fetched in (``epochs``, taken as the round
        began); those a rewind or a revoke overtook during the round are left out: they are read again.
        Nothing here can fail but a broken offset order: what is tracked is what ``read_again`` rewinds."""
        tracker = self.tracker
        return Fetched(
            [
                record
                for record in fetched.records
                if tracker.track(
                    tp := tp_of(record), record.offset, len(record.value or b""), epochs.get(tp, 0)
                )
            ],
            [
                bad
                for bad in fetched.undecodable
                if tracker.track(bad.tp, bad.offset, 0, epochs.get(bad.tp, 0))
            ],
        )

    def read_again(self, tracked: Fetched, epochs: Mapping[TopicPartition, int], why: BaseException) -> None:
        """Rewind every partition of a round that could not be taken in to its first offset."""
        for tp, offset in first_offsets(tracked).items():
            self.flow.redeliver(tp, offset, epochs.get(tp, 0), why)
        for tp, offset in coordinates(tracked):  # what reached no batcher and no delivery is let go here
            self.tracker.release(tp, offset, epochs.get(tp, 0))

    async def take(
        self,
        tracked: Fetched,
        poison_of: Mapping[tuple[TopicPartition, int], int],
        epochs: Mapping[TopicPartition, int],
    ) -> None:
        """Prepare and queue one tracked round; errors are answered off the intake path, and the records
        the quarantine named as poison (``poison_of``: coordinates -> crashes) without being prepared."""
        poisoned = [r for r in tracked.records if (tp_of(r), r.offset) in poison_of]
        origins = [self.intake.origin(r) for r in tracked.records if (tp_of(r), r.offset) not in poison_of]
        rejected = [self.intake.undecodable(bad) for bad in tracked.undecodable]
        rejected += [
            poison_answer(self.intake.origin(r), r.key, poison_of[(tp_of(r), r.offset)]) for r in poisoned
        ]
        for origin in [*origins, *(out.origin for out in rejected)]:
            origin.epoch = epochs.get(origin.tp, 0)
        if rejected:
            self._state.spawn(self._publish(rejected))
        if origins:
            # Each request goes to its batcher (or is answered) the moment it is prepared; the round
            # counts as being taken in until its last one is, so a drain waits for them.
            self._state.fetching_rounds += 1
            try:
                handed_on = await self.intake.take_in(origins, self._prepared, self._not_prepared)
            except BaseException:
                self._state.fetching_rounds -= 1
                raise
            self._state.spawn(self._round_taken(handed_on))
        self.flow.apply_backpressure()

    def _prepared(self, outcome: Job | Outgoing) -> None:
        """One request prepared: its bytes counted at once (admission sees them), then queued or answered."""
        origin, tracker = outcome.origin, self.tracker
        if not tracker.current(origin.tp, origin.offset, origin.epoch):
            tracker.release(origin.tp, origin.offset, origin.epoch)  # rewound or revoked while prepared
            return
        if isinstance(outcome, Outgoing):
            self._state.spawn(self._publish([outcome]))
            return
        tracker.add_bytes(origin.tp, origin.offset, outcome.prepared_bytes, origin.epoch)
        self.batchers[outcome.model.name].put(outcome.prepared.shape_key, outcome, outcome.rows)
        self.flow.apply_backpressure()

    def _not_prepared(self, origin: Origin, why: BaseException) -> None:
        """A fault of ours while preparing: it costs a redelivery of that record, not the request."""
        log.error("internal error preparing %s offset %d", origin.tp, origin.offset, exc_info=why)
        self.flow.redeliver(origin.tp, origin.offset, origin.epoch, why)
        self.tracker.release(origin.tp, origin.offset, origin.epoch)  # it reached no batcher

    async def _round_taken(self, handed_on: asyncio.Future[None]) -> None:
        try:
            await handed_on
        finally:
            self._state.fetching_rounds -= 1
            self.flow.progressed()

    def drop_stale(self) -> None:
        """After a rewind or a revoke: queued jobs of dropped offsets leave the batchers (they are read
        again) and stop counting; jobs already running count until their batch ends."""
        tracker = self.tracker
        for batcher in self.batchers.values():
            stale = batcher.drop(
                lambda job: not tracker.current(job.origin.tp, job.origin.offset, job.origin.epoch)
            )
            for job in stale:
                tracker.release(job.origin.tp, job.origin.offset, job.origin.epoch)
        self.flow.progressed()
        self.flow.apply_backpressure()
