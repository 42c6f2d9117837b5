"""The micro-batcher's size/time triggers (fake time) and the offset tracker (invariant 1)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.kafka.offsets import OffsetTracker
from worker.serving.batching import ALIKE_WINDOW, BatcherClosed, BatchQueue, MicroBatcher


def test_a_full_bucket_is_ready_at_once() -> None:
    queue: BatchQueue[str, int] = BatchQueue(max_batch_size=3, max_wait=1.0)
    for i in range(3):
        queue.add("a", i, now=0.0)
    assert queue.pop_ready(now=0.0) == ("a", [0, 1, 2])
    assert len(queue) == 0


def test_a_partial_bucket_waits_for_its_oldest_item() -> None:
    queue: BatchQueue[str, int] = BatchQueue(max_batch_size=8, max_wait=0.5)
    queue.add("a", 1, now=10.0)
    queue.add("a", 2, now=10.3)
    assert queue.pop_ready(now=10.49) is None
    assert queue.next_deadline() == pytest.approx(10.5)
    assert queue.pop_ready(now=10.5) == ("a", [1, 2])


def test_buckets_never_mix_and_the_oldest_goes_first() -> None:
    queue: BatchQueue[str, int] = BatchQueue(max_batch_size=2, max_wait=1.0)
    queue.add("short", 1, now=0.0)
    queue.add("long", 2, now=0.1)
    queue.add("long", 3, now=0.2)
    queue.add("short", 4, now=0.3)
    assert queue.pop_ready(now=0.3) == ("short", [1, 4])
    assert queue.pop_ready(now=0.3) == ("long", [2, 3])


def test_size_trigger_takes_at_most_max_batch_size() -> None:
    queue: BatchQueue[str, int] = BatchQueue(max_batch_size=4, max_wait=1.0)
    for i in range(10):
        queue.add("a", i, now=0.0)
    assert queue.pop_ready(now=0.0) == ("a", [0, 1, 2, 3])
    assert queue.pop_ready(now=0.0) == ("a", [4, 5, 6, 7])
    assert queue.pop_ready(now=0.0) is None
    assert queue.pop_ready(now=0.0, flush=True) == ("a", [8, 9])


def test_a_bucket_can_hold_fewer_than_max_batch_size() -> None:
    sizes = {"short": 8, "long": 2}
    queue: BatchQueue[str, int] = BatchQueue(max_batch_size=4, max_wait=1.0, size_of=sizes.__getitem__)
    for i in range(3):
        queue.add("long", i, now=0.0)
        queue.add("short", 10 + i, now=0.0)
    assert queue.pop_ready(now=0.0) == ("long", [0, 1]), "two long items fill their bucket"
    assert queue.pop_ready(now=0.0) is None, "short holds 3 of 4: max_batch_size caps size_of's 8"
    queue.add("short", 13, now=0.0)
    assert queue.pop_ready(now=0.0) == ("short", [10, 11, 12, 13])
    assert queue.pop_ready(now=1.0) == ("long", [2])


def test_an_item_of_several_rows_counts_each_against_the_batch_size() -> None:
    # A zero-shot request is a text row per candidate label: counted one each, 32 requests with 64
    # labels would make one batch of 2,048 text rows. Rows fill the batch, hand-counted here.
    queue: BatchQueue[str, str] = BatchQueue(max_batch_size=8, max_wait=1.0)
    queue.add("k", "three", now=0.0, rows=3)
    queue.add("k", "three more", now=0.0, rows=3)
    assert queue.pop_ready(now=0.0) is None, "6 rows of 8"
    queue.add("k", "the ninth row", now=0.0, rows=3)
    assert queue.pop_ready(now=0.0) == ("k", ["three", "three more"]), "9 rows: the first 6 fit"
    queue.add("k", "twenty", now=0.0, rows=20)
    assert queue.pop_ready(now=0.0) == ("k", ["the ninth row"]), "20 more rows do not fit beside 3"
    assert queue.pop_ready(now=0.0) == ("k", ["twenty"]), "larger than a batch: alone (the engine splits it)"
    assert len(queue) == 0


def test_like_lengths_fill_a_batch_by_rows() -> None:
    lengths = {"a": 10, "b": 30, "c": 11, "d": 12, "e": 29}
    queue: BatchQueue[str, str] = BatchQueue(max_batch_size=4, max_wait=1.0, length_of=lengths.__getitem__)
    for item, rows in (("a", 1), ("b", 1), ("c", 3), ("d", 1), ("e", 1)):
        queue.add("k", item, now=0.0, rows=rows)
    # The oldest (a, 10 tokens) and the nearest lengths that fit 4 rows: c (11) is 3 rows, so d (12) waits.
    assert queue.pop_ready(now=0.0) == ("k", ["a", "c"])
    assert queue.pop_ready(now=0.0, flush=True) == ("k", ["b", "d", "e"])


def _by_length(max_tokens: int) -> BatchQueue[int, str]:
    """Keys are token lengths; each batch keeps within max_tokens (rows x length)."""
    return BatchQueue(
        max_batch_size=4,
        max_wait=1.0,
        size_of=lambda length: max_tokens // length,
        rank_of=lambda length: length,
    )


def test_a_batch_that_waited_takes_other_lengths_at_the_longest_shape() -> None:
    queue = _by_length(max_tokens=1000)
    queue.add(16, "a", now=0.0)
    queue.add(32, "b", now=0.1)
    queue.add(8, "c", now=0.2)
    assert queue.pop_ready(now=0.9) is None
    assert queue.pop_ready(now=1.0) == (32, ["a", "b", "c"]), "one run at 32 tokens, oldest first"
    assert len(queue) == 0


def test_when_more_is_queued_than_one_batch_holds_buckets_go_alone() -> None:
    queue = _by_length(max_tokens=64)  # 16 tokens: 4 rows; 32 tokens: 2 rows
    for i, length in enumerate([16, 16, 32, 16, 32]):
        queue.add(length, f"r{i}", now=i / 10)
    # Five items would not fit one batch at 32 tokens (2 rows): no 16-token text is padded to 32.
    assert queue.pop_ready(now=1.0) == (16, ["r0", "r1", "r3"])
    assert queue.pop_ready(now=1.2) == (32, ["r2", "r4"])


def test_a_full_bucket_goes_alone_at_its_own_shape() -> None:
    queue = _by_length(max_tokens=1000)
    queue.add(32, "old", now=0.0)
    for i in range(4):
        queue.add(8, f"s{i}", now=0.1)
    assert queue.pop_ready(now=0.2) == (8, ["s0", "s1", "s2", "s3"])
    assert queue.pop_ready(now=0.2) is None


def test_unranked_buckets_never_merge() -> None:
    queue: BatchQueue[str, int] = BatchQueue(max_batch_size=4, max_wait=1.0, rank_of=lambda key: None)
    queue.add("a", 1, now=0.0)
    queue.add("b", 2, now=0.0)
    assert queue.pop_ready(now=1.0) == ("a", [1])
    assert queue.pop_ready(now=1.0) == ("b", [2])


@given(st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 0.01)), max_size=60), st.integers(1, 9))
def test_every_item_comes_out_once_in_order(arrivals: list[tuple[str, float]], size: int) -> None:
    queue: BatchQueue[str, int] = BatchQueue(max_batch_size=size, max_wait=0.05)
    now = 0.0
    out: list[tuple[str, int]] = []
    for index, (key, gap) in enumerate(arrivals):
        now += gap
        queue.add(key, index, now)
        while (ready := queue.pop_ready(now)) is not None:
            assert len(ready[1]) <= size
            out += [(ready[0], i) for i in ready[1]]
    while (ready := queue.pop_ready(now + 1.0)) is not None:
        out += [(ready[0], i) for i in ready[1]]
    assert sorted(i for _, i in out) == list(range(len(arrivals)))
    for key in "abc":
        mine = [i for k, i in out if k == key]
        assert mine == sorted(mine), "FIFO within a bucket"
        assert all(arrivals[i][0] == key for i in mine)


@given(
    st.lists(st.tuples(st.sampled_from([8, 16, 32]), st.floats(0, 0.01)), max_size=60),
    st.integers(16, 256),
)
def test_merged_batches_lose_nothing_and_never_shrink_a_request(
    arrivals: list[tuple[int, float]], max_tokens: int
) -> None:
    queue = _by_length(max_tokens)
    now = 0.0
    seen: list[int] = []
    for index, (length, gap) in enumerate(arrivals):
        now += gap
        queue.add(length, index, now)
        for flush, at in ((False, now), (True, now + 1.0)) if index == len(arrivals) - 1 else ((False, now),):
            while (ready := queue.pop_ready(at, flush=flush)) is not None:
                shape, items = ready
                assert all(arrivals[i][0] <= shape for i in items), "a request runs at its length or longer"
                assert 1 <= len(items) <= max(1, min(4, max_tokens // shape))
                assert items == sorted(items), "oldest first"
                seen += items
    assert sorted(seen) == list(range(len(arrivals)))
    assert len(queue) == 0


def _lengths() -> BatchQueue[str, tuple[str, int]]:
    """Items are (name, real token length); a batch runs at its longest item's length."""
    return BatchQueue(max_batch_size=3, max_wait=1.0, length_of=lambda item: item[1])


def test_a_full_bucket_batches_its_oldest_item_with_the_nearest_lengths() -> None:
    queue = _lengths()
    for name, length in [("a", 12), ("b", 16), ("c", 9), ("d", 12), ("e", 16), ("f", 11)]:
        queue.add("9-16", (name, length), now=0.0)
    # In arrival order the first batch would be a, b, c: three runs of 16 tokens. Like lengths instead:
    assert queue.pop_ready(now=0.0) == ("9-16", [("a", 12), ("d", 12), ("f", 11)])
    assert queue.pop_ready(now=0.0) == ("9-16", [("b", 16), ("c", 9), ("e", 16)])
    assert len(queue) == 0


def test_a_batch_that_goes_on_time_or_eagerly_keeps_arrival_order() -> None:
    queue = _lengths()
    queue.add("9-16", ("a", 16), now=0.0)
    queue.add("9-16", ("b", 9), now=0.1)
    assert queue.pop_ready(now=0.2, flush=True) == ("9-16", [("a", 16), ("b", 9)])


@given(st.lists(st.tuples(st.integers(1, 40), st.booleans()), max_size=80), st.integers(1, 6))
def test_like_length_batches_lose_nothing_and_always_take_the_oldest(
    arrivals: list[tuple[int, bool]], size: int
) -> None:
    queue: BatchQueue[str, int] = BatchQueue(
        max_batch_size=size, max_wait=1.0, length_of=lambda i: arrivals[i][0]
    )
    seen: list[int] = []
    for index, (_, pop) in enumerate(arrivals):
        queue.add("bucket", index, now=0.0)
        while pop and (ready := queue.pop_ready(now=0.0)) is not None:
            batch = ready[1]
            waiting = [i for i in range(index + 1) if i not in seen]
            assert min(batch) == waiting[0], "every batch takes the oldest waiting item"
            assert len(batch) == size and batch == sorted(batch)
            assert set(batch) <= set(waiting[: ALIKE_WINDOW * size]), "chosen among the oldest waiting"
            seen += batch
    while (ready := queue.pop_ready(now=2.0)) is not None:
        seen += ready[1]
    assert sorted(seen) == list(range(len(arrivals)))


async def _let_the_getter_run() -> None:
    """A few turns of the event loop: a woken ``get`` re-checks its queue (no real time passes)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_micro_batcher_dispatches_by_time_without_a_full_batch() -> None:
    """Time as the batcher's injected clock sees it: wakeups come from put(), never from real time."""
    now = 0.0
    batcher: MicroBatcher[str, int] = MicroBatcher(
        BatchQueue(max_batch_size=100, max_wait=0.05), clock=lambda: now
    )
    getter = asyncio.create_task(batcher.get())
    batcher.put("a", 1)
    now = 0.049
    batcher.put("a", 2)  # wakes the getter: 2 of 100, the oldest 49 ms old
    await _let_the_getter_run()
    assert not getter.done(), "dispatched before its oldest item waited max_wait"
    now = 0.05
    batcher.put("b", 3)  # wakes it again: "a"'s oldest item has now waited max_wait
    assert await asyncio.wait_for(getter, 2.0) == ("a", [1, 2])


async def test_micro_batcher_dispatches_a_full_batch_at_once() -> None:
    batcher: MicroBatcher[str, int] = MicroBatcher(BatchQueue(max_batch_size=3, max_wait=60.0))
    getter = asyncio.create_task(batcher.get())
    await asyncio.sleep(0)
    for i in range(3):
        batcher.put("a", i)
    assert await asyncio.wait_for(getter, 2.0) == ("a", [0, 1, 2])


async def test_an_eager_get_takes_what_is_queued_without_waiting_and_at_most_one_batch() -> None:
    now = 0.0
    # One arrival a second against a half-second max_wait: low load, nothing worth waiting for.
    batcher: MicroBatcher[str, int] = MicroBatcher(
        BatchQueue(max_batch_size=2, max_wait=0.5), clock=lambda: now
    )
    getter = asyncio.create_task(batcher.get(eager=True))
    await _let_the_getter_run()
    assert not getter.done(), "nothing queued: even an eager get waits"
    batcher.put("b", 1)
    assert await asyncio.wait_for(getter, 2.0) == ("b", [1]), "no max_wait for an idle model"
    for i in range(2, 5):
        batcher.put("a", i)
    batcher.put("b", 5)
    assert await batcher.get(eager=True) == ("a", [2, 3]), "the oldest bucket, one batch of it"
    assert await batcher.get(eager=True) == ("a", [4])
    later = asyncio.create_task(batcher.get())
    await _let_the_getter_run()
    assert not later.done(), "a plain get still waits for size or time"
    now = 0.5
    batcher.put("c", 6)
    assert await asyncio.wait_for(later, 2.0) == ("b", [5])


def _stream(queue: BatchQueue[str, int], per_s: float, seconds: float) -> float:
    """Queue a steady stream (one item every 1/per_s s, in bucket "a"), each taken at once as a free
    consumer would at low load; returns the time of the last arrival."""
    now, step = 0.0, 1.0 / per_s
    for i in range(round(per_s * seconds)):
        now = i * step
        queue.add("a", i, now)
        queue.pop_ready(now, flush=True)
    return now


def test_a_free_consumer_waits_for_the_rows_a_steady_stream_brings_within_max_wait() -> None:
    # 200 a second for 3 s against max_wait 25 ms: about 5 rows arrive while the first one waits.
    queue: BatchQueue[str, int] = BatchQueue(max_batch_size=32, max_wait=0.025)
    now = _stream(queue, per_s=200, seconds=3.0)
    assert queue.arrivals.per_s(now) == pytest.approx(200, rel=0.1)
    for i in range(4):
        now += 0.005
        queue.add("a", 100 + i, now)
        assert queue.pop_ready(now, eager=True) is None, f"{i + 1} rows: the stream fills more within 25 ms"
    now += 0.005
    queue.add("a", 104, now)
    assert queue.pop_ready(now, eager=True) == ("a", [100, 101, 102, 103, 104])


def test_a_free_consumer_never_holds_a_request_past_max_wait() -> None:
    queue: BatchQueue[str, int] = BatchQueue(max_batch_size=32, max_wait=0.025)
    now = _stream(queue, per_s=400, seconds=3.0)
    queue.add("a", 1000, now + 0.001)
    assert queue.pop_ready(now + 0.02, eager=True) is None, "about 10 rows are due within 25 ms"
    assert queue.pop_ready(now + 0.027, eager=True) == ("a", [1000]), "but never later than max_wait"


def test_a_free_consumer_takes_a_lone_request_at_once_at_low_load() -> None:
    # 30 a second: under one arrival per 25 ms, so waiting would only add latency.
    queue: BatchQueue[str, int] = BatchQueue(max_batch_size=32, max_wait=0.025)
    now = _stream(queue, per_s=30, seconds=3.0)
    queue.add("a", 1000, now + 0.03)
    assert queue.pop_ready(now + 0.03, eager=True) == ("a", [1000])


def test_the_arrival_rate_fades_when_the_stream_stops() -> None:
    queue: BatchQueue[str, int] = BatchQueue(max_batch_size=32, max_wait=0.025)
    now = _stream(queue, per_s=400, seconds=3.0)
    assert queue.arrivals.per_s(now + 5.0) < 5, "five quiet seconds later the model counts as idle"
    queue.add("a", 1000, now + 5.0)
    assert queue.pop_ready(now + 5.0, eager=True) == ("a", [1000])


def test_the_fill_never_exceeds_one_batch() -> None:
    queue: BatchQueue[str, int] = BatchQueue(max_batch_size=4, max_wait=1.0)
    now = _stream(queue, per_s=400, seconds=2.0)
    for i in range(4):
        queue.add("a", 1000 + i, now)
    assert queue.pop_ready(now, eager=True) == ("a", [1000, 1001, 1002, 1003])


def test_dropped_items_no_longer_count_towards_a_full_batch() -> None:
    queue: BatchQueue[str, int] = BatchQueue(max_batch_size=2, max_wait=1.0)
    queue.add("a", 1, now=0.0)
    queue.add("a", 2, now=0.0)
    assert queue.drop(lambda item: item == 1) == [1]
    assert queue.pop_ready(now=0.0) is None, "one row left of a batch of two: it waits for time"
    assert queue.pop_ready(now=1.0) == ("a", [2])


async def test_micro_batcher_flushes_on_close_then_stops() -> None:
    batcher: MicroBatcher[str, int] = MicroBatcher(BatchQueue(max_batch_size=10, max_wait=60.0))
    batcher.put("a", 1)
    batcher.close()
    assert await asyncio.wait_for(batcher.get(), 2.0) == ("a", [1])
    with pytest.raises(BatcherClosed):
        await batcher.get()
    with pytest.raises(BatcherClosed):
        batcher.put("a", 2)


def test_commits_advance_only_over_a_contiguous_answered_run() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    for offset in range(5):
        tracker.track("p0", offset)
    tracker.done("p0", 1)
    tracker.done("p0", 2)
    assert tracker.take_commits() == {}, "offset 0 is unanswered: nothing may be committed"
    tracker.done("p0", 0)
    assert tracker.take_commits() == {"p0": 3}
    tracker.done("p0", 4)
    assert tracker.take_commits() == {}
    tracker.done("p0", 3)
    assert tracker.take_commits() == {"p0": 5}
    assert tracker.in_flight == 0


def test_partitions_are_tracked_independently() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.track("p0", 10)
    tracker.track("p1", 7)
    tracker.done("p1", 7)
    assert tracker.take_commits() == {"p1": 8}
    assert tracker.pending(["p0"]) == 1
    tracker.forget(["p0"])
    assert tracker.in_flight == 1, "its job still holds it until answered or dropped"
    tracker.done("p0", 10, 0)  # a late answer for a revoked partition only stops counting it
    assert tracker.in_flight == 0
    assert tracker.take_commits() == {}


@given(st.permutations(list(range(30))), st.integers(0, 29))
def test_committed_position_never_passes_an_unanswered_offset(order: list[int], stop: int) -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    for offset in range(30):
        tracker.track("p", offset)
    answered: set[int] = set()
    position = 0
    for offset in order[:stop]:
        tracker.done("p", offset)
        answered.add(offset)
        position = tracker.take_commits().get("p", position)
        assert all(o in answered for o in range(position))
        assert position == 30 or position not in answered


def test_a_free_consumer_waits_for_the_items_still_on_their_way_within_max_wait() -> None:
    # A flooded round being prepared: 5 of its requests are still on their way to the queue.
    queue: BatchQueue[str, int] = BatchQueue(max_batch_size=4, max_wait=0.01)
    queue.add("a", 1, now=0.0)
    assert queue.pop_ready(now=0.0, eager=True, pending=5) is None, "the batch fills from the round"
    for i in range(2, 5):
        queue.add("a", i, now=0.001)
    assert queue.pop_ready(now=0.001, eager=True, pending=2) == ("a", [1, 2, 3, 4]), "full: no more wait"
    queue.add("a", 5, now=0.002)
    assert queue.pop_ready(now=0.002, eager=True, pending=1) is None
    assert queue.pop_ready(now=0.0125, eager=True, pending=1) == ("a", [5]), "never past max_wait"


def test_a_clock_set_to_the_next_deadline_finds_the_batch_ready() -> None:
    # 0.7 + 0.1 is 0.7999999999999999 in floating point, and that minus 0.7 is less than 0.1: a virtual
    # clock that jumps to the deadline must find the batch ready, or a consumer waits zero seconds for ever.
    queue: BatchQueue[str, int] = BatchQueue(max_batch_size=8, max_wait=0.1)
    queue.add("a", 1, now=0.7)
    deadline = queue.next_deadline()
    assert deadline is not None
    assert queue.pop_ready(now=deadline) == ("a", [1])
