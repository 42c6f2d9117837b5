"""The broker vanishes for seconds mid-stream: the worker lives on, answers everything, commits to the end.

Invariants 1 and 2 of DESIGN.md across a broker outage. The broker advertises a TcpProxy's
port, so every connection (bootstrap, and every one metadata points to) goes through the
proxy; cutting it is an outage as all clients see it: connections reset, new ones refused.
Duplicates (redelivery if the group dropped the silent worker) are allowed, with the same id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition

from schemas.topics import dlq_topic, requests_topic, results_topic
from tests.conftest import KAFKA_BROKERS
from tests.kafka_support import TopicReader, body_of, raw_producer, request_bytes, serving, tiny_models, until
from tests.process_support import Stream, WorkerLauncher, wait_until
from tests.references import TINY
from tests.tcp_proxy import TcpProxy
from tests.test_worker_kafka import committed_offsets
from tests.test_worker_processes import (
    START_TIMEOUT_S,
    RecordProperty,
    assert_duplicates_agree,
    report_duplicates,
    start_worker,
    stop_worker,
)
from worker.app import STOP_BUDGET_S
from worker.kafka.apache_broker import ApacheKafka
from worker.kafka.broker_processes import free_port
from worker.kafka.embedded_broker import EmbeddedBroker
from worker.readiness import BROKER_CHECK_S, BROKER_CHECK_TIMEOUT_S, BROKER_UNREACHABLE_S

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

#: Longer than the session timeout (3 s), so a broker may drop the worker from the group (tansu,
#: measured, keeps a lone member: no rebalance, no duplicates); shorter than aiokafka's 40 s
#: request timeout, which the producer's sends ride out (for longer, see the long-outage test below).
OUTAGE_S = 7.0


@pytest.fixture(params=KAFKA_BROKERS)
async def proxy(request: pytest.FixtureRequest) -> AsyncIterator[TcpProxy]:
    """A proxy in front of a broker of this test's own (tansu or Apache Kafka), which advertises the
    proxy's address. Not the session's broker: its advertised address is the proxy's."""
    if request.param == "external":
        pytest.skip("the outage needs a broker of the test's own behind the proxy")
    broker_port = free_port()
    async with contextlib.AsyncExitStack() as stack:
        proxy = await stack.enter_async_context(TcpProxy(broker_port))
        if request.param == "apache":
            await stack.enter_async_context(ApacheKafka(port=broker_port, advertised_port=proxy.port))
        else:
            await stack.enter_async_context(EmbeddedBroker(port=broker_port, advertised_port=proxy.port))
        yield proxy


@pytest.fixture
def workers(proxy: TcpProxy, tmp_path: Path) -> Iterator[WorkerLauncher]:
    """Worker processes serving the tiny bert through the proxy; killed (with their children) afterwards."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "bert").symlink_to(TINY / "bert", target_is_directory=True)
    launcher = WorkerLauncher(proxy.address, models, tmp_path)
    yield launcher
    launcher.kill_all()
    print(launcher.log_tails())  # shown by pytest only when the test failed


@pytest.fixture
async def stream(proxy: TcpProxy, caplog: pytest.LogCaptureFixture) -> AsyncIterator[Stream]:
    """Requests and replies of this test, through the proxy like the worker's own traffic."""
    # The test's own clients log an ERROR per reconnect attempt during the outage: noise here.
    caplog.set_level(logging.CRITICAL, logger="aiokafka")
    s = Stream(proxy.address)
    await s.start()
    yield s
    await s.stop()


async def test_broker_outage_mid_stream_loses_nothing(
    proxy: TcpProxy, workers: WorkerLauncher, stream: Stream, record_property: RecordProperty
) -> None:
    worker = start_worker(workers, stream, "survivor")
    # ~200 requests/s; during the outage the producer's sends wait (aiokafka retries them).
    async with stream.steadily(10) as sent:
        await wait_until(lambda: stream.answered() >= 300, START_TIMEOUT_S, "300 replies", [worker])
        reset = proxy.cut()
        answered_at_cut, sent_at_cut = stream.answered(), len(sent)
        await asyncio.sleep(OUTAGE_S)  # the outage itself: a duration, not a wait for an event
        assert worker.returncode is None, f"the worker exited during the outage\n{worker.log_tail()}"
        proxy.restore()

        after = len(sent)
        await wait_until(
            lambda: len(sent) >= after + 200 and stream.answered(sent[after:]) >= 200,
            START_TIMEOUT_S,
            "200 replies to requests sent after the outage",
            [worker],
        )

    await stream.wait_answered(sent, 60, [worker])
    await stop_worker(worker)
    await stream.settle()

    assert stream.missing() == []
    assert await stream.committed() == stream.committed_end()
    assert_duplicates_agree(stream)
    report_duplicates(stream, record_property, "broker outage")
    print(f"answered at the cut: {answered_at_cut} of {sent_at_cut} sent; {reset} connections reset")
    assert reset > 0, "the cut reset no connection: the traffic did not go through the proxy"


#: aiokafka's producer gives up on a batch after request_timeout_ms (40 s, the worker sets no other).
LONG_OUTAGE_S = 45.0


async def test_an_outage_longer_than_the_producer_timeout_keeps_replies_on_reply_to(
    proxy: TcpProxy, workers: WorkerLauncher, stream: Stream
) -> None:
    worker = start_worker(workers, stream, "survivor", "--max-batch-size", "8")
    await worker.wait_for_log("worker started", START_TIMEOUT_S)  # it has created the results topic
    async with TopicReader(proxy.address, results_topic("text", stream.prefix)) as results:
        # A backlog sent before the cut: the test's own producer would time out in the outage too.
        ids = await stream.send(3000)
        await wait_until(lambda: stream.answered() >= 300, START_TIMEOUT_S, "300 replies", [worker])
        proxy.cut()
        await asyncio.sleep(LONG_OUTAGE_S)  # the outage itself: a duration, not a wait for an event
        assert worker.returncode is None, f"the worker exited during the outage\n{worker.log_tail()}"
        proxy.restore()

        def rerouted() -> set[str]:
            """Ids answered on the modality's results topic instead of reply_to."""
            return {body_of(record)["id"] for record in results.records}

        await wait_until(
            lambda: not set(stream.missing(ids)) - rerouted(), 60, "a reply to every request", [worker]
        )
    assert rerouted() == set(), f"{len(rerouted())} of {len(ids)} replies went to the results topic"
    assert stream.missing(ids) == []


async def test_sigterm_with_the_broker_gone_exits_within_the_drain_bound(
    proxy: TcpProxy, workers: WorkerLauncher, stream: Stream
) -> None:
    """The drain bound holds whatever the broker does: drain_timeout_s plus STOP_BUDGET_S (and scheduling slack)."""
    drain_timeout_s = 5.0
    worker = start_worker(workers, stream, "stranded", "--drain-timeout-s", str(drain_timeout_s))
    await worker.wait_for_log("worker started", START_TIMEOUT_S)
    ids = await stream.send(2000)
    await wait_until(lambda: stream.answered() >= 100, START_TIMEOUT_S, "100 replies", [worker])
    proxy.cut()
    signalled = asyncio.get_running_loop().time()
    worker.send(signal.SIGTERM)
    code = await worker.wait_exit(drain_timeout_s + STOP_BUDGET_S + 15)
    took = asyncio.get_running_loop().time() - signalled
    print(f"exit {code} {took:.1f} s after SIGTERM with the broker gone; {stream.answered(ids)} answered")
    assert code == 0, worker.log_tail()
    assert took <= drain_timeout_s + STOP_BUDGET_S + 3.0, f"{took:.1f} s\n{worker.log_tail()}"
    # What it could not answer stays uncommitted: a successor answers it once the broker is back.
    proxy.restore()
    successor = start_worker(workers, stream, "successor")
    await stream.wait_answered(ids, 120, [successor])
    assert stream.missing(ids) == []


#: A measured fault, scaled down: there publish_retry_s 4 s and a 45 s cut; here 2 s and
#: 8 s (four times publish_retry_s, so every batch in flight gives up, some twice).
GIVE_UP_RETRY_S = 2.0
GIVE_UP_CUT_S = 8.0


async def test_a_cut_longer_than_publish_retry_s_while_batches_give_up_loses_nothing(
    proxy: TcpProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Give-ups handed back in offset order never move a partition's position forward past a lower
    offset given up, so all 60 are answered again after the cut (were the highest seek to win, 2 would
    be) and the group's commits reach the end. In process, so the test can wait until the worker holds
    all 60 before it cuts the broker away.

    Only replies created after the restore count: a send given up during the cut may still go out
    once the broker is back (aiokafka keeps the record), so every id can show up on the reply topic
    before the worker has read a single one of them again (CI, stop 32: the test then stopped the
    worker with nothing read again, nothing committed).
    """
    caplog.set_level(logging.CRITICAL, logger="aiokafka")
    per_partition = 30
    async with serving(
        proxy.address,
        tiny_models(tmp_path, "bert"),
        publish_retry_s=GIVE_UP_RETRY_S,
        max_wait_ms=2000,  # the batches wait, so the cut comes before any reply is published
        max_batch_size=64,
        eager_when_idle=False,
    ) as worker:
        prefix = worker.settings.topic_prefix
        topic = requests_topic("text", prefix)
        ids = [f"r{i}" for i in range(2 * per_partition)]
        async with raw_producer(proxy.address) as producer:
            for i, request_id in enumerate(ids):
                await producer.send(
                    topic, request_bytes(request_id, "bert", {"text": f"t {i}"}), partition=i % 2
                )
            await producer.flush()
        await until(lambda: worker.tracker.in_flight == len(ids), timeout=20)
        proxy.cut()
        await asyncio.sleep(GIVE_UP_CUT_S)  # the outage itself: a duration, not a wait for an event
        restored_ms = int(time.time() * 1000)  # replies carry their producer's CreateTime
        proxy.restore()
        gave_up = worker.metrics.publish_failures.labels("reply", "gave_up")._value.get()
        async with (
            TopicReader(proxy.address, results_topic("text", prefix)) as replies,
            TopicReader(proxy.address, dlq_topic(prefix)) as dlq,
        ):

            def answered_again() -> set[str]:
                fresh = [r for r in [*replies.records, *dlq_records(dlq)] if r.timestamp >= restored_ms]
                return {body_of(r)["id"] for r in fresh}

            await until(lambda: answered_again() >= set(ids), timeout=60)
        group = worker.settings.group_id
        ends = {TopicPartition(topic, p): per_partition for p in (0, 1)}
        committed = await until_committed(proxy.address, group, ends, within=30)
    assert gave_up >= 1, "no reply gave up during the cut: the scenario did not happen"
    assert committed == ends


async def until_committed(
    bootstrap: str, group: str, ends: dict[TopicPartition, int], within: float
) -> dict[TopicPartition, int | None]:
    """The group's committed positions once they reach ``ends``, or as they stand after ``within`` seconds."""
    deadline = time.monotonic() + within
    while (committed := await committed_offsets(bootstrap, group, ends)) != ends:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    return committed


def dlq_records(reader: TopicReader) -> list[Any]:
    """DLQ records that carry a request body (with its id)."""
    return [r for r in reader.records if r.value]


async def test_an_idle_worker_turns_not_ready_while_the_broker_is_away_and_ready_after(
    proxy: TcpProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Readiness: an idle worker turns not ready with the broker gone, though aiokafka's fetch errors
    stay in its own task and getmany returns nothing either way. The stated bound: not ready within
    BROKER_CHECK_S + BROKER_UNREACHABLE_S + BROKER_CHECK_TIMEOUT_S of the cut, ready again within
    BROKER_CHECK_S (plus one metadata answer) of the broker's return."""
    caplog.set_level(logging.CRITICAL, logger="aiokafka")
    bound = BROKER_CHECK_S + BROKER_UNREACHABLE_S + BROKER_CHECK_TIMEOUT_S
    async with serving(proxy.address, tiny_models(tmp_path, "bert")) as worker:
        loop = asyncio.get_running_loop()
        proxy.cut()
        cut_at = loop.time()
        await until(lambda: not worker.ready, timeout=bound + 5)
        turned = loop.time() - cut_at
        assert "broker_unreachable" in worker.not_ready_reasons()
        proxy.restore()
        restored_at = loop.time()
        await until(lambda: worker.ready, timeout=30)
        back = loop.time() - restored_at
    print(f"not ready {turned:.1f} s after the cut, ready {back:.1f} s after the restore")
    assert turned <= bound + 1.0
