"""The Kafka path's settings: fetching and backpressure, undecodable and poison records, replies and DLQ copies."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class FetchingAndDelivery(BaseModel):
    """How records are fetched and held in flight, and how answers are published."""

    max_in_flight: int = Field(
        1024, ge=1, description="Unanswered requests per worker before it pauses its partitions."
    )
    max_in_flight_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024 * 1024,
        description="Bytes that unanswered requests may hold (raw bodies plus prepared arrays) before the "
        "worker pauses its partitions; memory stays under this plus one fetch (fetch_max_bytes).",
    )
    fetch_max_records: int = Field(256, ge=1, description="Most records taken from Kafka in one fetch.")
    fetch_max_bytes: int = Field(
        2 * 1024 * 1024,
        ge=1024 * 1024,
        description="Most bytes one fetch from the broker may return (Kafka still returns one whole "
        "record batch that is larger).",
    )
    fetch_timeout_ms: int = Field(
        1000,
        ge=1,
        description="How long the fetch loop waits for records before it looks again. It returns as soon as "
        "a record arrives, so a long wait costs no latency; a short one wakes an idle worker often.",
    )
    fetch_linger_ms: int = Field(
        0,
        ge=0,
        description="When records arrive steadily (the recent rate brings at least one more in this time), the "
        "fetch loop holding a round's first record waits this long for more before handing the round on: one "
        "round, one crash marker and one intake pass for several records instead of one each. At low load it "
        "never waits. 0 (default): off. 15 with max_wait_ms 20 took MiniLM's CPU per request at half load from "
        "1.49 to 1.37 x flooded, but its p99 there from 36 to 64 ms and the paced capacity from 0.9 to 0.75 "
        "of the flood rate (bench/RESULTS.md).",
    )
    fetch_max_wait_ms: int = Field(
        20,
        ge=1,
        description="How long the broker may hold a fetch that has no records yet, while records flow. Kafka "
        "answers as soon as records arrive; some brokers (the embedded one) only when this expires, so it "
        "adds to latency there.",
    )
    idle_fetch_max_wait_ms: int = Field(
        1000,
        ge=1,
        description="The longest fetch wait: it doubles from fetch_max_wait_ms after each fetch_timeout_ms that "
        "found no record, up to this, and drops back on the next record; an idle worker then sends the broker "
        "1000/this fetches a second. On the embedded broker the first request after an idle spell waits up to "
        "the wait reached (20-160 ms within 4 s of idle, this after 6 s); on Kafka it costs nothing.",
    )
    max_decode_attempts: int = Field(
        3,
        ge=1,
        description="Times a batch the Kafka client cannot decode is fetched again before the worker reads "
        "it record by record and skips each record that fails with a DLQ record.",
    )
    max_crash_attempts: int = Field(
        3,
        ge=1,
        description="Worker crashes (OOM kill, native crash, abort) a request may cause across the group "
        "before it is skipped with a poison_suspected error reply and DLQ record.",
    )
    reply_to_pattern: str = Field(
        "",
        description="Regular expression (full match) a reply_to topic must match. Empty (the default): "
        r"only '<prefix>\.replies\..+', the topics of worker.client. Open more per team, e.g. "
        r"'(team-a|team-b)\.replies\..+' (and grant the worker Write on them). Request topics, the DLQ, "
        "other modalities' results and __internal topics are refused whatever it says; so is a topic "
        "that does not exist.",
    )
    max_header_bytes: int = Field(
        256,
        ge=16,
        description="Longest correlation_id echoed into a reply, from the correlation_id header or, "
        "without one, the record key; a longer one is an invalid_request error and is not echoed.",
    )
    dlq_payload: Literal["body", "coordinates"] = Field(
        "body",
        description="What a DLQ record holds: body (the request as received) or coordinates (source "
        "topic, partition, offset and the error only; for bodies with personal data).",
    )
    max_publish_bytes: int = Field(
        1_048_588,
        ge=64 * 1024,
        description="Largest record the broker takes, used when it does not report max.message.bytes "
        "for the results and DLQ topics (Apache Kafka's default).",
    )
    delivery: Literal["at-least-once", "exactly-once"] = Field(
        "at-least-once",
        description="at-least-once: replies published, then offsets committed (a crash or rebalance may "
        "repeat replies). exactly-once: replies, DLQ records and offsets in one Kafka transaction per run "
        "of answered offsets, so read_committed readers see each reply once; needs a broker with "
        "transactions (Apache Kafka; the embedded broker refuses them).",
    )
    transaction_timeout_ms: int = Field(
        60_000,
        ge=1000,
        description="exactly-once: the broker aborts a transaction open longer than this and fences its "
        "producer (the worker then opens another and reads the partition again from its committed offset). "
        "Also the longest a transaction left open by a dead worker holds read_committed readers back, unless "
        "the partition's next owner ends it first. At most the broker's transaction.max.timeout.ms.",
    )
    compression_type: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "none", description="Compression of replies and DLQ copies (requests of every codec are read)."
    )
    publish_retry_s: float = Field(
        60.0,
        gt=0,
        description="How long a reply is retried while the broker is away before its request is left "
        "for redelivery (and /readyz turns not ready).",
    )
