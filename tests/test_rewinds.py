"""Rewinds, revokes and held work, without a broker: the offset tracker, the flow and the batcher.

Give-ups handed to ``Flow.redeliver`` in offset order must not let the last seek (the highest
offset) win while the tracker drops the lower ones, so that the next commit passes them. The
consumer here is a fake of the few calls the flow makes (assignment, pause, seek, getmany,
commit), recording each: a real consumer cannot be made to rebalance or hang on cue in a unit
test. The same paths run against the real broker in tests/test_broker_loss.py and
tests/test_outages.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import TopicPartition

from worker.kafka import commits as flow_module
from worker.kafka.commits import Flow
from worker.kafka.offsets import OffsetTracker
from worker.serving.batching import BatchQueue
from worker.settings import Settings

TP = TopicPartition("inference.text.requests", 0)
OTHER = TopicPartition("inference.text.requests", 1)


class FakeConsumer:
    """The consumer calls Flow makes, with a position per partition that ``seek`` and ``getmany`` move."""

    def __init__(self, *partitions: TopicPartition) -> None:
        self.assigned = set(partitions)
        self.paused_set: set[TopicPartition] = set()
        self.positions: dict[TopicPartition, int] = {}
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.polls = 0
        self.commits: list[dict[TopicPartition, int]] = []
        self.commit_hangs = False

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def paused(self) -> set[TopicPartition]:
        return set(self.paused_set)

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused_set.update(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused_set.difference_update(partitions)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))
        self.positions[tp] = offset

    async def getmany(self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int = 1) -> Any:
        self.polls += 1
        await asyncio.sleep(timeout_ms / 1000)
        return {}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.commit_hangs:
            await asyncio.Event().wait()  # a coordinator that never answers
        self.commits.append(dict(offsets))


def flow_over(consumer: FakeConsumer, **knobs: Any) -> Flow:
    flow = Flow(Settings(bootstrap_servers="unused:9092", session_timeout_ms=2000, **knobs))
    flow.consumer = consumer  # type: ignore[assignment]
    return flow


def track_range(tracker: OffsetTracker[TopicPartition], start: int, stop: int, nbytes: int = 10) -> int:
    """Track offsets [start, stop) of TP in its current epoch, as one fetch round; returns that epoch."""
    epoch = tracker.epoch(TP)
    for offset in range(start, stop):
        assert tracker.track(TP, offset, nbytes, epoch)
    return epoch


def test_give_ups_in_offset_order_seek_to_the_lowest_and_commit_nothing_past_it() -> None:
    """The measured defect: replies 3..9 give up one after another, in offset order."""
    consumer = FakeConsumer(TP)
    flow = flow_over(consumer)
    epoch = track_range(flow.tracker, 0, 10)
    for offset in range(3):
        flow.tracker.done(TP, offset, epoch)
    for offset in range(3, 10):
        flow.redeliver(TP, offset, epoch, TimeoutError("broker away"))
    flow.apply_seeks()
    assert consumer.seeks == [(TP, 3)]
    assert flow.tracker.take_commits() == {TP: 3}
    # Every given-up reply lets go of its message: nothing is counted twice, nothing leaks.
    for offset in range(3, 10):
        flow.tracker.release(TP, offset, epoch)
    assert flow.tracker.in_flight == 0 and flow.tracker.bytes_in_flight == 0


def test_a_later_give_up_below_an_earlier_rewind_moves_the_position_further_back_never_forward() -> None:
    consumer = FakeConsumer(TP)
    flow = flow_over(consumer)
    first = track_range(flow.tracker, 0, 10)
    flow.redeliver(TP, 6, first, TimeoutError())
    flow.apply_seeks()
    second = track_range(flow.tracker, 6, 12)  # read again after the seek, in the new epoch
    assert second != first
    flow.redeliver(TP, 8, first, TimeoutError())  # stale: 8 of the first epoch was already dropped
    flow.redeliver(TP, 2, first, TimeoutError())  # 2 is still tracked from the first epoch: back to 2
    flow.redeliver(TP, 9, second, TimeoutError())  # dropped by the rewind to 2: ignored
    flow.apply_seeks()
    assert consumer.seeks == [(TP, 6), (TP, 2)]
    assert flow.tracker.take_commits() == {}


def test_records_fetched_before_a_rewind_are_not_tracked_after_it() -> None:
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    epochs = tracker.epochs()  # a fetch round begins
    epoch = track_range(tracker, 0, 5)
    assert tracker.rewind(TP, 2, epoch)
    # Records 5.. of the same round arrive after the rewind: refused, they are read again after the seek.
    assert not tracker.track(TP, 5, 10, epochs.get(TP, 0))
    assert tracker.track(TP, 2, 10, tracker.epoch(TP))


def test_an_answer_from_before_a_rewind_never_commits_the_offsets_read_again() -> None:
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    old = track_range(tracker, 0, 5)
    tracker.done(TP, 0, old)
    assert tracker.rewind(TP, 2, old)  # 2's reply gave up; 3 and 4 were still running
    new = track_range(tracker, 2, 5)
    tracker.done(TP, 1, old)  # 1 was before the rewind: its answer counts
    tracker.done(TP, 3, old)  # 3's first run answered late: it must not count for 3 read again
    tracker.done(TP, 4, old)
    assert tracker.take_commits() == {TP: 2}
    for offset in (3, 4):
        tracker.done(TP, offset, new)
    assert tracker.take_commits() == {}, "2 read again is unanswered"
    tracker.done(TP, 2, new)
    assert tracker.take_commits() == {TP: 5}


def test_rewound_and_revoked_work_stays_counted_until_its_holder_lets_it_go() -> None:
    """Invariant I3: a rewind or a revoke must not free room for a whole new fetch while the old
    jobs still hold their memory (queued ones are dropped and released, running ones end)."""
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    epoch = track_range(tracker, 0, 4, nbytes=100)
    tracker.add_bytes(TP, 1, 1000, epoch)
    tracker.track(OTHER, 0, 50)
    assert tracker.rewind(TP, 1, epoch)
    assert tracker.in_flight == 5 and tracker.bytes_in_flight == 1450
    tracker.add_bytes(TP, 2, 7, epoch)  # a held job's prepared arrays still count
    tracker.release(TP, 1, epoch)
    tracker.done(TP, 2, epoch)  # a running batch answered: counted off, never committed
    tracker.release(TP, 2, epoch)  # settled already: nothing more
    assert tracker.in_flight == 3 and tracker.bytes_in_flight == 250  # 0 and 3 of TP, 0 of OTHER
    tracker.forget([OTHER])
    assert tracker.in_flight == 3 and tracker.pending([OTHER]) == 0
    tracker.release(OTHER, 0, 0)
    tracker.release(TP, 3, epoch)
    tracker.done(TP, 0, epoch)
    assert tracker.in_flight == 0 and tracker.bytes_in_flight == 0
    assert tracker.take_commits() == {TP: 1}


def test_queued_jobs_of_dropped_offsets_leave_the_batcher() -> None:
    queue: BatchQueue[str, tuple[int, int]] = BatchQueue(max_batch_size=4, max_wait=60.0)
    for offset in range(6):
        queue.add("short" if offset % 2 else "long", (offset, 0), now=float(offset))
    dropped = queue.drop(lambda item: item[0] >= 3)
    assert sorted(dropped) == [(3, 0), (4, 0), (5, 0)]
    assert len(queue) == 3
    assert queue.pop_ready(now=0.0, flush=True) == ("long", [(0, 0), (2, 0)])
    assert queue.pop_ready(now=0.0, flush=True) == ("short", [(1, 0)])
    assert queue.pop_ready(now=0.0, flush=True) is None


async def test_a_revoke_drops_pending_seeks_and_later_give_ups_of_the_old_assignment() -> None:
    """A rewind never crosses an assignment: re-assigned, the partition starts from the committed offset."""
    consumer = FakeConsumer(TP)
    flow = flow_over(consumer)
    epoch = track_range(flow.tracker, 0, 6)
    flow.tracker.done(TP, 0, epoch)
    flow.redeliver(TP, 3, epoch, TimeoutError())  # asked, not yet sought
    await flow.partitions_revoked([TP])
    assert consumer.commits == [{TP: 1}]
    flow.apply_seeks()
    flow.redeliver(TP, 1, epoch, TimeoutError())  # a give-up of the old assignment, after the revoke
    flow.apply_seeks()
    assert consumer.seeks == []
    assert not flow.tracker.track(TP, 6, 10, epoch), "a record fetched before the revoke"


async def test_the_commit_before_a_revoke_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The revoke's commit is bounded: aiokafka retries it while the coordinator is away, holding the
    rebalance."""
    monkeypatch.setattr(flow_module, "REVOKE_COMMIT_S", 0.3)
    consumer = FakeConsumer(TP)
    consumer.commit_hangs = True
    flow = flow_over(consumer)
    epoch = track_range(flow.tracker, 0, 2)
    flow.tracker.done(TP, 0, epoch)
    flow.tracker.done(TP, 1, epoch)
    async with asyncio.timeout(3):
        await flow.partitions_revoked([TP])
    assert flow.tracker.in_flight == 0


async def test_a_commit_that_fails_hands_its_positions_to_the_next_one() -> None:
    consumer = FakeConsumer(TP, OTHER)
    consumer.commit_hangs = True
    flow = flow_over(consumer)
    flow.tracker.track(TP, 0)
    flow.tracker.done(TP, 0)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await flow.commit()
    consumer.commit_hangs = False
    await flow.commit()
    assert consumer.commits == [{TP: 1}]


async def test_a_worker_paused_by_backpressure_keeps_polling_the_consumer() -> None:
    """aiokafka leaves the group when getmany is not called for max_poll_interval_ms."""
    consumer = FakeConsumer(TP, OTHER)
    flow = flow_over(consumer, max_in_flight=2)
    flow.tracker.track(TP, 0)
    flow.tracker.track(TP, 1)
    flow.apply_backpressure()
    assert flow.paused and consumer.paused() == {TP, OTHER}
    await flow.keep_membership(1)
    await flow.keep_membership(1)
    assert consumer.polls == 2
