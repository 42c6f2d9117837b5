"""Publishing answers: reply + DLQ copy, each acknowledged, re-routed, shrunk or retried within a bound.

Every failure has one bounded way out, so no reply can loop:
- the reply_to topic is missing or refused by the broker -> the modality's results topic, with a
  ``reply_to_refused`` header;
- a result larger than the broker takes -> a ``payload_too_large`` error reply;
- a DLQ copy larger than the broker takes -> a truncated copy, then a headers-only copy (both
  still name the source topic, partition and offset);
- a refusal that no retry can fix (authorization, ...) -> logged, counted, and for a reply a DLQ
  record that says the reply could not be delivered;
- a retriable failure (broker away, leader moving) -> retried with backoff for ``retry_s`` (each
  attempt bounded by what is left of it); after that ``GiveUp``: the caller leaves the offset
  uncommitted and has it redelivered (worker/kafka/publish_retries.py);
- an unknown topic while the cluster cannot be asked for its topics (aiokafka's producer raises
  UnknownTopicOrPartitionError after its metadata wait during an outage) -> retriable, as above;
  only a cluster that answers can refuse a topic.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordTooLargeError

from schemas import ErrorCode, ErrorDetail, ErrorReply
from schemas.topics import dlq_topic, results_topic
from worker.kafka.messages import Outgoing
from worker.kafka.publish_retries import _TOPIC_REFUSED, GiveUp, PublishRetries
from worker.kafka.routing import Refusal, TopicDirectory
from worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)

_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)
#: Room left in a record for its headers, key and framing under the broker's size limit.
RECORD_OVERHEAD = 16 * 1024

#: publish(value, topic, key, headers, correlation_id) -> awaitable of the broker's acknowledgement
Publish = Callable[[bytes, str, bytes | None, dict[str, str], str], Awaitable[Any]]


@dataclass
class _Record:
    """One record on its way to one topic; ``kind`` is reply or dlq (metrics, logs)."""

    kind: Literal["reply", "dlq"]
    topic: str
    value: bytes
    headers: dict[str, str]


class Delivery(PublishRetries):
    """Publishes ``Outgoing`` answers under the broker's size limit, with bounded retries."""

    def __init__(
        self,
        publish: Publish,
        directory: TopicDirectory,
        metrics: WorkerMetrics,
        *,
        prefix: str,
        limit_bytes: int,
        dlq_payload: Literal["body", "coordinates"] = "body",
        retry_s: float = 60.0,
    ) -> None:
        self.publish_record = publish
        self.directory = directory
        self.metrics = metrics
        self.prefix = prefix
        self.limit_bytes = limit_bytes
        self.dlq_payload = dlq_payload
        self.retry_s = retry_s
        #: each attempt bounded by what is left of retry_s; off inside a transaction, which is bounded as a
        #: whole: an attempt abandoned there could still be sent, into the next transaction of its producer
        self.bound_attempts = True
        #: monotonic time since which publishing has failed without a success (None: it works)
        self.failing_since: float | None = None
        #: calls of ``_retrying`` whose last attempt failed
        self._failing = 0
        #: monotonic time of the last acknowledged publish (None: none yet)
        self._last_ok: float | None = None
        self.stopping = False
        #: records handed to the producer and not yet acknowledged (or failed)
        self.sending = 0

    async def deliver(self, out: Outgoing) -> None:
        """Publish the reply and its DLQ copy; return once both are acknowledged or definitively placed."""
        undelivered: str | None = None
        if out.body is not None:
            out, undelivered = await self._reply(out)
        if out.error is not None or undelivered is not None:
            await self._dlq(out, undelivered)

    # --- the reply -------------------------------------------------------------------------

    async def _reply(self, out: Outgoing) -> tuple[Outgoing, str | None]:
        """Send the reply; returns what was finally sent and, if it could not be, why."""
        origin = out.origin
        default = results_topic(origin.modality, self.prefix)
        if origin.reply_topic != default:
            exists = await self._retrying("reply", lambda: self.directory.exists(origin.reply_topic))
            if not exists:
                log.info("reply_to %r does not exist; answering on %s", origin.reply_topic, default)
                self._reroute(out, Refusal.MISSING)
        assert out.body is not None
        if len(out.body) > self.limit_bytes - RECORD_OVERHEAD and out.error is None:
            out = self._too_large(out)
        while True:
            assert out.body is not None
            record = _Record("reply", origin.reply_topic, out.body, self._reply_headers(out))
            try:
                await self._retrying("reply", functools.partial(self._send, out, record))
                return out, None
            except _TOPIC_REFUSED as exc:
                if origin.reply_topic == default:
                    return out, self._undeliverable("reply", record, exc)
                log.warning("reply_to %r refused by the broker (%r)", origin.reply_topic, exc)
                self._reroute(out, Refusal.REFUSED_BY_BROKER)
            except _TOO_LARGE as exc:
                if out.error is not None:
                    return out, self._undeliverable("reply", record, exc)
                out = self._too_large(out)
            except GiveUp:
                raise
            except KafkaError as exc:
                return out, self._undeliverable("reply", record, exc)

    def _reroute(self, out: Outgoing, why: Refusal) -> None:
        origin = out.origin
        default = results_topic(origin.modality, self.prefix)
        origin.refused = (origin.reply_topic, why)
        origin.reply_topic = default
        self.metrics.reply_to_refused.labels(why.value).inc()

    def _too_large(self, out: Outgoing) -> Outgoing:
        origin = out.origin
        log.warning("the result for %s offset %d is too large to publish", origin.tp, origin.offset)
        detail = ErrorDetail(
            code=ErrorCode.PAYLOAD_TOO_LARGE,
            message=f"the result is larger than the broker takes ({self.limit_bytes} bytes)",
        )
        body = ErrorReply(id=out.request_id, model=out.model, error=detail).model_dump_json().encode()
        return Outgoing(origin, out.request_id, out.model, body, detail)

    @staticmethod
    def _reply_headers(out: Outgoing) -> dict[str, str]:
        headers = {"content-type": "application/json", **out.origin.trace.headers()}
        if out.origin.refused is not None:
            topic, why = out.origin.refused
            headers["reply_to_refused"] = why.value
            headers["reply_to_requested"] = topic
        return headers

    # --- the DLQ copy ----------------------------------------------------------------------

    async def _dlq(self, out: Outgoing, undelivered: str | None) -> None:
        """The DLQ record: whole body, truncated, or headers only, whichever the broker takes."""
        origin = out.origin
        headers = {
            "source_topic": origin.tp.topic,
            "source_partition": str(origin.tp.partition),
            "source_offset": str(origin.offset),
            **origin.trace.headers(),
        }
        if out.error is not None:
            headers["error_code"] = out.error.code.value
            headers["error_message"] = out.error.message[:1000]
        if undelivered is not None:
            headers["reply_undelivered"] = undelivered[:1000]
        room = self.limit_bytes - RECORD_OVERHEAD
        forms: list[bytes] = []
        if self.dlq_payload == "body" and origin.raw:
            if len(origin.raw) <= room:
                forms.append(origin.raw)
            forms.append(origin.raw[: room // 2])  # the head: enough to find the request's id and model
        forms.append(b"")
        for value in forms:
            form_headers = dict(headers)
            if value and len(value) < len(origin.raw):
                form_headers["dlq_truncated_from_bytes"] = str(len(origin.raw))
            elif not value and origin.raw:
                form_headers["dlq_body_omitted_bytes"] = str(len(origin.raw))
            record = _Record("dlq", dlq_topic(self.prefix), value, form_headers)
            try:
                await self._retrying("dlq", functools.partial(self._send, out, record))
            except _TOO_LARGE as exc:
                log.warning("the DLQ refused a %d-byte copy (%r); sending less", len(value), exc)
                self.metrics.dlq_degraded.labels("smaller").inc()
                continue
            except GiveUp:
                raise
            except KafkaError as exc:
                self._undeliverable("dlq", record, exc)
                return
            if value is not origin.raw and origin.raw and self.dlq_payload == "body":
                self.metrics.dlq_degraded.labels("truncated" if value else "headers_only").inc()
            return

    # --- sending ---------------------------------------------------------------------------

    async def _send(self, out: Outgoing, record: _Record) -> None:
        key = (out.request_id or "").encode() or None
        self.sending += 1
        try:
            ack = await self.publish_record(
                record.value, record.topic, key, record.headers, out.origin.correlation_id
            )
            await ack
        finally:
            self.sending -= 1

    def _undeliverable(self, kind: str, record: _Record, exc: BaseException) -> str:
        reason = type(exc).__name__
        log.error("a %s to %r cannot be published and will not be retried: %r", kind, record.topic, exc)
        self.metrics.publish_failures.labels(kind, reason).inc()
        return f"{reason} publishing to {record.topic}"
