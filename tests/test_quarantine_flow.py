"""The quarantine's held records against rewinds and revokes (worker/kafka/quarantine.py with worker/kafka/offsets.py).

Without a broker: the marker log and the consumer are fakes of the few calls the quarantine makes
(a real consumer cannot be made to rewind or rebalance on cue in a unit test; the same paths run
against the real broker in tests/test_poison_pill.py). The tracker is the real one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition

from worker.kafka.commits import Flow
from worker.kafka.crash_markers import Marker
from worker.kafka.decode_failures import Undecodable
from worker.kafka.fetching import Fetched
from worker.kafka.offsets import OffsetTracker
from worker.kafka.quarantine import Quarantine
from worker.settings import Settings

TP = TopicPartition("inference.text.requests", 0)


class FakeMarkers:
    """The marker log: one preset marker per partition, every write recorded."""

    def __init__(self, preset: dict[TopicPartition, Marker]) -> None:
        self.preset = preset
        self.written: list[tuple[TopicPartition, Marker]] = []

    async def catch_up(self) -> None:
        pass

    def latest(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, Marker]:
        return {tp: self.preset[tp] for tp in partitions if tp in self.preset}

    async def write(self, tp: TopicPartition, marker: Marker) -> None:
        self.written.append((tp, marker))


class FakeConsumer:
    """assignment, pause, resume and seek, recorded."""

    def __init__(self) -> None:
        self.assigned = {TP}
        self.paused_set: set[TopicPartition] = set()
        self.seeks: list[tuple[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def pause(self, *tps: TopicPartition) -> None:
        self.paused_set.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused_set.difference_update(tps)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))


def records(first: int, last: int) -> list[ConsumerRecord[Any, Any]]:
    return [
        ConsumerRecord(TP.topic, TP.partition, o, 0, 0, str(o).encode(), b"{}", None, 1, 2, ())
        for o in range(first, last + 1)
    ]


async def _now(predicate: Callable[[], bool]) -> None:
    pass


def quarantine(
    tracker: OffsetTracker[TopicPartition], generation: list[int]
) -> tuple[Quarantine, FakeConsumer]:
    # The last owner died with offsets 0..9 running: this owner reads them one at a time.
    dead = Marker(upto=9, armed=True, writer="a-dead-process")
    consumer = FakeConsumer()
    markers = FakeMarkers({TP: dead})
    q = Quarantine(markers, consumer, tracker, _now, lambda: generation[0], max_crashes=3)  # type: ignore[arg-type]
    return q, consumer


async def test_a_rewind_sends_the_held_records_back_to_the_broker() -> None:
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    q, consumer = quarantine(tracker, [0])
    admitted = await q.admit(Fetched(records(0, 5), []), {}, 0)
    assert admitted is not None and [r.offset for r in admitted.fetched.records] == [0]
    assert TP in consumer.paused_set, "1..5 wait in memory, the partition paused"
    assert tracker.track(TP, 0, 2, 0)
    # Offset 0's reply gives up: the flow rewinds the partition to 0 (epoch 1; it seeks there itself).
    assert tracker.rewind(TP, 0, 0)
    # 1..5 were fetched in epoch 0: not handed out (they would be tracked after 0 is read again, or
    # twice once the seek brings them back); the partition resumes so 0..5 are fetched again.
    assert await q.held_back() is None
    assert TP not in consumer.paused_set
    again = await q.admit(Fetched(records(0, 5), []), tracker.epochs(), 0)
    assert again is not None and [r.offset for r in again.fetched.records] == [0]
    assert tracker.track(TP, 0, 2, tracker.epoch(TP))
    tracker.done(TP, 0, tracker.epoch(TP))
    # Answered in the new epoch: 1 comes next, from memory, then 2, in order, none skipped.
    held = await q.held_back()
    assert held is not None and [r.offset for r in held.records] == [1, 2, 3, 4, 5]
    nxt = await q.admit(held, tracker.epochs(), 0)
    assert nxt is not None and [r.offset for r in nxt.fetched.records] == [1]


async def test_a_backpressure_resume_leaves_a_partition_held_while_its_record_runs_alone() -> None:
    flow = Flow(Settings(bootstrap_servers="unused:9092", max_in_flight=2))
    tracker = flow.tracker
    q, consumer = quarantine(tracker, [0])
    other = TopicPartition(TP.topic, 1)
    consumer.assigned.add(other)
    flow.consumer = consumer  # type: ignore[assignment]
    flow.kept_paused["quarantine"] = q.held_partitions
    admitted = await q.admit(Fetched(records(0, 5), []), {}, 0)
    assert admitted is not None and [r.offset for r in admitted.fetched.records] == [0]
    assert tracker.track(TP, 0, 2, 0)
    assert tracker.track(other, 0, 2, 0)
    flow.apply_backpressure()
    assert flow.paused and consumer.paused_set == {TP, other}
    tracker.done(other, 0, 0)
    flow.apply_backpressure()  # below half of max_in_flight: every partition resumed but the held one
    assert not flow.paused
    assert consumer.paused_set == {TP}, "the held partition was resumed while its record runs alone"
    tracker.done(TP, 0, 0)
    held = await q.held_back()
    assert held is not None and [r.offset for r in held.records] == [1, 2, 3, 4, 5]


async def test_a_revoke_forgets_the_held_records_and_a_round_it_overtook_is_not_admitted() -> None:
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    generation = [0]
    q, consumer = quarantine(tracker, generation)
    admitted = await q.admit(Fetched(records(0, 5), []), {}, 0)
    assert admitted is not None and [r.offset for r in admitted.fetched.records] == [0]
    assert tracker.track(TP, 0, 2, 0)
    # The revoke (Flow.partitions_revoked): release with 0 still running, then forget, generation + 1.
    await q.release([TP])
    tracker.forget([TP])
    generation[0] += 1
    last = q.markers.written[-1]  # type: ignore[attr-defined]
    assert last[1].armed and last[1].revoked and last[1].upto == 0, "let go alive with 0 running"
    # A round fetched before the revoke is refused whole; nothing is held any more.
    assert await q.admit(Fetched(records(6, 7), []), {}, 0) is None
    consumer.paused_set.clear()
    assert await q.held_back() is None


async def test_a_round_fetched_past_the_held_records_goes_back_whole_and_its_partition_stays_held() -> None:
    """A resume of every partition (backpressure) lets a held partition fetch past what waits here. Its
    records and an undecodable record behind them all go back to the broker, from the first record, and
    the partition is paused again. (Simulation seed 12934: the seek went to the undecodable record,
    past the good ones before it, which a later commit passed unanswered; and the partition, never
    paused again, re-read that batch every 45 ms while its one record ran.)"""
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    q, consumer = quarantine(tracker, [0])
    admitted = await q.admit(Fetched(records(0, 5), []), {}, 0)
    assert admitted is not None and [r.offset for r in admitted.fetched.records] == [0]
    assert tracker.track(TP, 0, 2, 0)
    consumer.paused_set.clear()  # backpressure resumed every partition
    again = await q.admit(Fetched(records(6, 7), [Undecodable(TP, 8, "corrupt")]), tracker.epochs(), 0)
    assert again is not None and not again.fetched.records and not again.fetched.undecodable
    assert consumer.seeks[-1] == (TP, 6), "6 and 7 are read again, not skipped"
    assert TP in consumer.paused_set
    # Only an undecodable record fetched past them: it waits too, its partition paused.
    consumer.paused_set.clear()
    alone = await q.admit(Fetched([], [Undecodable(TP, 6, "corrupt")]), tracker.epochs(), 0)
    assert alone is not None and not alone.fetched.undecodable
    assert consumer.seeks[-1] == (TP, 6)
    assert TP in consumer.paused_set, "held, not fetching the same batch every round"


async def test_a_round_a_rewind_overtook_does_not_end_the_one_at_a_time_reading() -> None:
    """Offsets 0..9 are read one at a time; 0 runs alone and its reply gives up, so the partition is
    rewound to 0. A round fetched in the epoch before, from past that range, is not taken: 0 comes back
    alone, not in a whole round. (Simulation seed 10227: the stale round ended the one-at-a-time
    reading, and the poison request behind 0 then ran in a whole round, its crash count lost.)"""
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    q, _ = quarantine(tracker, [0])
    admitted = await q.admit(Fetched(records(0, 5), []), {}, 0)
    assert admitted is not None and [r.offset for r in admitted.fetched.records] == [0]
    assert tracker.track(TP, 0, 2, 0)
    before = tracker.epochs()
    assert tracker.rewind(TP, 0, 0)
    assert await q.held_back() is None  # the held 1..5 go back to the broker
    stale = await q.admit(Fetched(records(10, 11), []), before, 0)
    assert stale is not None and not stale.fetched.records
    again = await q.admit(Fetched(records(0, 5), []), tracker.epochs(), 0)
    assert again is not None and [r.offset for r in again.fetched.records] == [0]


async def test_a_partition_assigned_back_runs_its_round_under_a_live_marker_not_its_revoked_one() -> None:
    """This process let the partition go alive with 0..5 running (its marker revoked: a hand-over, no crash
    if the next owner finds it) and got it back. A round it runs now is its own: were it to die with it
    running, that is a crash, so the round is armed afresh, not left under the revoked marker."""
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    q, _ = quarantine(tracker, [0])
    let_go = Marker(upto=5, armed=True, writer=q.me, revoked=True, resumed_at=0)
    q.markers.preset[TP] = let_go  # type: ignore[attr-defined]
    admitted = await q.admit(Fetched(records(0, 5), []), {}, 0)
    assert admitted is not None and [r.offset for r in admitted.fetched.records] == [0, 1, 2, 3, 4, 5]
    [(tp, marker)] = q.markers.written  # type: ignore[attr-defined]
    assert tp == TP and marker.armed and not marker.revoked and marker.upto == 5
