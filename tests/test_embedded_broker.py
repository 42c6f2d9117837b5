"""The embedded tansu broker starts, carries a message, and leaves no process behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from tests.kafka_support import replica_counts
from worker.kafka.broker_processes import BrokerStartError
from worker.kafka.embedded_broker import EmbeddedBroker
from worker.kafka.topics import create_topics, delete_topics

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parent.parent


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def round_trip(bootstrap_servers: str, topic: str, value: bytes) -> bytes | None:
    await create_topics(bootstrap_servers, [topic])
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, acks="all", enable_idempotence=False)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=b"k")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap_servers, auto_offset_reset="earliest")
    await consumer.start()
    try:
        record = await consumer.getone()
    finally:
        await consumer.stop()
    value_read: bytes | None = record.value
    return value_read


async def test_broker_carries_a_message_and_its_process_is_gone_after_stop() -> None:
    with EmbeddedBroker() as broker:
        pid = broker.pid
        assert pid is not None and broker.running
        assert await round_trip(broker.bootstrap_servers, "hello", b"world") == b"world"
    assert not broker.running
    assert not process_exists(pid)
    with pytest.raises(RuntimeError, match="not started"):
        _ = broker.bootstrap_servers


async def test_async_start_and_stop() -> None:
    async with EmbeddedBroker() as broker:
        pid = broker.pid
        assert pid is not None
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
        await admin.start()
        try:
            assert await admin.list_topics() == []
        finally:
            await admin.close()
    assert not process_exists(pid)


async def test_a_busy_port_is_refused_up_front() -> None:
    async with EmbeddedBroker() as first:
        with pytest.raises(BrokerStartError, match="cannot listen"):
            await EmbeddedBroker(port=first.port).astart()
        assert first.running


def test_stop_is_idempotent_and_removes_only_its_own_log(tmp_path: Path) -> None:
    broker = EmbeddedBroker()
    broker.start()
    temporary = broker.log_path
    assert temporary is not None and "tansu broker" in broker.log_tail()
    broker.stop()
    broker.stop()
    assert not temporary.exists()
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as kept:
        pass
    assert "tansu broker" in kept.log_tail()


async def test_create_topics_is_idempotent(kafka_bootstrap: str) -> None:
    name = f"topics-{uuid.uuid4().hex}"
    assert await create_topics(kafka_bootstrap, [name, name], partitions=2) == [name]
    assert await create_topics(kafka_bootstrap, [name], partitions=2) == []
    await delete_topics(kafka_bootstrap, [name])
    await delete_topics(kafka_bootstrap, [name])  # already gone: fine


async def test_topics_created_on_a_single_broker_have_one_replica(kafka_bootstrap: str) -> None:
    """As many replicas as brokers, up to three: one here (tests/test_kafka_cluster.py has three)."""
    name = f"topics-{uuid.uuid4().hex}"
    assert await create_topics(kafka_bootstrap, [name], partitions=2) == [name]
    assert await replica_counts(kafka_bootstrap, [name]) == {name: {1}}
    await delete_topics(kafka_bootstrap, [name])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_forever_prints_the_address_and_stops_on_a_signal(signum: int) -> None:
    code = "from worker.kafka.embedded_broker import serve_forever; serve_forever(None)"
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT
    ) as process:
        assert process.stdout is not None
        lines = [process.stdout.readline(), process.stdout.readline()]
        address = lines[1].strip().removeprefix("export KAFKA_BOOTSTRAP_SERVERS=")
        host, port = address.rsplit(":", 1)
        assert host == "127.0.0.1" and port.isdigit()
        process.send_signal(signum)
        assert process.wait(timeout=15) == 0
    with socket.socket() as probe:
        assert probe.connect_ex((host, int(port))) != 0  # nobody listens any more


def test_a_broker_that_exits_at_start_is_reported() -> None:
    broker = EmbeddedBroker(binary="/bin/false")
    with pytest.raises(BrokerStartError, match="exited with code 1"):
        broker.start()
    assert not broker.running
