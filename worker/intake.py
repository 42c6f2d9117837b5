"""Intake: a fetched record -> a prepared Job, or an error answer. No broker inside.

Reading the record's coordinates and headers (``origin``) runs on the event loop and is cheap.
Parsing, validation, decoding and preprocessing (``prepare``) run in the intake's own threads,
one request each, at most ``intake_concurrency`` at once (``take_in``, worker/intake_threads.py):
each outcome is handed on as soon as it is ready and each request has its own time limit
(``prepare_timeout_s``), so a slow request delays neither the others of its fetch nor those of
other modalities, nor a model's batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition

from schemas import ErrorCode, ErrorDetail, Modality, parse_request
from schemas.errors import InferenceError
from schemas.topics import results_topic
from worker.errors import DeadlineExceeded, InvalidRequest, UnknownModel
from worker.intake_threads import IntakeThreads
from worker.kafka.decode_failures import Undecodable
from worker.kafka.failpoint import crash_if_marked
from worker.kafka.messages import Origin, Outgoing, rejection
from worker.kafka.routing import ReplyPolicy
from worker.kafka.tracing import Tracing
from worker.metrics import WorkerMetrics
from worker.serving.decoding import InProcess, MediaDecoder, bound_pillow, decode_inputs
from worker.serving.inputs import Prepared
from worker.serving.registry import ServedModel
from worker.serving.sandbox import Budget, DecoderPool
from worker.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Job:
    """A parsed, prepared request waiting for (or inside) a batch."""

    origin: Origin
    request_id: str
    model: ServedModel
    prepared: Prepared
    parameters: Mapping[str, Any]
    deadline_ms: int | None
    #: when it was ready for its batcher (time.time_ns(): the start of its queue-wait span)
    queued_ns: int = 0

    @property
    def rows(self) -> int:
        """Rows the request adds to a batch: one, or one per candidate label of a zero-shot request."""
        return max((int(array.shape[0]) for array in self.prepared.arrays.values() if array.ndim), default=1)

    @property
    def prepared_bytes(self) -> int:
        """Bytes the prepared arrays hold (counted against max_in_flight_bytes)."""
        return sum(int(getattr(array, "nbytes", 0)) for array in self.prepared.arrays.values())


def now_ms() -> int:
    """Wall-clock milliseconds, the unit of Kafka timestamps and request deadlines."""
    return int(time.time() * 1000)


def _headers(record: ConsumerRecord[Any, Any]) -> dict[str, str]:
    """A record's headers as text (the last value wins for a repeated name)."""
    return {
        key: bytes(value).decode("utf-8", "replace")
        for key, value in record.headers or ()
        if value is not None
    }


class Intake:
    """Turns records of the worker's request topics into Jobs or error answers."""

    def __init__(
        self,
        settings: Settings,
        models: Mapping[str, ServedModel],
        modality_of: Mapping[str, Modality],
        policy: ReplyPolicy,
        metrics: WorkerMetrics,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.tracing = tracing or Tracing()
        self.models = models
        self.modality_of = modality_of
        self.policy = policy
        self.metrics = metrics
        self.limits = settings.media_limits()
        # Its own threads: a slow preparation never holds an inference thread, nor a batch an intake one.
        self.executor = ThreadPoolExecutor(settings.intake_concurrency, thread_name_prefix="intake")
        # ``prepare`` looked up on each call: the tests' fault injection replaces it on the instance.
        self.threads = IntakeThreads(
            self.executor,
            settings.intake_concurrency,
            settings.prepare_timeout_s,
            lambda origin: self.prepare(origin),
            self._overdue,
        )
        bound_pillow(self.limits)
        budget = Budget(settings.decode_cpu_seconds, settings.decode_memory_mib)
        self.decoder: MediaDecoder = (
            DecoderPool(self.limits, settings.decoder_processes, budget)
            if settings.decode_isolation
            else InProcess(self.limits)
        )

    def origin(self, record: ConsumerRecord[Any, Any]) -> Origin:
        """The record's coordinates and where its answer goes (the reply_to policy applied)."""
        s = self.settings
        modality = self.modality_of[record.topic]
        default = results_topic(modality, s.topic_prefix)
        key = record.key.decode("utf-8", "replace") if isinstance(record.key, bytes) and record.key else None
        origin = Origin(
            modality=modality,
            tp=TopicPartition(record.topic, record.partition),
            offset=record.offset,
            reply_topic=default,
            correlation_id=f"{record.topic}:{record.partition}:{record.offset}",
            raw=record.value or b"",
            timestamp_ms=record.timestamp if record.timestamp and record.timestamp > 0 else now_ms(),
        )
        headers = _headers(record)
        origin.trace = self.tracing.request(
            headers,
            received_ns=time.time_ns(),
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": record.topic,
                "messaging.destination.partition.id": str(record.partition),
                "messaging.kafka.offset": record.offset,
            },
        )
        # The correlation_id header, or else the record key, is echoed into the reply's headers: both
        # are the client's bytes, so both are held to max_header_bytes (a longer one is not echoed).
        for source, value in (("correlation_id header", headers.get("correlation_id")), ("record key", key)):
            if value is None:
                continue
            if len(value.encode()) <= s.max_header_bytes:
                origin.correlation_id = value
                break
            origin.rejected = origin.rejected or f"the {source} is longer than {s.max_header_bytes} bytes"
        reply_to = headers.get("reply_to")
        if reply_to is not None:
            refusal = self.policy.refusal(reply_to, modality)
            if refusal is None:
                origin.reply_topic = reply_to
            else:
                log.info("reply_to %r refused (%s); answering on %s", reply_to[:300], refusal.value, default)
                self.metrics.reply_to_refused.labels(refusal.value).inc()
                origin.refused = (reply_to[:249], refusal)
        return origin

    def undecodable(self, bad: Undecodable) -> Outgoing:
        """A record the client could not decode: no reply (nobody to address), a DLQ record naming it."""
        self.metrics.undecodable_records.inc()
        modality = self.modality_of[bad.tp.topic]
        origin = Origin(
            modality=modality,
            tp=bad.tp,
            offset=bad.offset,
            reply_topic=results_topic(modality, self.settings.topic_prefix),
            correlation_id=f"{bad.tp.topic}:{bad.tp.partition}:{bad.offset}",
            raw=b"",
            timestamp_ms=now_ms(),
        )
        message = f"the Kafka client cannot decode this record: {bad.error}"
        detail = ErrorDetail(code=ErrorCode.UNDECODABLE_INPUT, message=message)
        return Outgoing(origin, None, None, None, detail)

    async def take_in(
        self,
        origins: list[Origin],
        ready: Callable[[Job | Outgoing], None],
        failed: Callable[[Origin, BaseException], None],
    ) -> asyncio.Future[None]:
        """Queue each record, in fetch order, for the intake threads (``IntakeThreads.take_in``)."""
        return await self.threads.take_in(origins, ready, failed)

    @property
    def pending(self) -> int:
        """Records taken in and not yet handed on (being prepared, or waiting for a thread)."""
        return self.threads.pending

    def close(self) -> None:
        """Stop the intake's threads (what still runs ends on its own) and the decoder processes."""
        self.executor.shutdown(wait=False, cancel_futures=True)
        if isinstance(self.decoder, DecoderPool):
            self.decoder.close()

    def _overdue(self, origin: Origin) -> Outgoing:
        limit = self.settings.prepare_timeout_s
        log.warning("%s offset %d: preparing took longer than %g s", origin.tp, origin.offset, limit)
        message = f"preparing the request took longer than {limit:g} s (prepare_timeout_s)"
        return rejection(origin, None, None, ErrorCode.PAYLOAD_TOO_LARGE, message)

    def prepare(self, origin: Origin) -> Job | Outgoing:
        """One message -> a Job for its model's batcher, or the typed error answer."""
        started_ns = time.time_ns()
        outcome = self._prepare(origin)
        self.tracing.stage(origin.trace, "preprocess", started_ns)
        if isinstance(outcome, Job):
            outcome.queued_ns = time.time_ns()
        return outcome

    def _prepare(self, origin: Origin) -> Job | Outgoing:
        modality = origin.modality
        request_id: str | None = None
        model_name: str | None = None
        crash_if_marked(origin.raw)
        try:
            request = parse_request(origin.raw, modality, max_bytes=self.settings.max_message_bytes)
            request_id, model_name = request.id, request.model
            if origin.rejected is not None:
                raise InvalidRequest(origin.rejected)
            model = self.models.get(request.model)
            if model is None or model.metadata.modality != modality:
                raise UnknownModel(f"model {request.model!r} is not served on the {modality.value} topic")
            if request.deadline_ms is not None and request.deadline_ms <= now_ms():
                raise DeadlineExceeded("the request's deadline passed before it was read")
            prepared = model.prepare(decode_inputs(request, self.limits, self.decoder))
            return Job(origin, request.id, model, prepared, request.parameters, request.deadline_ms)
        except InferenceError as exc:  # schemas' RequestRejected included: one hierarchy, one code each
            rejected_id = exc.request_id or request_id
            rejected_model = exc.model or model_name
            return rejection(origin, rejected_id, rejected_model, exc.code, exc.message)
        except Exception:
            log.exception("internal error preparing %s offset %d", origin.tp, origin.offset)
            return rejection(origin, request_id, model_name, ErrorCode.INTERNAL, "internal error")
