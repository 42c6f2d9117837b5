"""Apache Kafka from the cached jars: it starts, carries a message, leaves nothing behind, and its
settings are the ones docker-compose.yml runs."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

import worker.kafka.apache_nodes
from tests.test_embedded_broker import process_exists, round_trip
from worker.kafka.apache_broker import ApacheKafka
from worker.kafka.apache_config import KAFKA_VERSION, SHARED_SETTINGS, replication_settings
from worker.kafka.apache_nodes import random_cluster_id
from worker.kafka.broker_processes import BrokerStartError

ROOT = Path(__file__).resolve().parent.parent


def test_docker_compose_runs_the_fixture_s_kafka_with_its_settings() -> None:
    kafka = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["kafka"]
    assert kafka["image"] == f"apache/kafka:{KAFKA_VERSION}"
    env = {key: str(value) for key, value in kafka["environment"].items()}
    for name, value in {**SHARED_SETTINGS, **replication_settings(1)}.items():
        key = "KAFKA_" + name.upper().replace(".", "_")
        assert env.get(key) == value, f"docker-compose.yml {key}={env.get(key)!r}, the fixture has {value!r}"


def test_the_pom_fetches_the_version_the_module_runs() -> None:
    assert f"<kafka.version>{KAFKA_VERSION}</kafka.version>" in (ROOT / "kafka" / "pom.xml").read_text()


def test_a_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # kafka-storage format -t -X... reads "-X..." as an option: the broker did not start, one time in 64.
    drawn = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(int=1)])  # "-AAA...", then the next draw
    monkeypatch.setattr(worker.kafka.apache_nodes.uuid, "uuid4", lambda: next(drawn))
    assert random_cluster_id() == "AAAAAAAAAAAAAAAAAAAAAQ"  # 15 zero bytes and 0x01 in URL-safe base64


def test_missing_jars_are_reported_with_the_command_that_fetches_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAFKA_LIBS", str(tmp_path))
    with pytest.raises(BrokerStartError, match="make kafka"):
        ApacheKafka().start()


@pytest.mark.kafka
async def test_a_node_carries_a_message_and_its_process_and_files_are_gone_after_stop() -> None:
    async with ApacheKafka() as kafka:
        pid = kafka.pid(1)
        assert pid is not None
        data = kafka.directory
        assert data is not None and (data / "node-1" / "kafka.log").exists()
        assert await round_trip(kafka.bootstrap_servers, "hello", b"world") == b"world"
    assert not process_exists(pid)
    assert not data.exists()
    with pytest.raises(RuntimeError, match="not started"):
        _ = kafka.bootstrap_servers


@pytest.mark.kafka
def test_python_m_worker_broker_apache_prints_its_address_and_stops_on_sigterm() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "broker", "--apache"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("export KAFKA_BOOTSTRAP_SERVERS="):
                break
        assert lines and lines[-1].startswith("export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:"), lines
        assert f"Apache Kafka {KAFKA_VERSION}" in "".join(lines)
        process.terminate()
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
