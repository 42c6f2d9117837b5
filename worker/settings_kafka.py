"""The Kafka connection settings: brokers, topics, the consumer group and its timeouts, TLS and SASL."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from pydantic import AliasChoices, BaseModel, Field, SecretStr

if TYPE_CHECKING:  # FastStream loads aiokafka: only the commands that talk to Kafka pay for it
    from faststream.security import BaseSecurity


class KafkaConnection(BaseModel):
    """Where the brokers are, the topics and group the worker uses, and how it authenticates."""

    bootstrap_servers: str | None = Field(
        None,
        validation_alias=AliasChoices(
            "bootstrap_servers", "WORKER_BOOTSTRAP_SERVERS", "KAFKA_BOOTSTRAP_SERVERS"
        ),
        description="Kafka bootstrap servers (host:port,...); also read from KAFKA_BOOTSTRAP_SERVERS. "
        "Unset: `demo` starts the embedded broker, `run` refuses to start.",
    )
    topic_prefix: str = Field(
        "inference",
        description="Topics are <prefix>.<modality>.requests/results, <prefix>.dlq and <prefix>.quarantine "
        "(the workers' crash markers).",
    )
    group_id: str = Field(
        "inference-workers", description="Consumer group; workers with the same id share partitions."
    )
    partitions: int = Field(
        4, ge=1, description="Partitions per topic when the worker creates missing topics."
    )
    replication_factor: int | None = Field(
        None,
        ge=1,
        description="Replicas of each topic the worker creates. Unset: as many as the cluster has brokers, "
        "up to 3 (one on a single broker). More than the brokers alive: creation waits for them. With 3 or "
        "more, each topic it creates also sets min.insync.replicas 2, so an acknowledged reply, DLQ record or "
        "marker survives the loss of any one broker (with 2, the broker's default: 2 in sync would stop "
        "writes while one is down).",
    )
    create_topics: bool = Field(
        True,
        description="Create the worker's own request, results, DLQ and quarantine topics when missing. Off: check "
        "they exist at start (a missing one is looked for 5 s) and exit naming the missing ones. Never "
        "creates any other topic.",
    )
    session_timeout_ms: int = Field(
        10_000,
        ge=1000,
        description="Kafka consumer session timeout; a dead worker's partitions move after this.",
    )
    heartbeat_interval_ms: int = Field(1_000, ge=100, description="Kafka consumer heartbeat interval.")
    max_poll_interval_ms: int = Field(
        300_000,
        ge=1000,
        description="A member that has not polled for this long leaves the group (Kafka's rule); a worker "
        "whose partitions are paused by backpressure keeps polling them, so only a stuck worker leaves.",
    )
    security_protocol: str = Field(
        "PLAINTEXT",
        pattern="^(PLAINTEXT|SSL|SASL_PLAINTEXT|SASL_SSL)$",
        description="Kafka security protocol: PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL.",
    )
    sasl_mechanism: str = Field(
        "PLAIN",
        pattern="^(PLAIN|SCRAM-SHA-256|SCRAM-SHA-512)$",
        description="SASL mechanism when SASL is on.",
    )
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(None, description="SASL password (never logged).")
    ssl_cafile: str | None = Field(None, description="CA bundle to verify the brokers (SSL / SASL_SSL).")
    ssl_certfile: str | None = Field(None, description="Client certificate for mutual TLS.")
    ssl_keyfile: str | None = Field(None, description="Private key of the client certificate.")

    def kafka_security(self) -> BaseSecurity | None:
        """The FastStream security object for these settings (None: plaintext)."""
        from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

        context = None
        if self.security_protocol in ("SSL", "SASL_SSL"):
            context = ssl.create_default_context(cafile=self.ssl_cafile)
            if self.ssl_certfile:
                context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
        if not self.security_protocol.startswith("SASL"):
            return BaseSecurity(ssl_context=context) if context else None
        if not self.sasl_username or self.sasl_password is None:
            raise ValueError(
                f"security_protocol {self.security_protocol} needs sasl_username and sasl_password"
            )
        kind = {"PLAIN": SASLPlaintext, "SCRAM-SHA-256": SASLScram256, "SCRAM-SHA-512": SASLScram512}
        return kind[self.sasl_mechanism](
            self.sasl_username,
            self.sasl_password.get_secret_value(),
            ssl_context=context,
            use_ssl=context is not None,
        )

    def kafka_client_kwargs(self) -> dict[str, Any]:
        """The same security as keyword arguments of plain aiokafka clients (admin, producer)."""
        from faststream.kafka.security import parse_security

        return parse_security(self.kafka_security())
