"""Exactly-once delivery: answers and offsets in one transaction per contiguous run.

The run logic is tested alone (HeldAnswers, with the real OffsetTracker giving the order); the
guarantee is tested on Apache Kafka with real worker processes: a read_committed reader sees each
reply exactly once through SIGKILL and restart and through a second worker joining, while a
read_uncommitted reader sees at least one; a worker frozen until its partitions moved commits
nothing for them once woken. A commit whose answer is lost is tested on the worker's own
transactions, flow and consumer over a real broker. The embedded broker (tansu) refuses
transactions: a worker asked for them there exits at start, naming the setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiokafka.producer.sender
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import IllegalGenerationError, KafkaConnectionError, ProducerFenced

import worker.kafka.transactions
from schemas import Modality
from tests.kafka_support import TopicReader, tiny_models
from tests.process_support import FAST_GROUP_FLAGS, Stream, WorkerLauncher, WorkerProcess, wait_until
from tests.sim.transactions import TrackedTopics
from tests.tcp_proxy import TcpProxy
from worker.app import Worker
from worker.kafka.apache_broker import ApacheKafka
from worker.kafka.broker_processes import free_port
from worker.kafka.commits import Flow, Rebalance
from worker.kafka.delivery import Delivery
from worker.kafka.embedded_broker import EmbeddedBroker
from worker.kafka.held_answers import HeldAnswers
from worker.kafka.messages import Origin, Outgoing
from worker.kafka.offsets import OffsetTracker
from worker.kafka.partition_producers import PartitionProducers, transactional_id
from worker.kafka.routing import TopicDirectory
from worker.kafka.topics import create_topics
from worker.kafka.transactional_rebalance import TransactionalRebalance
from worker.kafka.transactions import Transactions, TransactionsRefused
from worker.metrics import WorkerMetrics
from worker.settings import Settings

TP = TopicPartition("inference.text.requests", 0)
EXACTLY_ONCE = ("--delivery", "exactly-once")
START_TIMEOUT_S = 90.0
#: A network cut longer than the session timeout (3 s) and the publish retry bound (5 s).
OUTAGE_S = 7.0


# --- the run logic, alone -------------------------------------------------------------------


def tracked(*offsets: int) -> OffsetTracker[TopicPartition]:
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    for offset in offsets:
        tracker.track(TP, offset)
    return tracker


def test_an_answer_waits_for_every_earlier_offset_of_its_partition() -> None:
    tracker, held = tracked(10, 11, 12), HeldAnswers[TopicPartition, str]()
    held.hold(TP, 11, "b")
    held.hold(TP, 12, "c")
    assert held.take_run(TP, tracker.unanswered(TP)) == []  # 10 unanswered: nothing may go yet
    held.hold(TP, 10, "a")
    assert held.take_run(TP, tracker.unanswered(TP)) == [(10, "a"), (11, "b"), (12, "c")]
    assert held.count() == 0


def test_a_run_stops_at_the_first_gap() -> None:
    tracker, held = tracked(1, 2, 3, 4), HeldAnswers[TopicPartition, str]()
    for offset in (1, 2, 4):
        held.hold(TP, offset, f"r{offset}")
    assert held.take_run(TP, tracker.unanswered(TP)) == [(1, "r1"), (2, "r2")]
    tracker.done(TP, 1)
    tracker.done(TP, 2)
    assert held.take_run(TP, tracker.unanswered(TP)) == []  # 3 still open
    held.hold(TP, 3, "r3")
    assert held.take_run(TP, tracker.unanswered(TP)) == [(3, "r3"), (4, "r4")]


def test_offsets_with_gaps_between_them_follow_the_tracked_order() -> None:
    # Transaction markers and aborted records take offsets that a read_committed consumer never sees.
    tracker, held = tracked(5, 8, 9), HeldAnswers[TopicPartition, str]()
    held.hold(TP, 9, "c")
    held.hold(TP, 5, "a")
    assert held.take_run(TP, tracker.unanswered(TP)) == [(5, "a")]
    tracker.done(TP, 5)  # its transaction committed
    held.hold(TP, 8, "b")
    assert held.take_run(TP, tracker.unanswered(TP)) == [(8, "b"), (9, "c")]


def test_partitions_are_independent() -> None:
    other = TopicPartition(TP.topic, 1)
    tracker, held = tracked(0, 1), HeldAnswers[TopicPartition, str]()
    tracker.track(other, 0)
    held.hold(other, 0, "x")
    held.hold(TP, 1, "b")
    assert held.take_run(other, tracker.unanswered(other)) == [(0, "x")]
    assert held.take_run(TP, tracker.unanswered(TP)) == []
    assert held.count([TP]) == 1


def test_answers_for_offsets_rewound_or_forgotten_are_dropped_not_published() -> None:
    tracker, held = tracked(0, 1, 2), HeldAnswers[TopicPartition, str]()
    held.hold(TP, 2, "late")
    assert tracker.rewind(TP, 0, tracker.epoch(TP))  # the run failed: 0.. will be read again
    tracker.track(TP, 0)
    tracker.track(TP, 1)
    held.hold(TP, 0, "a")
    assert held.take_run(TP, tracker.unanswered(TP)) == [(0, "a")]
    tracker.done(TP, 0)
    tracker.forget([TP])  # revoked: nothing of the partition is ours any more
    assert held.take_run(TP, tracker.unanswered(TP)) == []
    assert held.count() == 0


def test_held_answers_of_a_rewound_message_are_let_go() -> None:
    tracker, held = tracked(3, 4), HeldAnswers[TopicPartition, str]()
    epoch = tracker.epoch(TP)
    held.hold(TP, 3, "c")
    held.hold(TP, 4, "d")
    assert tracker.rewind(TP, 4, epoch)  # 4 is read again, in a new epoch; 3 is still ours
    assert held.drop(TP, lambda offset, _: not tracker.current(TP, offset, epoch)) == [(4, "d")]
    assert held.count() == 1


def test_exactly_once_retries_a_transaction_refused_behind_a_commit_sooner_than_aiokafka_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # aiokafka 0.14 sends a transaction's first AddPartitionsToTxn again 20 ms after CONCURRENT_TRANSACTIONS (the
    # previous commit's markers not written yet): a constant of its sender that the worker lowers to 5 ms.
    monkeypatch.setattr(aiokafka.producer.sender, "BACKOFF_OVERRIDE", 0.02)  # aiokafka's own (restored after)
    settings = Settings(bootstrap_servers="unused:9092", delivery="exactly-once")
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()

    async def never(*_: object) -> None:
        raise AssertionError("not called")

    async def no_topics() -> set[str]:
        return set()

    delivery = Delivery(never, TopicDirectory(no_topics), WorkerMetrics(), prefix="p", limit_bytes=2**20)
    Transactions(settings, tracker, delivery, lambda *_: None, on_published=lambda *_: None,
                 on_redelivered=lambda _: None, max_request_size=2**20)  # fmt: skip
    assert aiokafka.producer.sender.BACKOFF_OVERRIDE == 0.005


class ScriptedProducer:
    """A transactional producer's calls as Transactions makes them, with no broker; ``on_commit`` runs in the
    commit (to raise, or to change the world meanwhile)."""

    def __init__(
        self, on_commit: Callable[[], None] = lambda: None, on_abort: Callable[[], None] = lambda: None
    ) -> None:
        self.on_commit = on_commit
        self.on_abort = on_abort
        self.sent: list[bytes] = []
        self.commits = 0
        self.started = False
        self.stopped = False
        self.client = TrackedTopics()

    async def start(self) -> None:
        self.started = True

    async def begin_transaction(self) -> None:
        pass

    async def send(self, topic: str, value: bytes, key: bytes | None = None, headers: Any = None) -> Any:
        self.sent.append(value)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def send_offsets_to_transaction(self, offsets: Any, group_id: str) -> None:
        pass

    async def commit_transaction(self) -> None:
        self.on_commit()
        self.commits += 1

    async def abort_transaction(self) -> None:
        self.on_abort()

    async def stop(self) -> None:
        self.stopped = True


def scripted_transactions(
    bootstrap: str = "unused:9092", **overrides: Any
) -> tuple[Transactions, Flow, list[str]]:
    """Transactions over no broker (its producers are ScriptedProducers put in place by the test; with
    ``bootstrap``, real ones), the flow whose tracker and redeliver they use, and the ids of the answers they
    committed."""
    settings = Settings(bootstrap_servers=bootstrap, delivery="exactly-once", **overrides)
    flow = Flow(settings)

    async def reply_topic() -> set[str]:
        return {"p.replies.x"}

    async def never(*_: object) -> None:
        raise AssertionError("a transaction sends through its partition's producer")

    delivery = Delivery(never, TopicDirectory(reply_topic), WorkerMetrics(), prefix="p", limit_bytes=2**20)
    published: list[str] = []
    transactions = Transactions(settings, flow.tracker, delivery, flow.redeliver,
                                on_published=lambda reply, _: published.append(reply.request_id or ""),
                                on_redelivered=lambda _: None, max_request_size=2**20)  # fmt: skip
    return transactions, flow, published


def answer(tracker: OffsetTracker[TopicPartition], offset: int) -> Outgoing:
    """An answer to ``offset`` of TP as fetched in its partition's current epoch."""
    origin = Origin(Modality.TEXT, TP, offset, "p.replies.x", f"r{offset}", b"{}", 0, epoch=tracker.epoch(TP))
    return Outgoing(origin, f"r{offset}", "bert", b'{"outputs": []}')


def broken() -> None:
    raise KafkaConnectionError("the broker went away (this test)")


def producers_in_turn(monkeypatch: pytest.MonkeyPatch, *producers: ScriptedProducer) -> None:
    """Each new producer the transactions open is the next of ``producers``."""
    queue = list(producers)
    monkeypatch.setattr(Transactions, "_producer", lambda self, transactional: queue.pop(0))


async def test_a_fenced_transaction_of_a_revoked_partition_leaves_its_new_producer_in_service() -> None:
    # Revoked while its transaction commits, the partition is assigned here again (a new producer, fencing
    # the old one); the old commit then fails with ProducerFenced. It took the new producer out of service:
    # nothing of the partition was published again (simulation seed 332, exactly-once).
    transactions, flow, published = scripted_transactions()
    tracker = flow.tracker
    new = ScriptedProducer()

    def reassigned_then_fenced() -> None:
        tracker.forget([TP])  # the revoke: the old epoch's offsets are no longer ours
        tracker.track(TP, 0)  # assigned again, offset 0 read again
        transactions._producers[TP] = new  # type: ignore[assignment]  # what the assignment opened
        raise ProducerFenced()

    transactions._producers[TP] = ScriptedProducer(reassigned_then_fenced)  # type: ignore[assignment]

    tracker.track(TP, 0)
    await transactions.publish([answer(tracker, 0)])  # its commit is fenced
    assert published == []
    await transactions.publish([answer(tracker, 0)])  # the new assignment's answer to offset 0
    assert new.commits == 1 and published == ["r0"], "the new producer was taken out of service"


class GatedConsumer:
    """The consumer calls a producer's replacement makes; once the new producer has started, the committed
    offset is given only when the test opens the gate."""

    def __init__(self, committed: int, started: Callable[[], bool]) -> None:
        self.offset, self.started = committed, started
        self.asked, self.gate = asyncio.Event(), asyncio.Event()

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    async def committed(self, tp: TopicPartition) -> int:
        if self.started():
            self.asked.set()
            await self.gate.wait()
        return self.offset

    async def commit(self, offsets: Any) -> None:
        pass


async def test_a_replaced_producer_commits_nothing_before_its_partition_is_read_from_the_committed_offset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A transaction failed and could not be aborted: a new producer replaces the old one, then the partition is
    # read again from its committed offset. Put in service before that offset was read, the new producer
    # committed an answer that the read then sent to be read again: answered twice (simulation seed 3).
    transactions, flow, published = scripted_transactions()
    tracker = flow.tracker
    transactions._producers[TP] = ScriptedProducer(on_commit=broken, on_abort=broken)  # type: ignore[assignment]
    new = ScriptedProducer()
    producers_in_turn(monkeypatch, new)
    consumer = GatedConsumer(5, lambda: new.started)
    transactions.consumer = consumer  # type: ignore[assignment]
    tracker.track(TP, 5)
    await transactions.publish([answer(tracker, 5)])  # fails, the abort too: a new producer is on its way
    tracker.track(TP, 5)  # offset 5 read again (its run given up)
    await asyncio.wait_for(consumer.asked.wait(), 5)  # the new producer started, the committed offset asked
    await transactions.publish([answer(tracker, 5)])  # its answer comes meanwhile
    consumer.gate.set()
    await asyncio.wait_for(transactions.settled([TP]), 5)
    assert new.commits == 0, "committed before the partition was read from its committed offset"
    assert flow._seeks == {TP: 5}  # read again from there, in a new epoch
    tracker.track(TP, 5)
    await transactions.publish([answer(tracker, 5)])
    assert new.commits == 1 and published == ["r5"]


class GroupView:
    """The consumer calls a producer's replacement makes: the partition is assigned here, and committing its
    committed offset again passes the group's generation check only if ``owner`` (``_still_owned``)."""

    def __init__(self, committed: int, *, owner: bool) -> None:
        self.offset, self.owner = committed, owner
        self.assigned = {TP}
        self.checked = asyncio.Event()

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    async def committed(self, tp: TopicPartition) -> int:
        return self.offset

    async def commit(self, offsets: Any) -> None:
        self.checked.set()
        if not self.owner:
            raise IllegalGenerationError()  # the group moved on: another worker owns the partition


def fenced() -> None:
    raise ProducerFenced()


def fenced_in_a_group(
    monkeypatch: pytest.MonkeyPatch, *, owner: bool
) -> tuple[Transactions, Flow, list[str], ScriptedProducer, GroupView]:
    """Transactions whose producer's next commit is fenced (offset 5 read), their flow and what they
    committed, the producer a replacement would open, and the group (``owner``: it still gives TP here)."""
    transactions, flow, published = scripted_transactions()
    transactions._producers[TP] = ScriptedProducer(on_commit=fenced)  # type: ignore[assignment]
    new = ScriptedProducer()
    producers_in_turn(monkeypatch, new)
    group = GroupView(5, owner=owner)
    transactions.consumer = group  # type: ignore[assignment]
    flow.tracker.track(TP, 5)
    return transactions, flow, published, new, group


async def test_a_producer_fenced_while_the_group_still_gives_its_partition_here_is_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The broker aborted a transaction open past transaction_timeout_ms and moved its id's epoch on: fenced, though
    # no other worker took the partition. No new producer was opened: the partition stayed paused for good
    # (simulation seed 566, exactly-once).
    transactions, flow, published, new, _ = fenced_in_a_group(monkeypatch, owner=True)
    tracker = flow.tracker
    await transactions.publish([answer(tracker, 5)])  # fenced
    await asyncio.wait_for(transactions.settled([TP]), 5)
    assert transactions._producers.get(TP) is new, "no new producer for a partition still ours"
    assert flow._seeks == {TP: 5}  # read again from the committed offset
    tracker.track(TP, 5)
    await transactions.publish([answer(tracker, 5)])
    assert new.commits == 1 and published == ["r5"]


async def test_a_producer_fenced_by_the_partitions_new_owner_is_not_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # This worker's view is stale (cut off from the group past its session): opening the id again would fence
    # the partition's real owner in turn.
    transactions, flow, _, new, group = fenced_in_a_group(monkeypatch, owner=False)
    await transactions.publish([answer(flow.tracker, 5)])  # fenced
    await asyncio.wait_for(group.checked.wait(), 5)  # asked the group whether the partition is still here
    await asyncio.sleep(0.1)
    assert not new.started and TP not in transactions._producers
    await transactions.revoked([TP], wait_s=1.0)  # the rebalance comes: the replacement is let go
    assert not new.started and not transactions._replacing


async def test_a_producer_back_from_a_late_commit_whose_next_transaction_fails_is_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A commit answered late brings its producer back, and the task that brought it back published what waited.
    # That transaction failed and could not be aborted: no replacement started, since that task was still the
    # partition's registered one, and the partition had no producer for good (simulation seed 2814,
    # exactly-once).
    monkeypatch.setattr(worker.kafka.transactions, "COMMIT_SLACK_S", 0.05)
    transactions, flow, published = scripted_transactions(publish_retry_s=0.05)
    tracker = flow.tracker
    commit_heard = asyncio.Event()
    commits = 0

    class LateThenBroken(ScriptedProducer):
        async def commit_transaction(self) -> None:
            nonlocal commits
            commits += 1
            if commits == 1:
                await commit_heard.wait()  # answered only after the transaction's bound
                self.commits += 1
            else:
                broken()

    transactions._producers[TP] = LateThenBroken(on_abort=broken)  # type: ignore[assignment]
    new = ScriptedProducer()
    producers_in_turn(monkeypatch, new)
    transactions.consumer = GroupView(7, owner=True)  # type: ignore[assignment]
    for offset in (5, 6):
        tracker.track(TP, offset)
    await transactions.publish([answer(tracker, 5)])  # its commit gets no answer in time: awaited apart
    await transactions.publish([answer(tracker, 6)])  # held meanwhile
    commit_heard.set()  # 5 committed late; 6 published by the task that brought the producer back: broken
    await wait_until(lambda: transactions._producers.get(TP) is new, 5, "a new producer in service")
    assert published == ["r5"] and flow._seeks == {TP: 6}


async def test_a_revoke_lets_go_a_producer_opening_whose_cancellation_is_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The revoke cancelled a task opening a producer just as that task's wait ended: Python 3.11's wait_for
    # returned the result and lost the cancellation, the task ran on, and the revoke waited for it for good
    # (simulation seed 1476, exactly-once).
    transactions, flow, _ = scripted_transactions()
    opening = asyncio.Event()

    class LosesItsCancellation(ScriptedProducer):
        async def start(self) -> None:
            opening.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()  # the cancellation arrives with the result, and is dropped
            self.started = True

    transactions._producers[TP] = ScriptedProducer(on_commit=broken, on_abort=broken)  # type: ignore[assignment]
    new = LosesItsCancellation()
    producers_in_turn(monkeypatch, new)
    consumer = GatedConsumer(5, lambda: new.started)  # then the committed offset comes only through the gate
    transactions.consumer = consumer  # type: ignore[assignment]
    flow.tracker.track(TP, 5)
    await transactions.publish([answer(flow.tracker, 5)])  # fails, the abort too: a new producer is opening
    await asyncio.wait_for(opening.wait(), 5)
    await asyncio.wait_for(transactions.revoked([TP], wait_s=0.5), 2)  # bounded though the task runs on
    consumer.gate.set()  # the task, run on, gets the committed offset after the revoke
    await wait_until(lambda: new.stopped, 5, "the producer opened after the revoke closed")
    assert TP not in transactions._producers and not transactions._replacing


async def test_a_revoke_does_not_wait_for_its_producers_to_close(monkeypatch: pytest.MonkeyPatch) -> None:
    # Closing a producer waits for the broker (up to CLOSE_TIMEOUT_S): in an outage the revoke went over its
    # bound, half the session (simulation seed 814, exactly-once). The partition's next producer fences it.
    transactions, _, _ = scripted_transactions()
    closing = asyncio.Event()

    class ClosesForGood(ScriptedProducer):
        async def stop(self) -> None:
            closing.set()
            await asyncio.Event().wait()

    transactions._producers[TP] = ClosesForGood()  # type: ignore[assignment]
    await asyncio.wait_for(transactions.revoked([TP], wait_s=0.1), 1)
    assert TP not in transactions._producers
    await asyncio.wait_for(closing.wait(), 1)  # closing, in the background


async def test_held_answers_a_new_producer_lets_go_are_followed_by_on_settled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A new producer read the partition from its committed offset and let go the answers held meanwhile:
    # nothing re-evaluated backpressure after, and every partition stayed paused (simulation seed 410).
    transactions, flow, _ = scripted_transactions()
    tracker = flow.tracker
    held_when_settled: list[int] = []
    transactions.on_settled = lambda: held_when_settled.append(transactions.held.count())
    transactions._producers[TP] = ScriptedProducer(on_commit=broken, on_abort=broken)  # type: ignore[assignment]
    new = ScriptedProducer()
    producers_in_turn(monkeypatch, new)
    consumer = GatedConsumer(5, lambda: new.started)
    transactions.consumer = consumer  # type: ignore[assignment]
    tracker.track(TP, 5)
    await transactions.publish([answer(tracker, 5)])  # fails, the abort too: a new producer is on its way
    for offset in (5, 6):
        tracker.track(TP, offset)  # read again
    await asyncio.wait_for(consumer.asked.wait(), 5)
    await transactions.publish([answer(tracker, 6)])  # held: 5 is not answered
    before = len(held_when_settled)
    consumer.gate.set()  # read from 5 again: the answer to 6 is let go
    await asyncio.wait_for(transactions.settled([TP]), 5)
    assert held_when_settled[before:] and held_when_settled[-1] == 0, held_when_settled


def test_one_transactional_id_per_input_partition_the_same_on_every_worker() -> None:
    assert transactional_id("workers", TP) == "workers.inference.text.requests.0"
    assert transactional_id("workers", TopicPartition(TP.topic, 3)) != transactional_id("workers", TP)


# --- on a real broker -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def apache_bootstrap(apache_kafka: ApacheKafka) -> str:
    """The session's Apache Kafka node (tests/conftest.py): transactions need it (tansu refuses them)."""
    return apache_kafka.bootstrap_servers


@pytest.fixture
async def committed_stream(apache_bootstrap: str) -> AsyncIterator[Stream]:
    """This test's topics, its replies collected by a read_committed reader."""
    stream = Stream(apache_bootstrap, isolation_level="read_committed", idempotent=True)
    await stream.start()
    yield stream
    await stream.stop()


@pytest.fixture
def eos_workers(apache_bootstrap: str, bert_only: Path, tmp_path: Path) -> Iterator[WorkerLauncher]:
    launcher = WorkerLauncher(apache_bootstrap, bert_only, tmp_path)
    yield launcher
    launcher.kill_all()
    print(launcher.log_tails())


def start_eos(workers: WorkerLauncher, stream: Stream, name: str, *flags: str) -> WorkerProcess:
    return workers.start(
        name,
        stream.group_id,
        stream.prefix,
        *FAST_GROUP_FLAGS,
        *EXACTLY_ONCE,
        "--max-batch-size",
        "8",
        *flags,
        verbose=True,
    )


async def stop(worker: WorkerProcess) -> None:
    worker.send(signal.SIGTERM)
    assert await worker.wait_exit(30) == 0, worker.log_tail()


async def uncommitted_ids(stream: Stream) -> Counter[str]:
    """Every reply on the reply topic as a read_uncommitted reader sees it, by request id."""
    async with TopicReader(stream.bootstrap, stream.reply_topic) as reader:
        records = await reader.settle(60)
    bodies = [json.loads(r.value) for r in records]
    return Counter(body["id"] for body in bodies if "id" in body)


def assert_exactly_once(stream: Stream) -> None:
    assert stream.missing() == []
    doubled = {i: len(r) for i, r in stream.replies.items() if len(r) > 1}
    assert doubled == {}, f"{len(doubled)} requests answered more than once to a read_committed reader"


@pytest.mark.kafka
@pytest.mark.slow
async def test_sigkill_mid_stream_then_restart_answers_each_request_once(
    eos_workers: WorkerLauncher, committed_stream: Stream
) -> None:
    stream = committed_stream
    ids = await stream.send(500)
    first = start_eos(eos_workers, stream, "first")
    await wait_until(lambda: stream.answered() >= 300, START_TIMEOUT_S, "300 committed replies", [first])
    ids += await stream.send(1500)  # the rest just before the kill, so that it comes mid-stream (as below)
    first.send(signal.SIGKILL)
    assert await first.wait_exit(10) == -signal.SIGKILL
    assert stream.answered() < len(ids), "everything was answered before SIGKILL: not mid-stream"

    second = start_eos(eos_workers, stream, "second")
    await stream.wait_answered(ids, START_TIMEOUT_S + 60, [second])
    await stop(second)
    await stream.settle(60)

    assert_exactly_once(stream)
    assert await stream.committed() == stream.committed_end()
    seen = await uncommitted_ids(stream)
    assert set(seen) == set(ids)  # read_uncommitted: at least one each (aborted replies included)
    print(f"read_uncommitted saw {sum(seen.values()) - len(ids)} extra replies (of aborted transactions)")


@pytest.mark.kafka
@pytest.mark.slow
async def test_a_second_worker_joining_mid_stream_answers_each_request_once(
    eos_workers: WorkerLauncher, committed_stream: Stream
) -> None:
    stream = committed_stream
    a = start_eos(eos_workers, stream, "a")
    async with stream.steadily(10) as sent:  # ~200 requests/s throughout the rebalance
        await wait_until(
            lambda: a.current_assignment() == {0, 1, 2, 3}, START_TIMEOUT_S, "a's partitions", [a]
        )
        await wait_until(lambda: stream.answered() >= 200, 60, "200 committed replies", [a])
        b = start_eos(eos_workers, stream, "b")
        await wait_until(
            lambda: b.current_assignment() and len(a.current_assignment() | b.current_assignment()) == 4,
            START_TIMEOUT_S,
            "a and b splitting the partitions",
            [a, b],
        )
        await wait_until(lambda: b.answered() > 0, 60, "b answering", [a, b])
    await stream.wait_answered(sent, 90, [a, b])
    await stop(a)
    await stop(b)
    await stream.settle(60)

    assert_exactly_once(stream)
    assert await stream.committed() == stream.committed_end()
    assert set(await uncommitted_ids(stream)) == set(sent)


@pytest.mark.kafka
@pytest.mark.slow
async def test_a_frozen_worker_that_lost_its_partitions_commits_nothing_for_them(
    eos_workers: WorkerLauncher, committed_stream: Stream
) -> None:
    # SIGSTOP: a zombie. Its session expires, the partitions move and their ids are initialised by the
    # new owner; woken up, the zombie still holds answers and transactions of partitions it lost.
    stream = committed_stream
    ids = await stream.send(300)
    zombie = start_eos(eos_workers, stream, "zombie")
    await wait_until(lambda: stream.answered() >= 150, START_TIMEOUT_S, "150 committed replies", [zombie])
    # The rest just before SIGSTOP: with all 1,500 sent first, the worker once answered every one before the
    # reply collector had seen 150 (CI, 2026-12-07), and nothing was left mid-stream.
    ids += await stream.send(1200)
    zombie.send(signal.SIGSTOP)
    assert stream.answered() < len(ids), "everything was answered before SIGSTOP: not mid-stream"
    owner = start_eos(eos_workers, stream, "owner")
    await wait_until(
        lambda: owner.current_assignment() == {0, 1, 2, 3}, START_TIMEOUT_S, "owner's partitions", [owner]
    )
    await stream.wait_answered(ids, START_TIMEOUT_S, [owner])
    zombie.send(signal.SIGCONT)
    await wait_until(
        lambda: bool(zombie.current_assignment()) and zombie.count("assigned to partitions") >= 2,
        60,
        "the zombie back in the group",
        [zombie, owner],
    )
    more = await stream.send(200)
    await stream.wait_answered(more, 60, [zombie, owner])
    await stop(zombie)
    await stop(owner)
    await stream.settle(60)

    assert_exactly_once(stream)
    assert await stream.committed() == stream.committed_end()
    print(f"the zombie logged {zombie.count('fenced')} fenced transactions")


@pytest.fixture
async def proxied_kafka() -> AsyncIterator[tuple[TcpProxy, str]]:
    """A broker of the test's own behind a TcpProxy that it advertises: the proxy stands between the
    broker and every client (its bootstrap address)."""
    broker_port = free_port()
    async with TcpProxy(broker_port) as proxy:
        kafka = ApacheKafka(port=broker_port, advertised_port=proxy.port)
        # Started without blocking this loop: its readiness check goes through the proxy, which it runs.
        bootstrap = await kafka.astart()
        try:
            yield proxy, bootstrap
        finally:
            await kafka.astop()


@dataclass
class AnswerLost:
    """One partition's requests fetched and answered by the worker's own transactions, flow and consumer,
    over a proxied broker that drops every answer from the moment a transaction's commit is asked."""

    proxy: TcpProxy
    stream: Stream
    tp: TopicPartition
    flow: Flow
    transactions: Transactions
    listener: TransactionalRebalance
    consumer: AIOKafkaConsumer
    replies: list[Outgoing]
    commit_asked: asyncio.Event
    #: each call of the transactions' on_settled (the worker re-evaluates backpressure there)
    settled: list[int]


@pytest.fixture
async def answer_lost(
    proxied_kafka: tuple[TcpProxy, str], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[AnswerLost]:
    proxy, bootstrap = proxied_kafka
    stream = Stream(bootstrap, partitions=1, isolation_level="read_committed", idempotent=True)
    await stream.start()
    ids = await stream.send(20)
    tp = TopicPartition(stream.requests_topic, 0)
    settings = Settings(
        bootstrap_servers=bootstrap,
        group_id=stream.group_id,
        topic_prefix=stream.prefix,
        delivery="exactly-once",
        publish_retry_s=1.0,
        session_timeout_ms=2000,  # a revoke waits 1 s for answers and for a transaction in progress
    )
    monkeypatch.setattr(
        worker.kafka.transactions, "COMMIT_SLACK_S", 2.0
    )  # a transaction's bound: 3 s, not 16 s
    commit_asked = asyncio.Event()

    class DropsTheCommitsAnswer(AIOKafkaProducer):  # type: ignore[misc]
        async def commit_transaction(self) -> None:
            proxy.drop_answers()
            commit_asked.set()
            await super().commit_transaction()

    monkeypatch.setattr(worker.kafka.transactions, "AIOKafkaProducer", DropsTheCommitsAnswer)

    async def reply_topic_only() -> set[str]:
        return {stream.reply_topic}  # the topics the replies go to: the only one Delivery asks about

    async def never(*_: object) -> None:
        raise AssertionError("a transaction sends through its partition's producer")

    flow = Flow(settings)
    settled: list[int] = []
    transactions = Transactions(
        settings,
        flow.tracker,
        Delivery(
            never, TopicDirectory(reply_topic_only), WorkerMetrics(), prefix=stream.prefix, limit_bytes=2**20
        ),
        flow.redeliver,
        on_published=lambda reply, started_ns: None,
        on_redelivered=lambda reply: None,
        max_request_size=2**20,
        on_settled=lambda: settled.append(flow.tracker.in_flight),
    )
    flow.before_seek_to_committed = transactions.settled
    flow.own_commit = transactions.own_commit
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=stream.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        fetch_max_wait_ms=100,
    )
    await consumer.start()
    try:
        flow.consumer = consumer
        listener = TransactionalRebalance(Rebalance(flow), transactions, lambda: consumer)
        consumer.subscribe([tp.topic], listener=listener)
        records = []
        async with asyncio.timeout(START_TIMEOUT_S):
            while len(records) < len(ids):
                records += (await consumer.getmany(timeout_ms=500)).get(tp, [])
        replies = []
        for record in records:
            assert flow.tracker.track(tp, record.offset)
            request_id = record.key.decode()
            origin = Origin(Modality.TEXT, tp, record.offset, stream.reply_topic, request_id, record.value, 0)
            body = json.dumps({"id": request_id, "model": "bert", "outputs": []}).encode()
            replies.append(Outgoing(origin, request_id, "bert", body))
        yield AnswerLost(
            proxy, stream, tp, flow, transactions, listener, consumer, replies, commit_asked, settled
        )
    finally:
        await transactions.close()
        # aiokafka 0.14's Fetcher.close re-raises the cancellation of a fetch backing off after a connection
        # error (the proxy's reset just before): the consumer is stopped all the same.
        with contextlib.suppress(asyncio.CancelledError):
            await consumer.stop()
        await stream.stop()


@pytest.mark.kafka
@pytest.mark.slow
async def test_a_commit_whose_answer_is_lost_is_neither_read_nor_answered_again(
    answer_lost: AnswerLost,
) -> None:
    # The commit (EndTxn) reaches the broker, which commits; its answer is lost and the transaction's bound
    # runs out. aiokafka's sender retries the commit once the network is back (the broker answers that it
    # is committed). Reading the run again from its first offset, as after an abort, answered it twice
    # (issue 26: the network-cut test's duplicates).
    rig, tp = answer_lost, answer_lost.tp
    await asyncio.wait_for(rig.transactions.publish(rig.replies), 60)
    assert rig.commit_asked.is_set(), "the transaction ran out before its commit: not the case under test"
    rig.proxy.cut()  # the connections that lost answers are reset; the clients connect again
    rig.proxy.restore()
    await asyncio.wait_for(rig.transactions.settled([tp]), 60)

    rig.flow.apply_seeks()  # what the fetch loop does before its next round
    again = (await rig.consumer.getmany(tp, timeout_ms=2000)).get(tp, [])
    assert [r.offset for r in again] == [], "requests whose answers were committed are read again"
    assert rig.transactions.own_commit(tp) == len(rig.replies)
    assert rig.flow.tracker.in_flight == 0
    # The late outcome came in a task of its own, after publish returned: it says so, with nothing in flight
    # (a worker paused by backpressure stayed paused for good without it: simulation seed 31, exactly-once).
    assert rig.settled and rig.settled[-1] == 0
    await rig.stream.settle(60)
    assert_exactly_once(rig.stream)
    assert await rig.stream.committed() == rig.stream.committed_end()


@pytest.mark.kafka
@pytest.mark.slow
async def test_a_partition_revoked_while_its_commit_is_unanswered_is_let_go(answer_lost: AnswerLost) -> None:
    # The revoke closes the partition's producer while its commit waits for an answer that will never come
    # here; the next owner's producer ends that transaction. Awaiting that answer held the partition for good:
    # assigned here again, it could not be sought to its committed offset (``settled`` never returned).
    rig, tp = answer_lost, answer_lost.tp
    publishing = asyncio.create_task(rig.transactions.publish(rig.replies))
    await asyncio.wait_for(rig.commit_asked.wait(), 30)
    await rig.listener.on_partitions_revoked([tp])  # as aiokafka calls it in a rebalance
    await asyncio.wait_for(publishing, 30)
    rig.proxy.cut()
    rig.proxy.restore()
    await asyncio.wait_for(rig.transactions.settled([tp]), 10)
    assert rig.flow.tracker.in_flight == 0  # nothing of the partition counted here any more
    # The commit went through on the broker: the partition's next owner reads on from after the run.
    assert await rig.consumer.committed(tp) == len(rig.replies)
    await rig.stream.settle(60)
    assert_exactly_once(rig.stream)


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.parametrize(
    ("outage_s", "flags"),
    [
        # Past the session timeout: the group rebalances once the cut ends; transactions wait it out.
        pytest.param(OUTAGE_S, ("--publish-retry-s", "5"), id="past-the-session"),
        # Past the bound of a transaction (publish_retry_s + 15 s) but within the session: transactions are
        # abandoned, their producers replaced once the broker answers, no rebalance to help; a commit asked
        # before the cut and answered after it once answered its run twice (the test above).
        pytest.param(
            20.0,
            ("--publish-retry-s", "1", "--session-timeout-ms", "60000"),
            id="past-the-transaction",
        ),
    ],
)
async def test_a_network_cut_mid_stream_answers_each_request_once(
    proxied_kafka: tuple[TcpProxy, str],
    bert_only: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    outage_s: float,
    flags: tuple[str, ...],
) -> None:
    # Cutting the proxy cuts every client (the worker's consumer and its transactional producers, the
    # test's own) off the broker.
    caplog.set_level(logging.CRITICAL, logger="aiokafka")  # a reconnect error per attempt: noise here
    proxy, bootstrap = proxied_kafka
    stream = Stream(bootstrap, isolation_level="read_committed", idempotent=True)
    await stream.start()
    launcher = WorkerLauncher(bootstrap, bert_only, tmp_path)
    try:
        worker = start_eos(launcher, stream, "survivor", *flags)
        async with stream.steadily(10) as sent:
            await wait_until(lambda: stream.answered() >= 300, START_TIMEOUT_S, "300 replies", [worker])
            reset = proxy.cut()
            await asyncio.sleep(outage_s)  # the outage itself: a duration, not a wait for an event
            proxy.restore()
            after = len(sent)
            await wait_until(
                lambda: len(sent) >= after + 200 and stream.answered(sent[after:]) >= 200,
                START_TIMEOUT_S,
                "200 replies to requests sent after the cut",
                [worker],
            )
        await stream.wait_answered(sent, 90, [worker])
        await stop(worker)
        await stream.settle(60)
        committed = await stream.committed()
    finally:
        launcher.kill_all()
        print(launcher.log_tails())
        await stream.stop()
    assert reset > 0, "the cut reset no connection: the traffic did not go through the proxy"
    assert_exactly_once(stream)
    assert committed == stream.committed_end()


@contextlib.asynccontextmanager
async def in_process_worker(stream: Stream, folder: Path, **overrides: Any) -> AsyncIterator[Worker]:
    """An exactly-once worker in this process on the stream's topics and group (settings ``overrides``),
    drained and stopped after."""
    settings = Settings(
        bootstrap_servers=stream.bootstrap,
        topic_prefix=stream.prefix,
        group_id=stream.group_id,
        delivery="exactly-once",
        session_timeout_ms=3000,
        heartbeat_interval_ms=500,
        drain_timeout_s=10,
        **overrides,
    )
    worker = Worker(settings, tiny_models(folder, "bert"))
    await worker.start()
    try:
        yield worker
    finally:
        await worker.drain()
        await worker.stop()


@pytest.mark.kafka
async def test_a_partition_whose_producer_did_not_open_on_assignment_is_opened_again_then_read(
    committed_stream: Stream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # InitProducerId can fail on assignment (the transaction coordinator moving, a broker restarting): the
    # partition stays paused until its producer is open. Nothing opened it again, so it stayed paused until
    # the next rebalance, which a stable group never has; a backpressure resume let its records be read and
    # answered with no producer to publish them, held in flight for good.
    stream = committed_stream
    refused: list[TopicPartition] = []
    coordinator_back = asyncio.Event()
    starts = PartitionProducers._started

    async def partition_0_fails_to_open_until_the_coordinator_is_back(
        self: PartitionProducers, tp: TopicPartition
    ) -> AIOKafkaProducer:
        if tp.partition == 0 and not coordinator_back.is_set():
            refused.append(tp)
            raise KafkaConnectionError("the transaction coordinator is away (this test)")
        return await starts(self, tp)

    monkeypatch.setattr(
        PartitionProducers, "_started", partition_0_fails_to_open_until_the_coordinator_is_back
    )
    ids = await stream.send(40)
    async with in_process_worker(stream, tmp_path) as worker:
        await wait_until(lambda: len(refused) >= 2, 30, "a second try to open partition 0's producer")
        assert worker.consumer is not None
        [tp] = set(refused)
        # Backpressure ends meanwhile: every partition is resumed but this one, which has no producer yet.
        worker.flow.paused = True
        worker.flow.apply_backpressure()
        assert not worker.flow.paused and tp in worker.consumer.paused(), "resumed without its producer"
        coordinator_back.set()
        await stream.wait_answered(ids, 30)
    await stream.settle(60)
    assert_exactly_once(stream)
    assert await stream.committed() == stream.committed_end()


#: Past a 1 s transaction timeout and the broker's next look for such (every 10 s by default).
TIMED_OUT_S = 12.0


@pytest.mark.kafka
async def test_a_transaction_the_broker_timed_out_is_followed_by_a_new_producer_and_answered_once(
    committed_stream: Stream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The broker aborts a transaction open past transaction_timeout_ms and moves its id's epoch on: the producer
    # is fenced though the partition is still this worker's. Taken for a new owner's fence, the producer was not
    # replaced: the partition stayed paused for good (simulation seed 566, exactly-once).
    stream = committed_stream
    held: list[float] = []
    add_offsets = AIOKafkaProducer.send_offsets_to_transaction

    async def the_first_waits_past_the_timeout(self: AIOKafkaProducer, offsets: Any, group_id: str) -> None:
        if not held:  # its replies are sent: the transaction is open at the coordinator
            held.append(asyncio.get_running_loop().time())
            await asyncio.sleep(TIMED_OUT_S)
        await add_offsets(self, offsets, group_id)

    monkeypatch.setattr(AIOKafkaProducer, "send_offsets_to_transaction", the_first_waits_past_the_timeout)
    ids = await stream.send(20)
    # The worker's own bound on a transaction (publish_retry_s + 15 s) is longer than the hold.
    async with in_process_worker(stream, tmp_path, transaction_timeout_ms=1000, publish_retry_s=5.0):
        await stream.wait_answered(ids, TIMED_OUT_S + 30)
    assert held, "no transaction was held: not the case under test"
    assert "fenced" in caplog.text, "the held transaction was not fenced: not the case under test"
    await stream.settle(60)
    assert_exactly_once(stream)
    assert await stream.committed() == stream.committed_end()


@pytest.mark.kafka
async def test_a_broker_unreachable_during_the_start_up_probe_is_waited_for_not_taken_for_a_refusal(
    committed_stream: Stream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The probe's InitProducerId met a broker gone away (a restart between the worker's connect and its probe):
    # the worker exited at start saying the broker refuses transactions (simulation seed 4584, exactly-once).
    stream = committed_stream
    cut: list[str] = []
    make = Transactions._producer

    def probe_meets_a_cut_once(self: Transactions, transactional: str) -> AIOKafkaProducer:
        producer = make(self, transactional)
        if transactional.endswith(".probe") and not cut:
            cut.append(transactional)

            async def unreachable() -> None:
                raise KafkaConnectionError("Unable to bootstrap (this test)")

            producer.start = unreachable
        return producer

    monkeypatch.setattr(Transactions, "_producer", probe_meets_a_cut_once)
    ids = await stream.send(8)
    async with in_process_worker(stream, tmp_path):  # its start raised TransactionsRefused
        await stream.wait_answered(ids, 30)
    assert cut, "the probe met no cut: not the case under test"
    await stream.settle(60)
    assert_exactly_once(stream)


@pytest.mark.kafka
async def test_a_transaction_timeout_above_the_brokers_maximum_is_refused_at_start_naming_the_setting(
    apache_bootstrap: str,
) -> None:
    # Apache Kafka's transaction.max.timeout.ms is 15 min by default: InitProducerId asking more is refused
    # (INVALID_TRANSACTION_TIMEOUT), which the worker reported as a broker without transactions.
    transactions, _, _ = scripted_transactions(apache_bootstrap, transaction_timeout_ms=15 * 60_000 + 1)
    with pytest.raises(TransactionsRefused, match="WORKER_TRANSACTION_TIMEOUT_MS") as refused:
        await asyncio.wait_for(transactions.probe(), START_TIMEOUT_S)
    assert "transaction.max.timeout.ms" in str(refused.value)


@pytest.mark.kafka
async def test_a_broker_without_transactions_stops_the_worker_at_start_naming_the_setting(
    bert_only: Path, tmp_path: Path
) -> None:
    # The embedded broker itself, whatever KAFKA_BOOTSTRAP_SERVERS says: it refuses InitProducerId.
    async with EmbeddedBroker() as broker:
        launcher = WorkerLauncher(broker.bootstrap_servers, bert_only, tmp_path)
        try:
            worker = launcher.start("refused", "refused-group", "refused", *EXACTLY_ONCE)
            code = await worker.wait_exit(START_TIMEOUT_S)
        finally:
            launcher.kill_all()
    assert code == 2, worker.log_tail()
    assert "WORKER_DELIVERY=exactly-once" in worker.log() and "refuses transactions" in worker.log()
    assert worker.count("worker started") == 0  # at start, before serving a single request


@pytest.mark.kafka
async def test_a_partitions_producer_keeps_its_reply_topic_after_a_reply_to_a_topic_created_since(
    apache_bootstrap: str, tmp_path: Path
) -> None:
    # aiokafka replaces a producer's metadata with that of the topics it tracks, and tracks a topic only once a
    # send misses it: a first reply to a reply_to topic created since narrowed a partition producer's metadata to
    # it, and a reply queued meanwhile for another topic waited out request_timeout_ms (docs/kafka-notes.md).
    # worker.kafka.topics.track_topic keeps every topic written.
    stream = Stream(apache_bootstrap, partitions=1, isolation_level="read_committed", idempotent=True)
    await stream.start()
    late = f"{stream.prefix}.replies.late"
    try:
        async with in_process_worker(stream, tmp_path) as worker:
            tp = TopicPartition(stream.requests_topic, 0)
            await wait_until(lambda: tp in worker.transactions._producers, 30, "the partition's producer")
            # Every topic, as a producer that tracks none refreshes its view (every 5 minutes).
            await worker.transactions._producers[tp].client.force_metadata_update()
            await create_topics(apache_bootstrap, [late])  # since; listed by the worker's first routing below
            await stream.wait_answered(await stream.send(1), 30)
            async with TopicReader(apache_bootstrap, late) as mine:
                await stream.send(1, reply_to=late)
                await mine.wait_for(1, timeout=30)
            metadata = worker.transactions._producers[tp].client.cluster
            assert metadata.partitions_for_topic(late)
            assert metadata.partitions_for_topic(stream.reply_topic), "the reply topic left its metadata"
    finally:
        await stream.stop()
