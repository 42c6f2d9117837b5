"""Intake: a fetched record -> a prepared Job, or an error answer. Pure: no broker, no event loop.

Parsing, validation, decoding and preprocessing run in the executor (``prepare_all``); reading
the record's coordinates and headers (``origin``) runs on the event loop and is cheap.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition

from schemas import ErrorCode, ErrorDetail, Modality, parse_request
from schemas.topics import results_topic
from worker.decoding import MediaLimits, decode_inputs
from worker.envelopes import Origin, Outgoing, rejection
from worker.errors import DeadlineExceeded, InferenceError, InvalidRequest, UnknownModel
from worker.fetching import Undecodable
from worker.metrics import WorkerMetrics
from worker.processors import Prepared
from worker.quarantine import crash_if_marked
from worker.registry import ServedModel
from worker.routing import ReplyPolicy
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

    @property
    def prepared_bytes(self) -> int:
        """Bytes the prepared arrays hold (counted against max_in_flight_bytes)."""
        return sum(int(getattr(array, "nbytes", 0)) for array in self.prepared.arrays.values())


def now_ms() -> int:
    """Wall-clock milliseconds, the unit of Kafka timestamps and request deadlines."""
    return int(time.time() * 1000)


def _header(record: ConsumerRecord[Any, Any], name: str) -> str | None:
    for key, value in record.headers or ():
        if key == name and value is not None:
            return bytes(value).decode("utf-8", "replace")
    return None


class Intake:
    """Turns records of the worker's request topics into Jobs or error answers."""

    def __init__(
        self,
        settings: Settings,
        models: Mapping[str, ServedModel],
        modality_of: Mapping[str, Modality],
        policy: ReplyPolicy,
        metrics: WorkerMetrics,
    ) -> None:
        self.settings = settings
        self.models = models
        self.modality_of = modality_of
        self.policy = policy
        self.metrics = metrics
        self.limits = MediaLimits(
            max_image_pixels=settings.max_image_pixels,
            max_audio_seconds=settings.max_audio_seconds,
            max_video_frames=settings.max_video_frames,
            max_text_chars=settings.max_text_chars,
            max_video_seconds=settings.max_video_seconds,
            max_video_frames_decoded=settings.max_video_frames_decoded,
            max_video_pixels=settings.max_video_pixels,
        )

    def origin(self, record: ConsumerRecord[Any, Any]) -> Origin:
        """The record's coordinates and where its answer goes (the reply_to policy applied)."""
        s = self.settings
        modality = self.modality_of[record.topic]
        default = results_topic(modality, s.topic_prefix)
        key = record.key.decode("utf-8", "replace") if isinstance(record.key, bytes) else None
        origin = Origin(
            modality=modality,
            tp=TopicPartition(record.topic, record.partition),
            offset=record.offset,
            reply_topic=default,
            correlation_id=key or f"{record.topic}:{record.partition}:{record.offset}",
            raw=record.value or b"",
            timestamp_ms=record.timestamp if record.timestamp and record.timestamp > 0 else now_ms(),
        )
        correlation_id = _header(record, "correlation_id")
        if correlation_id is not None and len(correlation_id.encode()) > s.max_header_bytes:
            origin.rejected = f"the correlation_id header is longer than {s.max_header_bytes} bytes"
        elif correlation_id is not None:
            origin.correlation_id = correlation_id
        reply_to = _header(record, "reply_to")
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

    def prepare_all(self, origins: list[Origin]) -> list[Job | Outgoing]:
        """Executor side: parse, validate, decode and preprocess each message of a fetch."""
        return [self.prepare(origin) for origin in origins]

    def prepare(self, origin: Origin) -> Job | Outgoing:
        """One message -> a Job for its model's batcher, or the typed error answer."""
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
            prepared = model.prepare(decode_inputs(request, self.limits))
            return Job(origin, request.id, model, prepared, request.parameters, request.deadline_ms)
        except InferenceError as exc:  # schemas' RequestRejected included: one hierarchy, one code each
            rejected_id = exc.request_id or request_id
            rejected_model = exc.model or model_name
            return rejection(origin, rejected_id, rejected_model, exc.code, exc.message)
        except Exception:
            log.exception("internal error preparing %s offset %d", origin.tp, origin.offset)
            return rejection(origin, request_id, model_name, ErrorCode.INTERNAL, "internal error")
