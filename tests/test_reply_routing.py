"""The worker writes only where it should: the reply_to policy, no topic created on a client's word, DLQ privacy.

Each refused ``reply_to`` must be answered on the modality's results topic with a
``reply_to_refused`` header, must leave nothing in the topic it named, and must create no topic.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from schemas.topics import dlq_topic, quarantine_topic, requests_topic, results_topic
from tests.kafka_support import (
    TopicReader,
    body_of,
    headers_of,
    raw_producer,
    request_bytes,
    serving,
    tiny_models,
)
from worker.kafka.topics import MISSING_GRACE_S, MissingTopics, create_topics
from worker.serving.registry import ServedModel

pytestmark = pytest.mark.kafka

TEXT = {"text": "routing check"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ServedModel]:
    """The tiny text classifier only: routing does not depend on the model."""
    return tiny_models(tmp_path_factory.mktemp("models"), "bert")


async def topic_names(bootstrap: str) -> set[str]:
    """Every topic of the cluster, listed without naming (so without creating) any."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


def refused_cases(prefix: str) -> dict[str, str]:
    """reply_to -> the refusal expected: the four rows of the issue, other applications' topics under
    the default pattern, plus names that cannot be topics."""
    return {
        f"{prefix}.replies.{uuid.uuid4().hex[:8]}": "missing_topic",
        # Outside <prefix>.replies. by default (reply_to_pattern unset).
        "payments.events": "not_allowed",
        "_schemas": "not_allowed",
        dlq_topic(prefix): "reserved_topic",
        results_topic("vision", prefix): "reserved_topic",
        requests_topic("audio", prefix): "reserved_topic",
        requests_topic("text", prefix): "reserved_topic",
        "__consumer_offsets": "reserved_topic",
        "bad name!": "illegal_name",
    }


async def test_refused_reply_to_is_answered_on_the_results_topic_and_writes_nowhere_else(
    kafka_bootstrap: str, models: dict[str, ServedModel]
) -> None:
    async with serving(kafka_bootstrap, models) as worker:
        prefix = worker.settings.topic_prefix
        cases = refused_cases(prefix)
        results = results_topic("text", prefix)
        watched = [dlq_topic(prefix), results_topic("vision", prefix), requests_topic("audio", prefix)]
        # The worker serves text only; the reader needs the other two to exist (Apache Kafka creates
        # no topic a client names; tansu would).
        await create_topics(kafka_bootstrap, watched)
        async with (
            TopicReader(kafka_bootstrap, results) as answers,
            TopicReader(kafka_bootstrap, *watched) as elsewhere,
            raw_producer(kafka_bootstrap) as producer,
        ):
            ids = {}
            for reply_to in cases:
                request_id = f"r-{uuid.uuid4().hex[:8]}"
                ids[request_id] = reply_to
                await producer.send_and_wait(
                    requests_topic("text", prefix),
                    request_bytes(request_id, "bert", TEXT),
                    headers=[("reply_to", reply_to.encode())],
                )
            got = await answers.wait_for(len(cases))
            by_id = {body_of(r)["id"]: r for r in got}
            assert set(by_id) == set(ids)
            for request_id, reply_to in ids.items():
                record = by_id[request_id]
                assert "error" not in body_of(record), body_of(record)
                headers = headers_of(record)
                assert headers["reply_to_refused"].decode() == cases[reply_to], (reply_to, headers)
            # Every request was answered once, on the results topic; nothing landed anywhere else.
            assert len(got) == len(cases)
            assert all(body_of(r).get("id") not in ids for r in elsewhere.records), elsewhere.records
            assert worker.metrics.reply_to_refused.labels("reserved_topic")._value.get() >= 5
        missing = next(t for t, why in cases.items() if why == "missing_topic")
        assert missing not in await topic_names(kafka_bootstrap), "the worker created a client's topic"


async def test_an_existing_allowed_reply_to_outside_the_prefix_gets_the_reply(
    kafka_bootstrap: str, models: dict[str, ServedModel]
) -> None:
    own = f"team-a.replies.{uuid.uuid4().hex[:8]}"
    other = f"team-b.replies.{uuid.uuid4().hex[:8]}"
    await create_topics(kafka_bootstrap, [own, other], 1)
    async with serving(kafka_bootstrap, models, reply_to_pattern=r"team-a\.replies\..+") as worker:
        prefix = worker.settings.topic_prefix
        async with (
            TopicReader(kafka_bootstrap, own, other) as replies,
            TopicReader(kafka_bootstrap, results_topic("text", prefix)) as answers,
            raw_producer(kafka_bootstrap) as producer,
        ):
            for request_id, reply_to in (("mine", own), ("theirs", other)):
                await producer.send_and_wait(
                    requests_topic("text", prefix),
                    request_bytes(request_id, "bert", TEXT),
                    headers=[("reply_to", reply_to.encode()), ("correlation_id", f"c-{request_id}".encode())],
                )
            [mine] = await replies.wait_for(1)
            [theirs] = await answers.wait_for(1)
        assert mine.topic == own and body_of(mine)["id"] == "mine"
        assert headers_of(mine)["correlation_id"] == b"c-mine"
        assert "reply_to_refused" not in headers_of(mine)
        assert body_of(theirs)["id"] == "theirs"
        assert headers_of(theirs)["reply_to_refused"] == b"not_allowed"
        assert headers_of(theirs)["reply_to_requested"] == other.encode()
        assert [r for r in replies.records if r.topic == other] == []


async def test_an_oversize_correlation_id_is_an_invalid_request_that_is_not_echoed(
    kafka_bootstrap: str, models: dict[str, ServedModel]
) -> None:
    async with serving(kafka_bootstrap, models, max_header_bytes=64) as worker:
        prefix = worker.settings.topic_prefix
        async with (
            TopicReader(kafka_bootstrap, results_topic("text", prefix), dlq_topic(prefix)) as reader,
            raw_producer(kafka_bootstrap) as producer,
        ):
            await producer.send_and_wait(
                requests_topic("text", prefix),
                request_bytes("long-header", "bert", TEXT),
                key=b"long-header",
                headers=[("correlation_id", b"x" * 65)],
            )
            got = await reader.wait_for(2)
        reply = next(r for r in got if r.topic == results_topic("text", prefix))
        assert body_of(reply)["id"] == "long-header"
        assert body_of(reply)["error"]["code"] == "invalid_request"
        assert "correlation_id" in body_of(reply)["error"]["message"]
        assert headers_of(reply)["correlation_id"] == b"long-header", (
            "the key stands in for the refused header"
        )


async def test_dlq_coordinates_only_keeps_the_body_out_of_the_dlq(
    kafka_bootstrap: str, models: dict[str, ServedModel]
) -> None:
    secret = "patient 4711 has a secret diagnosis"
    async with serving(kafka_bootstrap, models, dlq_payload="coordinates") as worker:
        prefix = worker.settings.topic_prefix
        async with (
            TopicReader(kafka_bootstrap, dlq_topic(prefix)) as dlq,
            raw_producer(kafka_bootstrap) as producer,
        ):
            sent = await producer.send_and_wait(
                requests_topic("text", prefix), request_bytes("private", "no-such-model", {"text": secret})
            )
            [copy] = await dlq.wait_for(1)
    headers = headers_of(copy)
    assert copy.value == b""
    assert secret.encode() not in b"".join(headers.values())
    assert headers["error_code"] == b"unknown_model"
    assert headers["source_topic"].decode() == sent.topic
    assert int(headers["source_partition"]) == sent.partition
    assert int(headers["source_offset"]) == sent.offset
    assert int(headers["dlq_body_omitted_bytes"]) > len(secret)


async def test_missing_own_topics_are_named_when_the_worker_may_not_create_them(
    kafka_bootstrap: str, models: dict[str, ServedModel]
) -> None:
    from worker.app import Worker
    from worker.settings import Settings

    prefix = f"nc{uuid.uuid4().hex[:10]}"
    await create_topics(kafka_bootstrap, [requests_topic("text", prefix)], 1)
    worker = Worker(
        Settings(bootstrap_servers=kafka_bootstrap, topic_prefix=prefix, create_topics=False), models
    )
    with pytest.raises(MissingTopics) as refused:
        await worker.start()
    await worker.stop()
    assert refused.value.missing == [results_topic("text", prefix), dlq_topic(prefix)]
    assert results_topic("text", prefix) in str(refused.value)
    assert results_topic("text", prefix) not in await topic_names(kafka_bootstrap)


async def test_own_topics_the_operator_creates_just_after_the_start_are_found(
    kafka_bootstrap: str, models: dict[str, ServedModel]
) -> None:
    """A topic reaches each broker's metadata a moment after its creation: a worker that may not create
    its topics looks for missing ones for MISSING_GRACE_S before it stops (on a 3-node cluster the check
    once met a broker that did not list the operator's new topic yet)."""
    from worker.app import Worker
    from worker.settings import Settings

    prefix = f"nc{uuid.uuid4().hex[:10]}"
    await create_topics(kafka_bootstrap, [requests_topic("text", prefix)], 1)
    worker = Worker(
        Settings(bootstrap_servers=kafka_bootstrap, topic_prefix=prefix, create_topics=False), models
    )
    starting = asyncio.create_task(worker.start())
    await asyncio.sleep(MISSING_GRACE_S / 5)  # the operator's delay under test, not a wait for the worker
    assert not starting.done(), "the worker stopped at once"
    await create_topics(
        kafka_bootstrap, [results_topic("text", prefix), dlq_topic(prefix), quarantine_topic(prefix)], 1
    )
    try:
        await starting
    finally:
        await worker.stop()
