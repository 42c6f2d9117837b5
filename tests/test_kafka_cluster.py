"""A three-node Apache Kafka cluster loses a broker under a flood of requests and loses no request.

Replication 3 and min.insync.replicas 2 on every topic (the operator's topics, created before the
workers start), two workers in one group, requests at a steady rate. Faults: kill -9 of the node
leading request partition 0; kill -9 of the group coordinator's node; a rolling restart (SIGTERM,
start again, wait for every replica to be back in sync) of all three; and, with the workers in
exactly-once delivery, kill -9 of the node coordinating request partition 0's transactions. Each
scenario must answer every request (exactly-once: once, as a read_committed reader sees the replies),
commit the group's offsets to the end of every partition, and print the longest wait for an answer
(the time to recover). tansu runs one node only: this is Apache Kafka alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError
from aiokafka.protocol.metadata import MetadataRequest

from schemas.topics import dlq_topic, quarantine_topic, requests_topic, results_topic
from tests.kafka_support import (
    TopicReader,
    body_of,
    new_prefix,
    replica_counts,
    request_bytes,
    serving,
    tiny_models,
)
from worker.kafka.apache_broker import ApacheKafka
from worker.kafka.partition_producers import transactional_id
from worker.kafka.topics import create_topics
from worker.serving.registry import ServedModel

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(300)]

#: The issue asks for 2,000 at 100/s; 1,200 at 100/s (12 s, the fault at 4 s) keeps the three
#: scenarios within about three minutes on a 2-core machine running three JVMs and two workers.
REQUESTS = 1_200
RATE = 100.0
PARTITIONS = 4
#: DescribeConfigs' config source of a setting made on the topic itself (DYNAMIC_TOPIC_CONFIG).
TOPIC_CONFIG = 1
TEXT = {"text": "a request through a failing cluster"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[ApacheKafka]:
    """Three KRaft nodes (each broker and controller), replication 3, min.insync.replicas 2."""
    with ApacheKafka(3, heap_mb=384) as kafka:
        yield kafka


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ServedModel]:
    """The tiny text classifier: the faults are in the cluster."""
    return tiny_models(tmp_path_factory.mktemp("models"), "bert")


@dataclass
class Flood:
    """Requests sent at RATE, each one retried by the client until Kafka acknowledges it."""

    bootstrap: str
    topic: str
    sent_at: dict[str, float] = field(default_factory=dict)
    resends: int = 0

    async def run(self, count: int) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True, request_timeout_ms=10_000
        )
        await producer.start()
        try:
            start = time.monotonic()
            for i in range(count):
                await asyncio.sleep(max(0.0, start + i / RATE - time.monotonic()))
                request_id = f"c{i}"
                self.sent_at[request_id] = time.time()
                while True:
                    try:
                        await producer.send_and_wait(self.topic, request_bytes(request_id, "bert", TEXT))
                        break
                    except KafkaError:
                        self.resends += 1  # a client's own retry: the same id, at-least-once
                        await asyncio.sleep(0.2)
        finally:
            await producer.stop()


async def in_sync(kafka: ApacheKafka, topics: list[str]) -> bool:
    """True when every partition of `topics` has all three replicas in sync."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    except KafkaError:
        return False
    finally:
        await admin.close()
    return all(len(partition["isr"]) == 3 for topic in described for partition in topic["partitions"])


async def wait_in_sync(kafka: ApacheKafka, topics: list[str], timeout: float = 60) -> None:  # noqa: ASYNC109
    """Wait until every replica of `topics` (and of the offsets topic) is back in sync."""
    async with asyncio.timeout(timeout):
        while not await in_sync(kafka, [*topics, "__consumer_offsets"]):  # noqa: ASYNC110 (broker state: no event to wait on)
            await asyncio.sleep(0.2)


async def known_everywhere(kafka: ApacheKafka, topics: list[str]) -> None:
    """Wait until every node's metadata lists `topics`: CreateTopics returns once the controller has
    them, and each broker learns them from the metadata log a moment later. Each node is asked by its
    id: an admin client sends a metadata request to a random node, whatever address it started from
    (aiokafka 0.14 ``AIOKafkaAdminClient._send_request``), so asking one per node checked none for sure."""
    client = AIOKafkaClient(bootstrap_servers=kafka.bootstrap_servers)
    await client.bootstrap()
    try:
        async with asyncio.timeout(10):
            for node in kafka.node_ids:
                while True:
                    response = await client.send(
                        node, MetadataRequest(topics, allow_auto_topic_creation=False)
                    )
                    listed = {t["topic"] for t in response.to_object()["topics"] if t["error_code"] == 0}
                    if set(topics) <= listed:
                        break
                    await asyncio.sleep(0.05)
    finally:
        await client.close()


async def leader_of(kafka: ApacheKafka, topic: str, partition: int) -> int:
    """The node id leading one partition."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    leader: int = next(p["leader"] for p in described["partitions"] if p["partition"] == partition)
    return leader


async def coordinator_of(kafka: ApacheKafka, key: str, kind: int = 0) -> int:
    """The node id coordinating a consumer group (``kind`` 0) or a transactional id (1)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        return await admin.find_coordinator(key, kind)
    finally:
        await admin.close()


async def group_is_at_the_end(bootstrap: str, group: str, topic: str) -> bool:
    """True when the group's committed offset of every partition equals the partition's end."""
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await reader.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        ends = await reader.end_offsets(partitions)
        committed = {tp: await reader.committed(tp) for tp in partitions}
        return committed == ends
    finally:
        await reader.stop()


@contextlib.asynccontextmanager
async def two_workers(
    kafka: ApacheKafka, models: dict[str, ServedModel], prefix: str, delivery: str
) -> AsyncIterator[None]:
    """Two workers in one group on the cluster's replicated topics; drained and stopped after."""
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(2):
            await stack.enter_async_context(
                serving(
                    kafka.bootstrap_servers, models, prefix=prefix, create_topics=False, delivery=delivery
                )
            )
        yield


Fault = Callable[[ApacheKafka, str], Awaitable[str]]


async def survive(
    kafka: ApacheKafka, models: dict[str, ServedModel], fault: Fault, delivery: str = "at-least-once"
) -> None:
    """Flood two workers, apply `fault` a third of the way in, check every request answered (exactly-once:
    once, as a read_committed reader sees the replies) and the offsets committed to the end, and print the
    figures."""
    prefix = new_prefix()
    topics = [requests_topic("text", prefix), results_topic("text", prefix), dlq_topic(prefix)]
    await create_topics(kafka.bootstrap_servers, topics, PARTITIONS, replication_factor=3)
    # The quarantine's crash markers, one partition (worker/kafka/quarantine.py), created by the operator too.
    await create_topics(kafka.bootstrap_servers, [quarantine_topic(prefix)], 1, replication_factor=3)
    await known_everywhere(kafka, [*topics, quarantine_topic(prefix)])
    group = f"{prefix}.workers"
    flood = Flood(kafka.bootstrap_servers, topics[0])
    client = {"isolation_level": "read_committed"} if delivery == "exactly-once" else None
    async with (
        two_workers(kafka, models, prefix, delivery),
        TopicReader(kafka.bootstrap_servers, topics[1], client=client) as answers,
    ):
        sending = asyncio.create_task(flood.run(REQUESTS))
        await asyncio.sleep(REQUESTS / RATE / 3)
        fault_at = time.time()
        what = await fault(kafka, group)
        await sending
        await answers.wait_until(
            lambda records: len({body_of(r)["id"] for r in records}) >= REQUESTS, timeout=180
        )
        records = list(answers.records)
    # Both workers drain and commit on leaving the block.
    answered = {body_of(r)["id"] for r in records}
    assert answered == set(flood.sent_at), f"unanswered: {sorted(set(flood.sent_at) - answered)[:10]}"
    assert all("error" not in body_of(r) for r in records), next(
        body_of(r) for r in records if "error" in body_of(r)
    )
    if delivery == "exactly-once":
        assert len(records) == len(answered), f"{len(records) - len(answered)} requests answered twice"
    latency = {}
    for record in records:
        request_id = body_of(record)["id"]
        latency.setdefault(request_id, record.timestamp / 1000 - flood.sent_at[request_id])
    after = [latency[i] for i, at in flood.sent_at.items() if at >= fault_at - 1]
    print(
        f"\n{what}: {REQUESTS} requests at {RATE:.0f}/s, all answered, {len(records) - len(answered)} "
        f"duplicate answers, {flood.resends} client resends; latency p50 "
        f"{statistics.median(latency.values()) * 1000:.0f} ms, longest wait from the fault on "
        f"{max(after):.1f} s"
    )
    async with asyncio.timeout(30):
        while not await group_is_at_the_end(kafka.bootstrap_servers, group, topics[0]):  # noqa: ASYNC110 (broker state: no event to wait on)
            await asyncio.sleep(0.5)
    await wait_in_sync(kafka, topics)


async def kill_the_request_leader(kafka: ApacheKafka, group: str) -> str:
    """kill -9 the node leading request partition 0; start it again 5 s later."""
    topic = requests_topic("text", group.removesuffix(".workers"))
    node = await leader_of(kafka, topic, 0)
    kafka.kill(node)
    await asyncio.sleep(5)
    await kafka.restart_node(node)
    return f"kill -9 of node {node} (leader of {topic}-0), restarted after 5 s"


async def kill_the_coordinator(kafka: ApacheKafka, group: str) -> str:
    """kill -9 the node coordinating the workers' group; start it again 5 s later."""
    node = await coordinator_of(kafka, group)
    kafka.kill(node)
    await asyncio.sleep(5)
    await kafka.restart_node(node)
    return f"kill -9 of node {node} (the group's coordinator), restarted after 5 s"


async def kill_a_transaction_coordinator(kafka: ApacheKafka, group: str) -> str:
    """kill -9 the node coordinating the transactions of request partition 0; start it again 5 s later."""
    topic = requests_topic("text", group.removesuffix(".workers"))
    transactional = transactional_id(group, TopicPartition(topic, 0))
    node = await coordinator_of(kafka, transactional, kind=1)
    kafka.kill(node)
    await asyncio.sleep(5)
    await kafka.restart_node(node)
    return f"kill -9 of node {node} (the transaction coordinator of {transactional}), restarted after 5 s"


async def rolling_restart(kafka: ApacheKafka, group: str) -> str:
    """Stop (SIGTERM) and start each node in turn, the next once every replica is in sync again."""
    prefix = group.removesuffix(".workers")
    topics = [requests_topic("text", prefix), results_topic("text", prefix), dlq_topic(prefix)]
    started = time.monotonic()
    for node in kafka.node_ids:
        await kafka.stop_node(node)
        await kafka.restart_node(node)
        await wait_in_sync(kafka, topics)
    return f"rolling restart of nodes {kafka.node_ids} ({time.monotonic() - started:.0f} s)"


@pytest.mark.parametrize(
    "fault", [kill_the_request_leader, kill_the_coordinator, rolling_restart], ids=lambda f: f.__name__
)
async def test_a_cluster_fault_loses_no_request(
    cluster: ApacheKafka, models: dict[str, ServedModel], fault: Fault, tmp_path: Path
) -> None:
    await survive(cluster, models, fault)


async def test_exactly_once_through_a_transaction_coordinator_killed_mid_stream(
    cluster: ApacheKafka, models: dict[str, ServedModel], tmp_path: Path
) -> None:
    await survive(cluster, models, kill_a_transaction_coordinator, delivery="exactly-once")


@pytest.mark.parametrize(("replication_factor", "replicas"), [(None, 3), (2, 2)])
async def test_the_topics_a_worker_creates_are_replicated(
    cluster: ApacheKafka, models: dict[str, ServedModel], replication_factor: int | None, replicas: int
) -> None:
    """Left to create its own topics, the worker gives each as many replicas as the cluster has brokers
    (up to three), or ``replication_factor``: a broker lost loses none of them (it used to create one)."""
    prefix = new_prefix()
    own = [
        requests_topic("text", prefix),
        results_topic("text", prefix),
        dlq_topic(prefix),
        quarantine_topic(prefix),
    ]
    async with serving(
        cluster.bootstrap_servers, models, prefix=prefix, replication_factor=replication_factor
    ):
        # A topic reaches each node's metadata a moment after its creation: the node asked may lag (CI).
        await known_everywhere(cluster, own)
        admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap_servers)
        await admin.start()
        try:
            created = [t for t in await admin.list_topics() if t.startswith(f"{prefix}.")]
        finally:
            await admin.close()
    assert set(own) <= set(created), created
    assert await replica_counts(cluster.bootstrap_servers, created) == {
        topic: {replicas} for topic in created
    }
    # Three replicas: each topic itself asks two in sync for an acknowledged write. Two: the cluster's own
    # setting (2 here as well, from the brokers' configuration), not one the worker set on the topic.
    assert await in_sync_settings(cluster.bootstrap_servers, created) == {
        topic: ("2", replicas == 3) for topic in created
    }


async def in_sync_settings(bootstrap_servers: str, topics: list[str]) -> dict[str, tuple[str, bool]]:
    """Each topic's ``min.insync.replicas`` and whether the topic itself sets it (DescribeConfigs v1+:
    config source 1, a topic's own setting) rather than inheriting the brokers'."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        [response] = await admin.describe_configs(
            [
                ConfigResource(ConfigResourceType.TOPIC, topic, {"min.insync.replicas": None})
                for topic in topics
            ]
        )
    finally:
        await admin.close()
    assert response.API_VERSION >= 1, "config sources need DescribeConfigs v1"
    found = {}
    for error_code, message, _type, name, entries, *_ in response.resources:
        assert error_code == 0, message
        [(_, value, _read_only, source, *_)] = entries
        found[name] = (value, source == TOPIC_CONFIG)
    return found
