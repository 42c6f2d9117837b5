"""Settings: env vars, CLI flags, per-model overrides, Kafka security pass-through."""

from __future__ import annotations

import pytest
from faststream.security import SASLPlaintext, SASLScram256

from worker.cli import build_parser, settings_from
from worker.settings import Settings


def test_flags_beat_env_vars_which_beat_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka:9092")
    assert Settings().max_batch_size == 16
    assert Settings().bootstrap_servers == "kafka:9092"
    args = build_parser().parse_args(
        ["run", "models", "--max-batch-size", "8", "--model-overrides", '{"bert": {"max_wait_ms": 2}}']
    )
    settings = settings_from(args)
    assert settings.max_batch_size == 8
    assert settings.batching_for("bert") == (8, 0.002, settings.max_batch_tokens)
    assert settings.batching_for("other") == (8, settings.max_wait_ms / 1000, settings.max_batch_tokens)


def test_per_model_overrides_split_into_batching_and_metadata() -> None:
    settings = Settings(
        model_overrides={"bert": {"max_batch_size": 4, "max_batch_tokens": 64, "sequence_lengths": [32]}}
    )
    assert settings.batching_for("bert") == (4, settings.max_wait_ms / 1000, 64)
    assert settings.metadata_overrides() == {"bert": {"sequence_lengths": [32]}}


def test_invalid_settings_exit_with_a_readable_message() -> None:
    args = build_parser().parse_args(["run", "models", "--max-batch-size", "zero"])
    with pytest.raises(SystemExit, match="max_batch_size"):
        settings_from(args)


def test_plaintext_needs_no_security_object() -> None:
    assert Settings().kafka_security() is None
    assert Settings().kafka_client_kwargs() == {}


def test_sasl_settings_become_faststream_and_aiokafka_security() -> None:
    settings = Settings(security_protocol="SASL_PLAINTEXT", sasl_username="svc", sasl_password="s3cret")
    security = settings.kafka_security()
    assert isinstance(security, SASLPlaintext)
    kwargs = settings.kafka_client_kwargs()
    assert kwargs["security_protocol"] == "SASL_PLAINTEXT"
    assert kwargs["sasl_plain_username"] == "svc"
    assert "s3cret" not in repr(settings), "secrets never appear in logs or reprs"
    scram = Settings(
        security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-256", sasl_username="u", sasl_password="p"
    )
    assert isinstance(scram.kafka_security(), SASLScram256)
    assert scram.kafka_client_kwargs()["security_protocol"] == "SASL_SSL"


def test_sasl_without_credentials_is_refused() -> None:
    with pytest.raises(ValueError, match="sasl_username"):
        Settings(security_protocol="SASL_PLAINTEXT").kafka_security()
