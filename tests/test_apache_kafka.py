"""Faults only a real Apache Kafka produces: size limits it enforces, ACLs it checks, topics it lacks.

tansu enforces no record size limit and no ACLs, and answers no DescribeConfigs
(docs/kafka-notes.md), so tests/test_production_kafka.py injects those refusals at the worker's
publishing seam on every broker. Here nothing is injected: a one-node Apache Kafka 4 (auto-creation
off) refuses for real, and the secured node (SASL/PLAIN, StandardAuthorizer) decides by ACLs.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator, Mapping

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAuthorizationFailedError
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
)

from schemas.topics import dlq_topic, quarantine_topic, requests_topic, results_topic
from tests.conftest import SECURE_USERS
from tests.kafka_support import (
    TopicReader,
    body_of,
    headers_of,
    new_prefix,
    raw_producer,
    request_bytes,
    serving,
    tiny_models,
)
from worker.kafka.apache_broker import ApacheKafka
from worker.kafka.delivery import RECORD_OVERHEAD
from worker.kafka.topics import MissingTopics
from worker.serving.registry import ServedModel

pytestmark = pytest.mark.kafka

TEXT = {"text": "a request to a real Kafka"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ServedModel]:
    """The tiny text classifier and the tiny embedder (a reply of a few KiB: the size limit's victim)."""
    return tiny_models(tmp_path_factory.mktemp("models"), "bert", "bert-embed")


async def create_own_topics(
    kafka: ApacheKafka, prefix: str, configs: Mapping[str, Mapping[str, str]] | None = None
) -> list[str]:
    """The worker's text topics of `prefix`, created by the operator (admin), `configs` per topic."""
    names = [requests_topic("text", prefix), results_topic("text", prefix), dlq_topic(prefix)]
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers, **kafka.admin_client_config())
    await admin.start()
    try:
        topics = [NewTopic(name, 2, 1, topic_configs=dict((configs or {}).get(name, {}))) for name in names]
        # The quarantine's crash markers: one partition, compacted (worker/kafka/quarantine.py).
        topics.append(NewTopic(quarantine_topic(prefix), 1, 1, topic_configs={"cleanup.policy": "compact"}))
        response = await admin.create_topics(topics)
    finally:
        await admin.close()
    assert all(code == 0 for _, code, *_ in response.topic_errors), response
    return names


# --- size limits and DescribeConfigs ----------------------------------------------------------


async def test_the_broker_s_topic_limit_is_learned_and_a_result_over_it_is_a_typed_error(
    apache_kafka: ApacheKafka, models: dict[str, ServedModel]
) -> None:
    """The results and DLQ topics take 500 bytes of body beyond the room the worker keeps for headers
    (RECORD_OVERHEAD): DescribeConfigs reports the limit, an embedding reply (814 bytes) becomes
    payload_too_large, a classifier reply (206 bytes) is delivered, and the DLQ copy of a 20 kB
    request is cut to fit. tansu reports no limit: there the worker uses max_publish_bytes."""
    limit = RECORD_OVERHEAD + 500
    prefix = new_prefix()
    bootstrap = apache_kafka.bootstrap_servers
    small = {"max.message.bytes": str(limit)}
    await create_own_topics(
        apache_kafka, prefix, {results_topic("text", prefix): small, dlq_topic(prefix): small}
    )
    async with serving(bootstrap, models, prefix=prefix, create_topics=False) as worker:
        assert worker.delivery.limit_bytes == limit, "the worker did not learn the topics' max.message.bytes"
        async with (
            TopicReader(bootstrap, results_topic("text", prefix)) as answers,
            TopicReader(bootstrap, dlq_topic(prefix)) as dlq,
            raw_producer(bootstrap) as producer,
        ):
            topic = requests_topic("text", prefix)
            await producer.send_and_wait(topic, request_bytes("embedded", "bert-embed", TEXT))
            await producer.send_and_wait(topic, request_bytes("classified", "bert", TEXT))
            await producer.send_and_wait(topic, request_bytes("big", "no-such-model", {"text": "x" * 20_000}))
            by_id = {body_of(r)["id"]: body_of(r) for r in await answers.wait_for(3)}
            await worker.drain()
            copies = await dlq.settle()
    assert by_id["embedded"]["error"]["code"] == "payload_too_large", by_id["embedded"]
    assert "error" not in by_id["classified"], by_id["classified"]
    assert by_id["big"]["error"]["code"] == "unknown_model"
    [big_copy] = [c for c in copies if headers_of(c)["error_code"] == b"unknown_model"]
    assert 0 < len(big_copy.value or b"") <= 500
    assert (
        int(
            headers_of(big_copy).get(
                "dlq_truncated_from_bytes", headers_of(big_copy).get("dlq_body_omitted_bytes", b"0")
            )
        )
        > limit
    )


# --- ACLs ------------------------------------------------------------------------------------


def _admin(kafka: ApacheKafka) -> AdminClient:
    config = kafka.admin_client_config()
    return AdminClient(
        {
            "bootstrap.servers": kafka.bootstrap_servers,
            "security.protocol": config["security_protocol"],
            "sasl.mechanisms": config["sasl_mechanism"],
            "sasl.username": config["sasl_plain_username"],
            "sasl.password": config["sasl_plain_password"],
        }
    )


def allow(kafka: ApacheKafka, user: str, kind: ResourceType, name: str, *operations: AclOperation) -> None:
    """Grant `user` the `operations` on one resource (a literal name) and wait until the broker has them."""
    admin = _admin(kafka)  # held until the futures resolve: a collected client fails them
    bindings = [
        AclBinding(kind, name, ResourcePatternType.LITERAL, f"User:{user}", "*", op, AclPermissionType.ALLOW)
        for op in operations
    ]
    for future in admin.create_acls(bindings, request_timeout=10).values():
        future.result()
    # The controller has them; the broker applies them from the metadata log a moment later.
    query = AclBindingFilter(
        kind, name, ResourcePatternType.LITERAL, f"User:{user}", None, AclOperation.ANY, AclPermissionType.ANY
    )
    deadline = time.monotonic() + 10
    while len(admin.describe_acls(query, request_timeout=10).result()) < len(operations):
        assert time.monotonic() < deadline, f"the ACLs of {user} on {name} did not show up"
        time.sleep(0.05)


@pytest.fixture
def secured(secured_kafka: ApacheKafka) -> Iterator[tuple[ApacheKafka, str]]:
    """The secured broker and a fresh prefix whose text topics exist (made by the operator)."""
    prefix = new_prefix()
    asyncio.run(create_own_topics(secured_kafka, prefix))
    yield secured_kafka, prefix


def grant_worker(kafka: ApacheKafka, prefix: str) -> None:
    """The README's ACL table for the worker's principal, for the text topics of `prefix`; no Create."""
    allow(
        kafka,
        "worker",
        ResourceType.TOPIC,
        requests_topic("text", prefix),
        AclOperation.READ,
        AclOperation.DESCRIBE,
    )
    for written in (results_topic("text", prefix), dlq_topic(prefix)):
        allow(
            kafka,
            "worker",
            ResourceType.TOPIC,
            written,
            AclOperation.WRITE,
            AclOperation.DESCRIBE,
            AclOperation.DESCRIBE_CONFIGS,
        )
    allow(
        kafka,
        "worker",
        ResourceType.TOPIC,
        quarantine_topic(prefix),
        AclOperation.READ,
        AclOperation.WRITE,
        AclOperation.DESCRIBE,
        AclOperation.DESCRIBE_CONFIGS,
    )
    allow(kafka, "worker", ResourceType.GROUP, f"{prefix}.workers", AclOperation.READ)


def worker_login() -> dict[str, str]:
    """The worker's Settings for the secured broker."""
    return {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_username": "worker",
        "sasl_password": SECURE_USERS["worker"],
    }


async def test_a_reply_to_the_worker_may_not_write_is_refused_by_kafka_and_answered_on_results(
    secured: tuple[ApacheKafka, str], models: dict[str, ServedModel]
) -> None:
    """The worker may see the client's topic (Describe) but not write it: Kafka answers the produce
    with TOPIC_AUTHORIZATION_FAILED and the reply goes to the results topic, once."""
    kafka, prefix = secured
    forbidden = f"team-x.replies.{uuid.uuid4().hex[:8]}"
    admin = kafka.admin_client_config()
    await _create(kafka, forbidden)
    grant_worker(kafka, prefix)
    allow(kafka, "worker", ResourceType.TOPIC, forbidden, AclOperation.DESCRIBE)
    allow(kafka, "client", ResourceType.TOPIC, requests_topic("text", prefix), AclOperation.WRITE)
    allow(kafka, "client", ResourceType.TOPIC, forbidden, AclOperation.READ, AclOperation.WRITE)
    client = kafka.client_config("client")
    bootstrap = kafka.bootstrap_servers
    # The ACLs hold as set: the client itself may not write the worker's results topic.
    async with raw_producer(bootstrap, **client) as producer:
        with pytest.raises(TopicAuthorizationFailedError):
            await producer.send_and_wait(results_topic("text", prefix), b"{}")
    async with (
        serving(
            bootstrap,
            models,
            prefix=prefix,
            create_topics=False,
            reply_to_pattern=r"team-x\.replies\..+",  # allowed by the worker's policy: only Kafka refuses it
            **worker_login(),
        ) as worker,
        # Read as admin: settle() writes a marker, which the client may not.
        TopicReader(bootstrap, results_topic("text", prefix), client=admin) as answers,
        TopicReader(bootstrap, forbidden, client=admin) as elsewhere,
        raw_producer(bootstrap, **client) as producer,
    ):
        await producer.send_and_wait(
            requests_topic("text", prefix),
            request_bytes("denied", "bert", TEXT),
            headers=[("reply_to", forbidden.encode())],
        )
        [reply] = await answers.wait_for(1)
        await worker.drain()
        assert await answers.settle() == [reply]
        assert await elsewhere.settle() == []
    assert "error" not in body_of(reply), body_of(reply)
    assert headers_of(reply)["reply_to_refused"] == b"refused_by_broker"
    assert worker.metrics.reply_to_refused.labels("refused_by_broker")._value.get() == 1


async def _create(kafka: ApacheKafka, *names: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers, **kafka.admin_client_config())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 1, 1) for name in names])
    finally:
        await admin.close()


async def test_a_worker_without_create_rights_and_its_topics_missing_stops_naming_them(
    secured_kafka: ApacheKafka, models: dict[str, ServedModel]
) -> None:
    """The operator forgot the topics and gave no Create right; create_topics is on (the default).
    Kafka refuses the CreateTopics (TOPIC_AUTHORIZATION_FAILED): the worker stops at start with the
    missing names, instead of retrying as if Kafka were away (it did so forever before)."""
    prefix = new_prefix()
    grant_worker(secured_kafka, prefix)
    async with asyncio.timeout(30):
        with pytest.raises(MissingTopics) as refused:
            async with serving(secured_kafka.bootstrap_servers, models, prefix=prefix, **worker_login()):
                pass
    assert requests_topic("text", prefix) in refused.value.missing
    assert "refused to create" in str(refused.value) and "TopicAuthorizationFailed" in str(refused.value)
