"""A request that kills its worker, for real: worker processes under a supervisor, the embedded broker.

The killer is a request whose body carries the test-only failpoint's mark
(worker/kafka/failpoint.py ``CRASH_FAILPOINT_ENV``): a worker that prepares it SIGKILLs itself, as
the OOM killer would. ``run --processes 2`` restarts each dead child, as an orchestrator would.
Without the quarantine such a request would come back to every worker of the group for ever and
nothing behind it would be answered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from schemas.topics import dlq_topic, quarantine_topic
from tests.kafka_support import TopicReader, headers_of, raw_producer, tiny_models, until
from tests.process_support import FAST_GROUP_FLAGS, Stream, WorkerLauncher
from worker.app import Worker
from worker.kafka.failpoint import CRASH_FAILPOINT_ENV
from worker.kafka.topics import create_topics
from worker.settings import Settings

#: Two workers loading bert at once on a 2-core machine, and joining the group.
START_TIMEOUT_S = 90.0
#: The bound: the requests behind the killer answered within this.
ANSWERED_WITHIN_S = 150.0


@pytest.fixture
def workers(kafka_bootstrap: str, bert_only: Path, tmp_path: Path) -> Iterator[WorkerLauncher]:
    launcher = WorkerLauncher(kafka_bootstrap, bert_only, tmp_path)
    yield launcher
    launcher.kill_all()
    print(launcher.log_tails())


@pytest.fixture
async def stream(kafka_bootstrap: str) -> AsyncIterator[Stream]:
    """A one-partition request topic: every request queues behind the killer."""
    s = Stream(kafka_bootstrap, partitions=1)
    await s.start()
    yield s
    await s.stop()


def stream_settings(bootstrap: str, stream: Stream, **knobs: Any) -> Settings:
    """An in-process worker's settings on ``stream``'s topics and group (quick rebalances)."""
    return Settings(
        bootstrap_servers=bootstrap,
        topic_prefix=stream.prefix,
        group_id=stream.group_id,
        session_timeout_ms=3000,
        heartbeat_interval_ms=500,
        **knobs,
    )


async def write_marker(bootstrap: str, stream: Stream, key: str, marker: dict[str, Any]) -> None:
    """A crash marker written by hand, as a worker of ``stream``'s group would have left it."""
    async with raw_producer(bootstrap) as producer:
        await producer.send_and_wait(
            quarantine_topic(stream.prefix), json.dumps(marker).encode(), key=key.encode()
        )


@pytest.mark.kafka
@pytest.mark.slow
async def test_a_request_that_kills_its_worker_costs_three_deaths_then_a_dlq_record(
    workers: WorkerLauncher, stream: Stream, monkeypatch: pytest.MonkeyPatch
) -> None:
    mark = f"kill-me-{uuid.uuid4().hex}"
    monkeypatch.setenv(CRASH_FAILPOINT_ENV, mark)  # the children inherit it; off everywhere else
    parent = workers.start("group", stream.group_id, stream.prefix, *FAST_GROUP_FLAGS, "--processes", "2")
    await parent.wait_for_log("worker started", START_TIMEOUT_S, process="worker-0")
    await parent.wait_for_log("worker started", START_TIMEOUT_S, process="worker-1")
    async with TopicReader(stream.bootstrap, dlq_topic(stream.prefix)) as dlq:
        ahead = await stream.send(3)  # run one at a time after the first death, each answered
        killer = await stream.send(1, text=mark)
        ordinary = await stream.send(20)
        started = time.monotonic()

        await stream.wait_answered(ahead + ordinary, ANSWERED_WITHIN_S, [parent])
        took = time.monotonic() - started
        deaths = parent.count("exited with -9; restarting it", process="MainProcess")
        print(f"the 23 other requests answered {took:.1f} s after they were sent; {deaths} worker deaths")

        # Default max_crash_attempts=3: one death with the round running, two with the killer alone.
        assert 1 <= deaths <= 3, parent.log_tail()
        records = await dlq.wait_until(
            lambda rs: any(headers_of(r).get("error_code") == b"poison_suspected" for r in rs), 30
        )
    (poison,) = [r for r in records if headers_of(r).get("error_code") == b"poison_suspected"]
    headers = headers_of(poison)
    partition, offset = stream.sent[killer[0]]
    assert (headers["source_topic"], headers["source_partition"], headers["source_offset"]) == (
        stream.requests_topic.encode(),
        str(partition).encode(),
        str(offset).encode(),
    )
    assert poison.value == stream.body(killer[0], mark), "dlq_payload=body: the request as sent"
    # The client is told too: an error reply under its request id, not silence.
    await stream.wait_answered(killer, 30, [parent])
    (reply,) = stream.replies[killer[0]]
    assert reply.body["error"]["code"] == "poison_suspected"
    # Everything behind it was answered and committed past (the commit follows the reply's ack: waited
    # for, not read at once), with no further death.
    await until_committed(stream, 30)
    assert parent.count("exited with", process="MainProcess") == deaths, "no further death"


@pytest.mark.kafka
async def test_a_rebalance_and_a_death_while_idle_count_no_crash(
    kafka_bootstrap: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Only a death with records running counts: not a member joining, not one dying with all answered."""
    models = tiny_models(tmp_path, "bert")
    stream = Stream(kafka_bootstrap, partitions=2)
    await stream.start()
    settings = stream_settings(kafka_bootstrap, stream)
    first, second = Worker(settings, models), Worker(settings, models)
    caplog.set_level(logging.INFO, logger="worker.kafka.quarantine")
    try:
        await first.start()
        await stream.wait_answered(await stream.send(10), 60)
        await second.start()  # a rebalance: the first revokes both partitions, one comes back
        await until(lambda: bool(first.consumer and first.consumer.assignment()), 30)
        await until(lambda: bool(second.consumer and second.consumer.assignment()), 30)
        await stream.wait_answered(await stream.send(10), 60)
        await until_committed(stream, 30)
        # The first dies while idle (no drain, no revoke: its markers stay armed) ...
        await first.stop()
        await until(lambda: second.consumer is not None and len(second.consumer.assignment()) == 2, 30)
        # ... and its partitions' next requests run as whole rounds, no crash counted.
        await stream.wait_answered(await stream.send(10), 60)
        await second.drain()
    finally:
        await first.stop()
        await second.stop()
        await stream.stop()
    assert [r.message for r in caplog.records if "died with" in r.getMessage()] == []
    assert stream.missing() == [] and stream.duplicates() == 0
    # What the topic holds: a marker per partition, disarmed by the second worker's drain.
    markers = await last_markers(kafka_bootstrap, stream.prefix)
    assert set(markers) == {f"{stream.group_id}/{stream.requests_topic}/{p}" for p in (0, 1)}
    assert all(not marker["armed"] and marker["crashes"] == 0 for marker in markers.values()), markers


async def until_committed(stream: Stream, within: float) -> None:
    """Until the group's commits reach the end of every request partition."""
    deadline = time.monotonic() + within
    while await stream.committed() != stream.committed_end():
        assert time.monotonic() < deadline, "the commits never reached the end of the partitions"
        await asyncio.sleep(0.2)


async def last_markers(bootstrap: str, prefix: str) -> dict[str, dict[str, object]]:
    """The last marker of each key on the quarantine topic, read as plain JSON."""
    reader = AIOKafkaConsumer(
        quarantine_topic(prefix), bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await reader.start()
    try:
        latest: dict[str, dict[str, object]] = {}
        while batches := await reader.getmany(timeout_ms=2000):
            for records in batches.values():
                for record in records:
                    assert record.key is not None and record.value is not None
                    latest[record.key.decode()] = json.loads(record.value)
        return latest
    finally:
        await reader.stop()


@pytest.mark.kafka
async def test_a_record_its_last_crashes_named_is_answered_as_poison_without_running(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A dead worker's marker, written by hand: offset 2 armed alone, one crash over its round and one
    while it ran alone behind it."""
    dead = {
        "upto": 2,
        "armed": True,
        "crashes": 1,
        "alone": True,
        "suspect_to": 4,
        "named": 1,
        "writer": "dead",
    }
    stream, ids = await five_answered_under(kafka_bootstrap, tmp_path, dead)
    # The group resumed at 0, under the marker: its writer died with offset 2 running alone, its
    # third crash (one over the round, two alone). 0 and 1 ran alone first (each armed with the
    # round's count and none of their own, carrying 2's), 2 was not run, 3 and 4 ran as a whole round
    # under a marker that keeps the verdict on 2 (read again if the commit past it fails).
    codes = {i: stream.replies[i][0].body.get("error", {}).get("code") for i in ids}
    assert codes == {ids[0]: None, ids[1]: None, ids[2]: "poison_suspected", ids[3]: None, ids[4]: None}
    assert stream.replies[ids[2]][0].body["id"] == ids[2], "the key names the request"
    armed = await all_markers(kafka_bootstrap, stream.prefix)
    alone = [
        (m["upto"], m["crashes"], m["named"], m.get("named_at"), m.get("alone_crashes"))
        for m in armed
        if m["armed"] and m["alone"]
    ]
    # Crashes per record (the hand-written marker predates them), and the most-named one for older readers.
    assert alone == [(2, 1, 1, None, None), (0, 1, 2, 2, {"2": 2}), (1, 1, 2, 2, {"2": 2})], armed
    whole = [
        (m["upto"], m["crashes"], m["poison"], m["poison_crashes"])
        for m in armed
        if m["armed"] and not m["alone"]
    ]
    assert whole == [(4, 0, 2, 3)], armed


async def test_a_poison_verdict_whose_commit_failed_is_answered_again_without_running(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A marker written by hand: its writer answered offset 2 as poison (3 crashes), then let the
    partition go cleanly before the commit past it landed (disarmed; the group resumes at 0)."""
    let_go = {"upto": 4, "armed": False, "writer": "gone", "poison": 2, "poison_crashes": 3}
    stream, ids = await five_answered_under(kafka_bootstrap, tmp_path, let_go)
    codes = {i: stream.replies[i][0].body.get("error", {}).get("code") for i in ids}
    assert codes == {ids[0]: None, ids[1]: None, ids[2]: "poison_suspected", ids[3]: None, ids[4]: None}
    # 0 and 1 ran alone (so 2 came up alone), 2 never ran; 3 and 4 as a whole round.
    armed = [m for m in await all_markers(kafka_bootstrap, stream.prefix) if m["armed"]]
    assert [(m["upto"], m["alone"]) for m in armed] == [(0, True), (1, True), (4, False)], armed


async def five_answered_under(
    bootstrap: str, tmp_path: Path, marker: dict[str, Any]
) -> tuple[Stream, list[str]]:
    """Five requests (offsets 0..4 of one partition, nothing committed) under a marker written by hand,
    served by a fresh worker until all are answered and committed; the stream (stopped) and their ids."""
    models = tiny_models(tmp_path, "bert")
    stream = Stream(bootstrap, partitions=1)
    await stream.start()
    ids = await stream.send(5)
    await create_topics(bootstrap, [quarantine_topic(stream.prefix)], 1)
    await write_marker(bootstrap, stream, f"{stream.group_id}/{stream.requests_topic}/0", marker)
    worker = Worker(stream_settings(bootstrap, stream), models)
    try:
        await worker.start()
        await stream.wait_answered(ids, 60)
        await until_committed(stream, 30)
        await worker.drain()
    finally:
        await worker.stop()
        await stream.stop()
    return stream, ids


async def all_markers(bootstrap: str, prefix: str) -> list[dict[str, Any]]:
    """Every marker on the quarantine topic, in order, read as plain JSON."""
    reader = AIOKafkaConsumer(
        quarantine_topic(prefix), bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await reader.start()
    try:
        markers: list[dict[str, Any]] = []
        while batches := await reader.getmany(timeout_ms=2000):
            for records in batches.values():
                markers += [json.loads(record.value or b"") for record in records]
        return markers
    finally:
        await reader.stop()


@pytest.mark.kafka
async def test_a_revoke_that_runs_out_with_records_running_marks_the_marker_revoked(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The chaos soak's false crashes, the writer's half: a live worker whose revoke's bounded wait runs
    out with records still running (a member joined) leaves the marker armed but revoked (before:
    plainly armed, so the next owner counted a crash). Assigned the partition back (the member left), the
    round it fetches again runs under a marker armed afresh: a death now would be a crash, not a
    hand-over (before: under its own revoked marker, as simulation seed 6110's first kill was)."""
    models = tiny_models(tmp_path, "bert")
    stream = Stream(kafka_bootstrap, partitions=1)
    await stream.start()
    settings = stream_settings(kafka_bootstrap, stream, executor_threads=2)  # the revoke waits 1.5 s
    first = Worker(settings, models)
    # A member that joins and leaves and runs nothing: the partition comes back to the first with the
    # first's own revoked marker the last one written.
    member = AIOKafkaConsumer(
        stream.requests_topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=stream.group_id,
        session_timeout_ms=3000,
        heartbeat_interval_ms=500,
        enable_auto_commit=False,
    )
    gate = threading.Event()
    try:
        await first.start()
        await stream.wait_answered(await stream.send(3), 60)
        # Slow records: every inference thread is taken, so batches wait (as a slow model on a loaded
        # CPU does); the requests are fetched, tracked and queued, not answered.
        for _ in range(2):
            first.executor.submit(gate.wait, 60)
        await stream.send(4)
        await until(lambda: first.tracker.pending() == 4, 30)
        generation = first.flow.generation
        await member.start()  # a rebalance: the first's revoke runs out with the 4 running
        await until(lambda: first.flow.generation > generation, 60)
        markers = await all_markers(kafka_bootstrap, stream.prefix)
        await member.stop()  # the partition goes back to the first, its 4 still running there
        me = first.fetch_loop.quarantine.me if first.fetch_loop.quarantine is not None else ""
        deadline = time.monotonic() + 30
        while True:
            again = [
                m
                for m in (await all_markers(kafka_bootstrap, stream.prefix))[len(markers) :]
                if m["writer"] == me
            ]
            if any(not m["revoked"] for m in again) or time.monotonic() > deadline:
                break
    finally:
        gate.set()
        await member.stop()
        await first.stop()
        await stream.stop()
    # Armed over offsets 3..6 (0..2 were answered and committed) by the first, then let go alive.
    revoked = [(m["armed"], m["upto"], m["crashes"]) for m in markers if m.get("revoked")]
    assert revoked == [(True, 6, 0)], markers
    # Back with the first (after, it may be, one more revoke of its own as the member left): 3..6 fetched
    # again and armed by it afresh, not revoked, no crash counted.
    armed = [(m["armed"], m["revoked"], m["upto"], m["crashes"]) for m in again]
    assert armed[-1:] == [(True, False, 6, 0)] and set(armed[:-1]) <= {(True, True, 6, 0)}, again


@pytest.mark.kafka
async def test_a_marker_its_live_writer_revoked_costs_no_crash_and_no_one_at_a_time_reading(
    kafka_bootstrap: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The reader's half: the next owner of a partition whose last owner let go alive with offsets 0..4
    running counts no crash and runs them as one round (before: one crash, then one at a time)."""
    handed = {"upto": 4, "armed": True, "crashes": 0, "revoked": True, "resumed_at": 0, "writer": "alive"}
    caplog.set_level(logging.INFO, logger="worker.kafka.quarantine")
    stream, _ = await five_answered_under(kafka_bootstrap, tmp_path, handed)
    assert [r.getMessage() for r in caplog.records if "died with" in r.getMessage()] == []
    assert stream.missing() == [] and stream.duplicates() == 0
    # What it armed: the five as one round, no crash, the one hand-over carried; then its drain disarmed.
    mine = (await all_markers(kafka_bootstrap, stream.prefix))[1:]
    assert [(m["armed"], m["alone"], m["upto"], m["crashes"], m["handed"]) for m in mine] == [
        (True, False, 4, 0, 1),
        (False, False, 4, 0, 1),
    ], mine
