"""Every knob of the worker: one typed field, one default, one line of description.

Read from environment variables prefixed ``WORKER_`` (``WORKER_MAX_BATCH_SIZE=16``), from
CLI flags of ``python -m worker run`` (``--max-batch-size 16``), or from arguments. The
README's settings table is generated from this class (``python -m worker settings``).
"""

from __future__ import annotations

import re
import ssl
from dataclasses import fields
from typing import TYPE_CHECKING, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.serving.media_limits import MediaLimits

if TYPE_CHECKING:  # FastStream loads aiokafka: only the commands that talk to Kafka pay for it
    from faststream.security import BaseSecurity

#: The media limits' defaults (worker/serving/media_limits.py), written there once.
_MEDIA = MediaLimits()


class Settings(BaseSettings):
    """Worker configuration, validated once at start-up and trusted inside."""

    model_config = SettingsConfigDict(env_prefix="WORKER_", extra="forbid", frozen=True)

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
    max_batch_size: int = Field(
        32,
        ge=1,
        description="Dispatch a batch once a model's bucket holds this many rows (a request is one row, "
        "a zero-shot request one per candidate label).",
    )
    max_wait_ms: float = Field(20.0, ge=0, description="...or once its oldest request has waited this long.")
    eager_when_idle: bool = Field(
        True,
        description="A model with a batch slot free (fewer than batches_in_flight running) does not wait for "
        "max_batch_size: it takes what is queued once that is what the arrival rate brings in max_wait_ms (at "
        "once at low load, when less than one request a max_wait_ms arrives), or max_wait_ms has passed; a steady "
        "stream then runs in batches that pay for a run's fixed cost. Under load the slots are busy and batches "
        "fill up.",
    )
    max_batch_tokens: int = Field(
        2048,
        ge=1,
        description="Token budget of one batch (rows x sequence bucket): long texts run in smaller batches, "
        "so one batch's run time and memory stay bounded. Rounded down to a batch bucket; at least 1 row.",
    )
    model_overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-model overrides as JSON: max_batch_size, max_wait_ms, max_batch_tokens, or any metadata key, "
        'e.g. {"bert": {"max_batch_size": 8, "sequence_lengths": [32, 64]}}.',
    )
    executor_threads: int = Field(
        0,
        ge=0,
        description="Threads of the one executor that runs preprocessing and ONNX Runtime (0: the most "
        "batches in flight of any model, plus one for preprocessing).",
    )
    batches_in_flight: int = Field(
        0,
        ge=0,
        description="Batches of one model that run at once, each on an executor thread (0: two on CPU, "
        "one on CUDA). More than one needs batch_shapes longest: a bucket's buffers take one batch at a time.",
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime intra-op threads of one batch's run (0: on CPU the cores shared out among "
        "the batches in flight, on CUDA one per core).",
    )
    batch_shapes: Literal["auto", "buckets", "longest"] = Field(
        "auto",
        description="Shapes batches run at: buckets (fixed shapes, padded rows and tokens), longest (exactly "
        "the batch's rows and its longest real token length), auto (buckets on CUDA, longest on CPU).",
    )
    intra_op_spinning: bool = Field(
        True,
        description="Let ONNX Runtime's intra-op threads spin between parallel sections (faster batches; "
        "off saves CPU on a shared or mostly idle machine).",
    )
    provider: str = Field(
        "auto", pattern="^(auto|cuda|cpu)$", description="auto (CUDA when it loads, else CPU) | cuda | cpu."
    )
    intake_concurrency: int = Field(
        4,
        ge=1,
        description="Requests prepared (parsed, decoded, preprocessed) at once, each on its own intake "
        "thread, apart from the inference threads: a slow one holds one thread, the others keep flowing. "
        "Fetching waits while every thread is busy.",
    )
    prepare_timeout_s: float = Field(
        10.0,
        gt=0,
        description="How long one request's preparation may take before it is answered payload_too_large "
        "(its thread stays taken until the work ends; the decoders' own limits bound that).",
    )
    max_in_flight: int = Field(
        1024, ge=1, description="Unanswered requests per worker before it pauses its partitions."
    )
    fetch_max_records: int = Field(256, ge=1, description="Most records taken from Kafka in one fetch.")
    fetch_timeout_ms: int = Field(
        1000,
        ge=1,
        description="How long the fetch loop waits for records before it looks again. It returns as soon as "
        "a record arrives, so a long wait costs no latency; a short one wakes an idle worker often.",
    )
    fetch_linger_ms: int = Field(
        15,
        ge=0,
        description="When records arrive steadily (the recent rate brings at least one more in this time), the "
        "fetch loop holding a round's first record waits this long for more before handing the round on: one "
        "round, one crash marker and one intake pass for several records instead of one each. At low load it "
        "never waits. 0: off.",
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
    drain_timeout_s: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM, how long to finish in-flight batches; the process exits within this "
        "plus about 5 s whatever the broker does, leaving what was not answered uncommitted.",
    )
    max_message_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest request message accepted (payload_too_large above)."
    )
    max_text_chars: int = Field(
        _MEDIA.max_text_chars, ge=1, description="Longest text accepted, in characters."
    )
    max_image_pixels: int = Field(
        _MEDIA.max_image_pixels,
        ge=1,
        description="Largest image accepted (width x height), checked before decoding.",
    )
    max_audio_seconds: float = Field(
        _MEDIA.max_audio_seconds, gt=0, description="Longest audio accepted, in seconds."
    )
    max_video_frames: int = Field(
        _MEDIA.max_video_frames, ge=1, description="Most video frames accepted in one request."
    )
    max_video_seconds: float = Field(
        _MEDIA.max_video_seconds, gt=0, description="Longest video file accepted, in seconds."
    )
    max_video_frames_decoded: int = Field(
        _MEDIA.max_video_frames_decoded,
        ge=1,
        description="Most frames one video file may hold (checked before decoding where the container says).",
    )
    max_video_pixels: int = Field(
        _MEDIA.max_video_pixels,
        ge=1,
        description="Largest video frame accepted (width x height), checked before decoding.",
    )
    max_jpeg_scans: int = Field(
        _MEDIA.max_jpeg_scans,
        ge=1,
        description="Most scans one JPEG may hold, counted in its bytes before decoding: each scan is a "
        "pass over the whole image (about 5.6 ms of CPU at 4096x4096; Pillow and libjpeg write about 10).",
    )
    decode_isolation: bool = Field(
        True,
        description="Decode image, audio and video files in decoder processes, each decode under "
        "decode_cpu_seconds and decode_memory_mib; a breach kills only that process. Off: in the "
        "worker's own executor, bounded by the media limits alone.",
    )
    decoder_processes: int = Field(
        2, ge=1, description="Decoder processes (decode_isolation); each holds about 110 MiB."
    )
    decode_cpu_seconds: float = Field(
        10.0,
        gt=0,
        description="CPU time one decode may use in a decoder process (RLIMIT_CPU); one that has not "
        "answered within three times this of wall time is stopped too. Over: payload_too_large. Decoding "
        "all 1,800 frames of a 1080p H.264 clip takes about 3.6 s.",
    )
    decode_memory_mib: int = Field(
        768,
        ge=64,
        description="Address space one decode may add to its decoder process's idle size (RLIMIT_AS). "
        "Over: payload_too_large or undecodable_input.",
    )
    max_in_flight_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024 * 1024,
        description="Bytes that unanswered requests may hold (raw bodies plus prepared arrays) before the "
        "worker pauses its partitions; memory stays under this plus one fetch (fetch_max_bytes).",
    )
    fetch_max_bytes: int = Field(
        2 * 1024 * 1024,
        ge=1024 * 1024,
        description="Most bytes one fetch from the broker may return (Kafka still returns one whole "
        "record batch that is larger).",
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
    create_topics: bool = Field(
        True,
        description="Create the worker's own request, results, DLQ and quarantine topics when missing. Off: check "
        "they exist at start and exit naming the missing ones. Never creates any other topic.",
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
    compression_type: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "none", description="Compression of replies and DLQ copies (requests of every codec are read)."
    )
    publish_retry_s: float = Field(
        60.0,
        gt=0,
        description="How long a reply is retried while the broker is away before its request is left "
        "for redelivery (and /readyz turns not ready).",
    )
    skip_bad_models: bool = Field(
        False, description="Skip model folders that fail to load (with a warning) instead of exiting."
    )
    log_level: str = Field("INFO", description="Python logging level.")
    tracing: bool = Field(
        False,
        description="OpenTelemetry spans per request and batch, exported as the OTEL_* variables say "
        "(needs the otel extra). Off: a request's traceparent is passed to its reply unchanged.",
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
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="HTTP port for /metrics (Prometheus), /healthz and /readyz; unset: off, 0: any free port. "
        "With --processes N, process i uses port + i.",
    )

    @model_validator(mode="after")
    def _reply_to_default(self) -> Settings:
        if not self.reply_to_pattern:
            # Secure by default: a client may name only the replies namespace of this worker's prefix,
            # never another application's topic (the worker would write there with its own rights).
            object.__setattr__(self, "reply_to_pattern", default_reply_to_pattern(self.topic_prefix))
        try:
            re.compile(self.reply_to_pattern)
        except re.error as exc:
            raise ValueError(f"reply_to_pattern is not a regular expression: {exc}") from exc
        return self

    def batching_for(self, model: str) -> tuple[int, float, int]:
        """(max batch size, max wait in seconds, max batch tokens) for one model, overrides applied."""
        override = self.model_overrides.get(model, {})
        size = int(override.get("max_batch_size", self.max_batch_size))
        wait_ms = float(override.get("max_wait_ms", self.max_wait_ms))
        tokens = int(override.get("max_batch_tokens", self.max_batch_tokens))
        return size, wait_ms / 1000, tokens

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

    def media_limits(self) -> MediaLimits:
        """The media limits these settings set (every field of ``MediaLimits`` is a setting of that name)."""
        return MediaLimits(**{f.name: getattr(self, f.name) for f in fields(MediaLimits)})

    def metadata_overrides(self) -> dict[str, dict[str, Any]]:
        """The per-model overrides that are metadata keys (everything but batching knobs)."""
        return {
            model: {k: v for k, v in override.items() if k not in BATCHING_KEYS}
            for model, override in self.model_overrides.items()
        }


def default_reply_to_pattern(prefix: str) -> str:
    """The reply_to topics allowed when the operator names none: ``<prefix>.replies.<anything>``."""
    return re.escape(prefix) + r"\.replies\..+"


#: Per-model override keys that tune the batcher rather than the model's metadata.
BATCHING_KEYS = frozenset({"max_batch_size", "max_wait_ms", "max_batch_tokens"})
