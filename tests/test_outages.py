"""Delivery faults against the real broker: a batch that fails outside run_batch, an
unknown topic during an outage, readiness while publishing fails, a paused worker's membership,
a fetch loop that dies.

The embedded broker cannot be made to raise aiokafka's outage errors on cue, so two tests inject
them at the worker's seams (``Worker.delivery.publish_record``, the delivery's ``TopicDirectory``
over the cluster's topic list, ``Worker.fetcher.fetch``), raising what aiokafka raises there; each says so. Broker outages made by
cutting connections are in tests/test_broker_loss.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError, NodeNotReadyError, UnknownTopicOrPartitionError

from schemas.topics import dlq_topic, requests_topic, results_topic
from tests.kafka_support import (
    TopicReader,
    body_of,
    headers_of,
    raw_producer,
    request_bytes,
    serving,
    tiny_models,
    until,
)
from tests.test_worker_kafka import SlowModel, committed_offsets
from worker.app import Worker
from worker.kafka.routing import TopicDirectory
from worker.serving.registry import ServedModel

pytestmark = pytest.mark.kafka

TEXT = {"text": "an ordinary request"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ServedModel]:
    """The tiny text classifier only: these faults are in the worker's plumbing, not the model."""
    return tiny_models(tmp_path_factory.mktemp("models"), "bert")


def ids_of(records: list[Any]) -> Counter[str]:
    return Counter(body_of(r)["id"] for r in records)


@dataclass(frozen=True)
class ShortModel(ServedModel):
    """Fault injection: the engine returns one output too few for any batch holding the text "short"
    (a fault outside run_batch's own handling: ``zip(strict=True)`` raises after the run)."""

    def run(self, batch: Any, key: Any = None) -> Any:
        outputs = super().run(batch, key)
        if any(item.context.get("text") == "short" for item in batch):
            return outputs[:-1]
        return outputs


async def test_a_batch_failing_outside_run_batch_is_answered_and_the_loop_keeps_running(
    kafka_bootstrap: str, models: dict[str, ServedModel]
) -> None:
    """Such a batch is answered (internal, with DLQ copies), its count released, and its model loop
    keeps running: the requests after it are answered."""
    bert = models["bert"]
    short = ShortModel(bert.metadata, bert.preprocessor, bert.engine, bert.head)
    async with serving(
        kafka_bootstrap, {"bert": short}, max_batch_size=2, max_wait_ms=600_000, eager_when_idle=False
    ) as worker:
        prefix = worker.settings.topic_prefix
        topic = requests_topic("text", prefix)
        async with (
            TopicReader(kafka_bootstrap, results_topic("text", prefix)) as replies,
            TopicReader(kafka_bootstrap, dlq_topic(prefix)) as dlq,
            raw_producer(kafka_bootstrap) as producer,
        ):
            # One partition, so the two form one full batch of 2.
            await producer.send_and_wait(topic, request_bytes("a", "bert", TEXT), partition=0)
            await producer.send_and_wait(topic, request_bytes("b", "bert", {"text": "short"}), partition=0)
            await replies.wait_for(2)
            await producer.send_and_wait(topic, request_bytes("c", "bert", TEXT), partition=0)
            await producer.send_and_wait(topic, request_bytes("d", "bert", TEXT), partition=0)
            await replies.wait_for(4)
            await until(lambda: worker.tracker.in_flight == 0 and worker.tracker.bytes_in_flight == 0)
            copies = await dlq.wait_for(2)
        answered = {body_of(r)["id"]: body_of(r) for r in replies.records}
        assert "model_loop_died" not in worker.not_ready_reasons()
    assert answered["a"]["error"]["code"] == answered["b"]["error"]["code"] == "internal"
    assert "error" not in answered["c"] and "error" not in answered["d"], "the loop kept running"
    assert sorted(headers_of(c)["source_offset"] for c in copies) == [b"0", b"1"]


async def test_an_unknown_topic_while_the_cluster_cannot_be_asked_is_retried_not_refused(
    kafka_bootstrap: str, models: dict[str, ServedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """During an outage aiokafka's producer raises UnknownTopicOrPartitionError (after its metadata
    wait) for a topic it has not written to: it is retried, not taken as a final refusal that would
    commit the request with nothing acknowledged. Injected for 3 s: that error on every publish,
    and the cluster's topic list failing as it does with the broker away (KafkaConnectionError)."""
    async with serving(kafka_bootstrap, models, publish_retry_s=1.0) as worker:
        prefix = worker.settings.topic_prefix
        loop = asyncio.get_running_loop()
        outage_ends = loop.time() + 3.0
        publish, list_topics = worker.delivery.publish_record, worker.clients.list_topics

        async def publish_in_outage(value: bytes, topic: str, *args: Any) -> Awaitable[Any]:
            if loop.time() < outage_ends:
                raise UnknownTopicOrPartitionError()
            return await publish(value, topic, *args)

        async def list_topics_in_outage() -> set[str]:
            if loop.time() < outage_ends:
                raise KafkaConnectionError("the broker is away")
            return await list_topics()

        monkeypatch.setattr(worker.delivery, "publish_record", publish_in_outage)
        monkeypatch.setattr(worker.delivery, "directory", TopicDirectory(list_topics_in_outage))
        async with (
            TopicReader(kafka_bootstrap, results_topic("text", prefix)) as replies,
            TopicReader(kafka_bootstrap, dlq_topic(prefix)) as dlq,
            raw_producer(kafka_bootstrap) as producer,
        ):
            await producer.send_and_wait(requests_topic("text", prefix), request_bytes("away", "bert", TEXT))
            [reply] = await replies.wait_for(1, timeout=30)
            await until(lambda: worker.tracker.in_flight == 0)
            await replies.settle()
            leftover = await dlq.settle()
        assert worker.metrics.publish_failures.labels("reply", "gave_up")._value.get() >= 1
    assert ids_of(replies.records).keys() == {"away"}
    assert "error" not in body_of(reply) and "reply_to_refused" not in headers_of(reply)
    assert leftover == [], "no DLQ record: the reply was delivered"


async def test_one_reply_that_gets_through_does_not_clear_publishing_failing_while_another_fails(
    kafka_bootstrap: str, models: dict[str, ServedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readiness: another reply's success does not clear ``failing_since``, so /readyz's
    publish_failing (after publish_retry_s / 2 of failing) does not restart its wait. Injected:
    NodeNotReadyError on every attempt at one reply for 3 s from its first, while another goes through."""
    async with serving(kafka_bootstrap, models, publish_retry_s=4.0) as worker:
        prefix = worker.settings.topic_prefix
        loop = asyncio.get_running_loop()
        first_failure: list[float] = []
        publish = worker.delivery.publish_record

        async def flaky(value: bytes, topic: str, *args: Any) -> Awaitable[Any]:
            if b'"stuck"' in value:
                first_failure[:] = first_failure or [loop.time()]
                if loop.time() < first_failure[0] + 3.0:
                    raise NodeNotReadyError()
            return await publish(value, topic, *args)

        monkeypatch.setattr(worker.delivery, "publish_record", flaky)
        async with (
            TopicReader(kafka_bootstrap, results_topic("text", prefix)) as replies,
            raw_producer(kafka_bootstrap) as producer,
        ):
            topic = requests_topic("text", prefix)
            await producer.send_and_wait(topic, request_bytes("stuck", "bert", TEXT))
            await until(lambda: worker.delivery.failing_since is not None)
            since = worker.delivery.failing_since
            await producer.send_and_wait(topic, request_bytes("steady", "bert", TEXT))
            await replies.wait_until(lambda records: "steady" in ids_of(records))
            assert worker.delivery.failing_since == since, "the stuck reply still fails"
            await until(lambda: "publish_failing" in worker.not_ready_reasons(), timeout=5)
            await replies.wait_until(lambda records: "stuck" in ids_of(records))
            # The reader may see the reply before the worker has handled the broker's ack of it.
            await until(lambda: worker.delivery.failing_since is None, timeout=5)
            assert "publish_failing" not in worker.not_ready_reasons()


async def test_an_idle_worker_whose_last_reply_gave_up_turns_ready_once_the_broker_answers(
    kafka_bootstrap: str, models: dict[str, ServedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readiness: the last reply gives up and nothing is published after it (its record is not read again
    here, as when a revoke dropped it). publish_failing clears at the broker's next answer; no reply
    is left to clear it (simulation seed 16282: /readyz said no for good). Injected: NodeNotReadyError
    on every attempt at that reply, and no redelivery."""
    async with serving(kafka_bootstrap, models, publish_retry_s=2.0) as worker:
        prefix = worker.settings.topic_prefix
        publish = worker.delivery.publish_record

        async def failing(value: bytes, topic: str, *args: Any) -> Awaitable[Any]:
            if b'"stuck"' in value:
                raise NodeNotReadyError()
            return await publish(value, topic, *args)

        monkeypatch.setattr(worker.delivery, "publish_record", failing)
        monkeypatch.setattr(worker.flow, "redeliver", lambda *args: None)
        async with raw_producer(kafka_bootstrap) as producer:
            await producer.send_and_wait(requests_topic("text", prefix), request_bytes("stuck", "bert", TEXT))
            await until(lambda: "publish_failing" in worker.not_ready_reasons(), timeout=5)
            await until(lambda: worker.delivery.failing_calls == 0, timeout=10)
            await until(lambda: "publish_failing" not in worker.not_ready_reasons(), timeout=5)
            assert worker.delivery.failing_since is not None, (
                "no reply got through: the broker's answer cleared it"
            )


async def test_a_worker_paused_longer_than_max_poll_interval_keeps_its_partitions(
    kafka_bootstrap: str, models: dict[str, ServedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """While backpressure pauses every partition the worker keeps calling getmany, so aiokafka does
    not leave the group after max_poll_interval_ms (a rebalance: revoke, re-fetch, duplicates). Here a
    pause lasts about 2.5 s (two batches of one, 2.5 s each, running at once) against a 2 s interval."""
    bert = models["bert"]
    slow = SlowModel(bert.metadata, bert.preprocessor, bert.engine, bert.head, delay_s=2.5)
    async with serving(
        kafka_bootstrap,
        {"bert": slow},
        max_in_flight=2,
        fetch_max_records=2,
        max_batch_size=1,
        max_wait_ms=0,
        max_poll_interval_ms=2000,
    ) as worker:
        revokes: list[object] = []
        revoked = worker.flow.partitions_revoked

        async def counting(partitions: Any) -> None:
            revokes.append(partitions)
            await revoked(partitions)

        monkeypatch.setattr(worker.flow, "partitions_revoked", counting)
        prefix = worker.settings.topic_prefix
        ids = [f"r{i}" for i in range(6)]
        async with (
            TopicReader(kafka_bootstrap, results_topic("text", prefix)) as replies,
            raw_producer(kafka_bootstrap) as producer,
        ):
            for request_id in ids:
                await producer.send(requests_topic("text", prefix), request_bytes(request_id, "bert", TEXT))
            await producer.flush()
            await replies.wait_until(lambda records: set(ids_of(records)) == set(ids), timeout=60)
            await until(lambda: worker.tracker.in_flight == 0)
            await replies.settle()
    assert revokes == [], "the worker left the group while paused"
    assert ids_of(replies.records) == Counter(ids), "one reply each: no redelivery"


async def test_a_fetch_loop_that_dies_is_reported_and_restarted_from_the_committed_offsets(
    kafka_bootstrap: str,
    models: dict[str, ServedModel],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Readiness: a dead fetch task is seen (not ready, fetch_loop_died) and restarted, not left
    ready and answering nothing. Injected: the first round that took a record raises outside the fetch call's own
    catch-all, after the client moved past the record (an exception no handler expects), so the loop
    dies with that record gone from the client: it is reported, restarted, and the record read again."""
    async with serving(kafka_bootstrap, models) as worker:
        track = worker.admission.track
        faults = iter([RuntimeError("injected fault after a fetch")])

        def failing_once(fetched: Any, epochs: Any) -> Any:
            fault = next(faults, None) if fetched.records else None
            if fault is not None:
                raise fault
            return track(fetched, epochs)

        caplog.set_level(logging.ERROR, logger="worker.fetch_loop")
        monkeypatch.setattr(worker.admission, "track", failing_once)
        prefix = worker.settings.topic_prefix
        async with (
            TopicReader(kafka_bootstrap, results_topic("text", prefix)) as replies,
            raw_producer(kafka_bootstrap) as producer,
        ):
            topic = requests_topic("text", prefix)
            await producer.send_and_wait(topic, request_bytes("taken", "bert", TEXT), partition=0)
            await until(lambda: "fetch_loop_died" in worker.not_ready_reasons(), timeout=10)
            assert not worker.ready
            await producer.send_and_wait(topic, request_bytes("after", "bert", TEXT), partition=0)
            await replies.wait_until(lambda records: {"taken", "after"} <= set(ids_of(records)), timeout=30)
            await until(lambda: worker.tracker.in_flight == 0)
        assert worker.ready
        await worker.flow.commit()
        assert (await committed(kafka_bootstrap, worker))[0] == 2
    assert any("the fetch loop died" in r.getMessage() for r in caplog.records)


async def test_a_fetch_round_that_raises_after_taking_records_loses_none(
    kafka_bootstrap: str, models: dict[str, ServedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fetch call raises after the client gave it a record (injected): the loop goes on, and the
    record, gone from the client, is read again from the committed offset and answered."""
    async with serving(kafka_bootstrap, models) as worker:
        assert worker.fetch_loop.fetcher is not None
        fetch = worker.fetch_loop.fetcher.fetch
        faults = iter([RuntimeError("injected fetch fault")])

        async def failing_once(*args: Any, **kwargs: Any) -> Any:
            fetched = await fetch(*args, **kwargs)
            fault = next(faults, None) if fetched.records else None
            if fault is not None:
                raise fault
            return fetched

        monkeypatch.setattr(worker.fetch_loop.fetcher, "fetch", failing_once)
        prefix = worker.settings.topic_prefix
        async with (
            TopicReader(kafka_bootstrap, results_topic("text", prefix)) as replies,
            raw_producer(kafka_bootstrap) as producer,
        ):
            topic = requests_topic("text", prefix)
            await producer.send_and_wait(topic, request_bytes("taken", "bert", TEXT), partition=0)
            await producer.send_and_wait(topic, request_bytes("after", "bert", TEXT), partition=0)
            await replies.wait_until(lambda records: {"taken", "after"} <= set(ids_of(records)), timeout=30)
            await until(lambda: worker.tracker.in_flight == 0)
        assert next(faults, None) is None, "the fault was injected"
        await worker.flow.commit()
        assert (await committed(kafka_bootstrap, worker))[0] == 2


async def committed(bootstrap: str, worker: Worker) -> dict[int, int | None]:
    """The group's committed offsets of the text request topic's partitions, read as a new client would."""
    topic = requests_topic("text", worker.settings.topic_prefix)
    partitions = [TopicPartition(topic, p) for p in range(worker.settings.partitions)]
    offsets = await committed_offsets(bootstrap, worker.settings.group_id, partitions)
    return {tp.partition: offset for tp, offset in offsets.items()}


async def test_fetch_failing_clears_once_fetching_works_again_even_while_idle(
    kafka_bootstrap: str, models: dict[str, ServedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readiness: fetch_failing clears when fetching works again, not only when a record arrives, so
    an idle worker is ready again after the broker came back. Injected: the consumer's getmany raises
    KafkaConnectionError (as aiokafka raises a fetch error it hands to its caller) for 2 s."""
    async with serving(kafka_bootstrap, models) as worker:
        consumer = worker.consumer
        assert consumer is not None
        getmany = consumer.getmany
        loop = asyncio.get_running_loop()
        failing_until = loop.time() + 2.0

        async def failing(*args: Any, **kwargs: Any) -> Any:
            if loop.time() < failing_until:
                raise KafkaConnectionError("injected fetch failure")
            return await getmany(*args, **kwargs)

        monkeypatch.setattr(consumer, "getmany", failing)
        await until(lambda: "fetch_failing" in worker.not_ready_reasons(), timeout=5)
        await until(lambda: "fetch_failing" not in worker.not_ready_reasons(), timeout=10)
        assert worker.tracker.in_flight == 0, "no record arrived: the worker stayed idle"
