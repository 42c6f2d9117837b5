"""The Kafka worker: subscribers per modality, batchers per model, replies, commits, lifecycle.

Life of a message: the batch subscriber hands over raw records; each is tracked by
partition/offset, parsed (schemas/), decoded and prepared in the executor, and queued in
its model's micro-batcher. A model loop takes ready batches, runs them in the executor,
and publishes one reply per request (acks=all). Only then is the message marked done,
and offsets are committed past contiguous runs of done messages (worker/offsets.py).
Rejected messages get an error reply and a DLQ copy through the same path.

Lifecycle: ``start()`` -> serve -> ``drain()`` (stop fetching, flush batchers, publish,
commit) -> ``stop()`` (leave the group). ``serve()`` wires SIGTERM/SIGINT to that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import (
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from faststream.message import StreamMessage

from schemas import (
    ErrorCode,
    ErrorDetail,
    ErrorReply,
    Modality,
    RequestRejected,
    Result,
    Timing,
    parse_request,
)
from worker.batching import BatcherClosed, BatchQueue, MicroBatcher
from worker.decoding import MediaLimits, decode_inputs
from worker.errors import DeadlineExceeded, InferenceError, UnknownModel
from worker.metadata import Bucket
from worker.metrics import HealthServer, WorkerMetrics
from worker.offsets import OffsetTracker
from worker.processors import Prepared
from worker.registry import ServedModel
from worker.settings import Settings
from worker.topics import create_topics, dlq_topic, requests_topic, results_topic

log = logging.getLogger(__name__)

#: Reply topics a client may name in ``reply_to``: Kafka's legal topic characters only.
_TOPIC_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass
class Origin:
    """Where a message came from and where its answer goes."""

    modality: Modality
    tp: TopicPartition
    offset: int
    reply_topic: str
    correlation_id: str
    raw: bytes
    timestamp_ms: int


@dataclass
class Job:
    """A parsed, prepared request waiting for (or inside) a batch."""

    origin: Origin
    request_id: str
    model: ServedModel
    prepared: Prepared
    parameters: Mapping[str, Any]
    deadline_ms: int | None


@dataclass
class Outgoing:
    """One reply to publish, plus a DLQ copy when the request was rejected."""

    origin: Origin
    request_id: str | None
    model: str | None
    body: bytes
    error: ErrorDetail | None = None


@dataclass
class _State:
    """Mutable run state, kept in one place."""

    paused: bool = False
    draining: bool = False
    stopping: bool = False
    handlers_running: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


def _now_ms() -> int:
    return int(time.time() * 1000)


async def _raw_records(records: tuple[ConsumerRecord[Any, Any], ...]) -> StreamMessage[Any]:
    """Hand the records over untouched.

    FastStream's own parser decodes headers as UTF-8 and JSON bodies before the handler
    runs; a record that fails there is logged and never answered (silent loss, measured
    in docs/kafka-notes.md). Here schemas/ judges every byte and answers every record.
    """
    return StreamMessage(raw_message=records, body=b"")


async def _no_decoding(message: StreamMessage[Any]) -> None:
    """The handler reads ``raw_message``; there is no body to decode."""
    return None


#: Failures that mean "this topic will not take it", as opposed to "the broker is not there now".
_TOPIC_REFUSED = (UnknownTopicOrPartitionError, InvalidTopicError, TopicAuthorizationFailedError)
_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)


def _legal_topic(name: str) -> bool:
    """Kafka's own rule for topic names: 1-249 of [a-zA-Z0-9._-], and not '.' or '..'."""
    return 0 < len(name) <= 249 and name not in (".", "..") and set(name) <= _TOPIC_CHARS


def _header(record: ConsumerRecord[Any, Any], name: str) -> str | None:
    for key, value in record.headers or ():
        if key == name and value is not None:
            return bytes(value).decode("utf-8", "replace")
    return None


class Worker:
    """One worker process: a consumer per modality topic, a batcher and loop per model."""

    def __init__(self, settings: Settings, models: Mapping[str, ServedModel]) -> None:
        if not settings.bootstrap_servers:
            raise ValueError("no Kafka bootstrap servers configured (WORKER_BOOTSTRAP_SERVERS)")
        self.settings = settings
        self.models = dict(models)
        self.modalities = sorted({m.metadata.modality for m in self.models.values()})
        self.limits = MediaLimits(
            max_image_pixels=settings.max_image_pixels,
            max_audio_seconds=settings.max_audio_seconds,
            max_video_frames=settings.max_video_frames,
            max_text_chars=settings.max_text_chars,
        )
        self.tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self.executor = ThreadPoolExecutor(settings.executor_threads, thread_name_prefix="inference")
        max_request_size = max(settings.max_message_bytes * 2, 1024 * 1024)
        self._dlq_limit = max_request_size - 64 * 1024  # room for headers and record framing
        self.broker = KafkaBroker(
            settings.bootstrap_servers,
            acks="all",
            enable_idempotence=False,  # the embedded broker refuses idempotent producers
            max_batch_size=1024 * 1024,
            max_request_size=max_request_size,
            graceful_timeout=settings.drain_timeout_s,
            security=settings.kafka_security(),
            logger=logging.getLogger("worker.kafka"),
            log_level=logging.DEBUG,  # per-batch "Received/Processed" lines only in debug
        )
        self.consumer: AIOKafkaConsumer | None = None
        self.batchers: dict[str, MicroBatcher[Bucket, Job]] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._observer: asyncio.Task[None] | None = None
        self._state = _State()
        self._commit_lock = asyncio.Lock()
        self._progress = asyncio.Event()
        self.metrics = WorkerMetrics()
        self.health = (
            HealthServer(self.metrics, lambda: self.ready, settings.metrics_port)
            if settings.metrics_port is not None
            else None
        )
        self._subscribe()

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (retrying until Kafka answers), start the batchers' loops, join the group."""
        s = self.settings
        if self.health is not None:
            self.health.start()  # /healthz answers while Kafka is still being waited for
        self._observer = asyncio.create_task(self._observe(), name="observe")
        await self._connect()
        for name, model in self.models.items():
            size, wait, tokens = s.batching_for(name)
            queue: BatchQueue[Bucket, Job] = BatchQueue(
                size,
                wait,
                size_of=functools.partial(model.metadata.batch_limit, max_rows=size, max_tokens=tokens),
                rank_of=model.merge_rank,
            )
            batcher = MicroBatcher(queue)
            self.batchers[name] = batcher
            self._loops.append(asyncio.create_task(self._model_loop(model, batcher), name=f"model:{name}"))
        self.consumer = self._subscriber.consumer
        log.info(
            "worker started: models %s on %s, group %s",
            ", ".join(sorted(self.models)),
            ", ".join(requests_topic(m, s.topic_prefix) for m in self.modalities),
            s.group_id,
        )

    async def _observe(self) -> None:
        """Once a second: prove the loop is alive and refresh the gauges."""
        while True:
            self.metrics.tick()
            self.metrics.in_flight.set(self.tracker.in_flight)
            consumer = self.consumer
            if consumer is not None:
                self.metrics.paused_partitions.set(len(consumer.paused()))
                for tp in consumer.assignment():
                    high = consumer.highwater(tp)
                    if high is not None:
                        with contextlib.suppress(KafkaError, AssertionError):
                            lag = max(0, high - await consumer.position(tp))
                            self.metrics.lag.labels(tp.topic, str(tp.partition)).set(lag)
            await asyncio.sleep(1.0)

    async def _connect(self) -> None:
        """Create the topics and start the broker client; a missing broker is waited for, not fatal."""
        s = self.settings
        assert s.bootstrap_servers
        topics = [requests_topic(m, s.topic_prefix) for m in self.modalities]
        topics += [results_topic(m, s.topic_prefix) for m in self.modalities]
        delay = 0.5
        while True:
            try:
                await create_topics(
                    s.bootstrap_servers,
                    [*topics, dlq_topic(s.topic_prefix)],
                    s.partitions,
                    client_kwargs=s.kafka_client_kwargs(),
                )
                await self.broker.start()
                return
            except (KafkaError, OSError) as exc:
                log.warning(
                    "Kafka at %s is not reachable (%s); retrying in %.1f s", s.bootstrap_servers, exc, delay
                )
                await self.broker.stop()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def drain(self) -> None:
        """Stop fetching, finish and publish everything in flight, commit. Bounded by drain_timeout_s."""
        self._state.draining = True
        if self.consumer is not None:
            self.consumer.pause(*self.consumer.assignment())
        try:
            await asyncio.wait_for(self._drain_in_flight(), self.settings.drain_timeout_s)
        except TimeoutError:
            log.warning("drain timed out with %d requests unanswered", self.tracker.in_flight)
        await self._commit()

    async def _drain_in_flight(self) -> None:
        await self._wait_until(lambda: self._state.handlers_running == 0)
        for batcher in self.batchers.values():
            batcher.close()
        await asyncio.gather(*self._loops, return_exceptions=True)
        while self._state.tasks:
            await asyncio.gather(*list(self._state.tasks), return_exceptions=True)

    async def stop(self) -> None:
        """Leave the group and close the broker connection; cancels what drain left behind."""
        self._state.stopping = True
        tasks = [*self._loops, *self._state.tasks, *([self._observer] if self._observer else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.broker.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.health is not None:
            self.health.stop()
        log.info("worker stopped")

    async def serve(self, stop: asyncio.Event | None = None) -> None:
        """Run until SIGTERM/SIGINT (or ``stop`` is set), then drain and stop."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        starting = asyncio.ensure_future(self.start())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            # Asked to stop while still waiting for Kafka: nothing was fetched, nothing to drain.
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            await self.stop()
            return
        starting.result()
        try:
            await stopped
            log.info("shutdown requested: draining")
            await self.drain()
        finally:
            await self.stop()

    @property
    def ready(self) -> bool:
        """Models loaded and at least one partition assigned."""
        return self.consumer is not None and bool(self.consumer.assignment())

    # --- intake ------------------------------------------------------------------------

    def _subscribe(self) -> None:
        """One consumer for every modality topic: one group member per worker, one rebalance per join."""
        s = self.settings
        self._modality_of = {requests_topic(m, s.topic_prefix): m for m in self.modalities}
        self._subscriber = self.broker.subscriber(
            *self._modality_of,
            group_id=s.group_id,
            batch=True,
            max_records=s.fetch_max_records,
            batch_timeout_ms=s.fetch_timeout_ms,
            fetch_max_wait_ms=s.fetch_max_wait_ms,
            ack_policy=AckPolicy.MANUAL,  # never msg.ack(): it commits past unanswered messages
            no_reply=True,  # replies are published by the worker, exactly one per request
            auto_offset_reset="earliest",
            listener=_Rebalance(self),
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            max_partition_fetch_bytes=max(s.max_message_bytes, 1024 * 1024),
            parser=_raw_records,
            decoder=_no_decoding,
        )

        async def on_batch(msg: KafkaMessage) -> None:
            await self._on_records(msg.raw_message)

        self._subscriber(on_batch)

    async def _on_records(self, records: Iterable[ConsumerRecord[Any, Any]]) -> None:
        """Track, parse and prepare one fetched batch; errors are answered at once."""
        records = records if isinstance(records, tuple) else (records,)
        self._state.handlers_running += 1
        try:
            origins = [self._origin(r) for r in records]
            for origin in origins:
                self.tracker.track(origin.tp, origin.offset)
            loop = asyncio.get_running_loop()
            outcomes = await loop.run_in_executor(self.executor, self._prepare_all, origins)
            rejected: list[Outgoing] = []
            for outcome in outcomes:
                if isinstance(outcome, Outgoing):
                    rejected.append(outcome)
                else:
                    self.batchers[outcome.model.name].put(outcome.prepared.shape_key, outcome)
            if rejected:
                await self._publish(rejected)
            self._apply_backpressure()
        finally:
            self._state.handlers_running -= 1
            self._progress.set()

    def _origin(self, record: ConsumerRecord[Any, Any]) -> Origin:
        modality = self._modality_of[record.topic]
        reply_to = _header(record, "reply_to")
        if reply_to is None or not _legal_topic(reply_to):
            reply_to = results_topic(modality, self.settings.topic_prefix)
        key = record.key.decode("utf-8", "replace") if isinstance(record.key, bytes) else None
        return Origin(
            modality=modality,
            tp=TopicPartition(record.topic, record.partition),
            offset=record.offset,
            reply_topic=reply_to,
            correlation_id=_header(record, "correlation_id") or key or f"{record.topic}:{record.offset}",
            raw=record.value or b"",
            timestamp_ms=record.timestamp if record.timestamp and record.timestamp > 0 else _now_ms(),
        )

    def _prepare_all(self, origins: list[Origin]) -> list[Job | Outgoing]:
        """Executor side: parse, validate, decode and preprocess each message of a fetch."""
        return [self._prepare(origin) for origin in origins]

    def _prepare(self, origin: Origin) -> Job | Outgoing:
        modality = origin.modality
        request_id: str | None = None
        model_name: str | None = None
        try:
            request = parse_request(origin.raw, modality, max_bytes=self.settings.max_message_bytes)
            request_id, model_name = request.id, request.model
            model = self.models.get(request.model)
            if model is None or model.metadata.modality != modality:
                raise UnknownModel(f"model {request.model!r} is not served on the {modality.value} topic")
            if request.deadline_ms is not None and request.deadline_ms <= _now_ms():
                raise DeadlineExceeded("the request's deadline passed before it was read")
            prepared = model.prepare(decode_inputs(request, self.limits))
            return Job(origin, request.id, model, prepared, request.parameters, request.deadline_ms)
        except RequestRejected as exc:
            return self._error(origin, exc.request_id, exc.model, exc.code, exc.message)
        except InferenceError as exc:
            return self._error(origin, request_id, model_name, exc.code, exc.message)
        except Exception:
            log.exception("internal error preparing %s offset %d", origin.tp, origin.offset)
            return self._error(origin, request_id, model_name, ErrorCode.INTERNAL, "internal error")

    def _error(
        self, origin: Origin, request_id: str | None, model: str | None, code: ErrorCode, message: str
    ) -> Outgoing:
        detail = ErrorDetail(code=code, message=message)
        body = ErrorReply(id=request_id, model=model, error=detail).model_dump_json().encode()
        return Outgoing(origin, request_id, model, body, detail)

    # --- batches -----------------------------------------------------------------------

    async def _model_loop(self, model: ServedModel, batcher: MicroBatcher[Bucket, Job]) -> None:
        """Take ready batches of one model, run them in the executor, hand replies on."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                key, jobs = await batcher.get()
            except BatcherClosed:
                return
            now = _now_ms()
            expired = [j for j in jobs if j.deadline_ms is not None and j.deadline_ms <= now]
            jobs = [j for j in jobs if j.deadline_ms is None or j.deadline_ms > now]
            replies = [
                self._error(
                    j.origin,
                    j.request_id,
                    model.name,
                    ErrorCode.DEADLINE_EXCEEDED,
                    "deadline passed in the queue",
                )
                for j in expired
            ]
            if jobs:
                started = time.perf_counter()
                replies += await loop.run_in_executor(self.executor, self._run_batch, model, jobs, now, key)
                log.debug(
                    "%s: batch of %d in %.1f ms", model.name, len(jobs), (time.perf_counter() - started) * 1e3
                )
            # Publishing runs beside the next batch: the executor stays busy meanwhile.
            self._spawn(self._publish(replies))

    def _run_batch(
        self, model: ServedModel, jobs: list[Job], started_ms: int, key: Bucket | None = None
    ) -> list[Outgoing]:
        """Executor side: one engine call for the batch, then each request's task head."""
        begin = time.perf_counter()
        try:
            outputs = model.run([j.prepared for j in jobs], key)
        except Exception as exc:
            if len(jobs) == 1:
                job = jobs[0]
                if isinstance(exc, InferenceError):  # the request's own fault, with its code
                    return [self._error(job.origin, job.request_id, model.name, exc.code, exc.message)]
                log.exception("internal error running %s", model.name)
                return [
                    self._error(job.origin, job.request_id, model.name, ErrorCode.INTERNAL, "internal error")
                ]
            # One bad request must not fail its neighbours: retry them one by one.
            return [reply for job in jobs for reply in self._run_batch(model, [job], started_ms)]
        inference_ms = (time.perf_counter() - begin) * 1000
        self.metrics.batch_seconds.labels(model.name).observe(inference_ms / 1000)
        self.metrics.batch_size.labels(model.name).observe(len(jobs))
        replies = []
        for job, out in zip(jobs, outputs, strict=True):
            queue_ms = max(0.0, started_ms - job.origin.timestamp_ms)
            self.metrics.queue_seconds.labels(model.name).observe(queue_ms / 1000)
            try:
                result = Result(
                    id=job.request_id,
                    model=model.name,
                    task=model.metadata.task,
                    outputs=model.postprocess(out, job.prepared, job.parameters),
                    truncated=job.prepared.truncated,
                    timing=Timing(
                        queue_ms=queue_ms,
                        inference_ms=inference_ms,
                        batch_size=len(jobs),
                    ),
                )
                replies.append(
                    Outgoing(job.origin, job.request_id, model.name, result.model_dump_json().encode())
                )
            except InferenceError as exc:
                replies.append(self._error(job.origin, job.request_id, model.name, exc.code, exc.message))
            except Exception:
                log.exception("internal error post-processing %s", model.name)
                replies.append(
                    self._error(job.origin, job.request_id, model.name, ErrorCode.INTERNAL, "internal error")
                )
        return replies

    # --- replies and commits -----------------------------------------------------------

    async def _publish(self, replies: list[Outgoing]) -> None:
        """Send replies (and DLQ copies), wait for the broker's acks, mark done, commit.

        A reply_to topic the broker refuses falls back to the modality's results topic, so
        one bad header never holds up its batch. Retriable failures (broker down, leader
        moving) are retried with backoff for as long as it takes: the offsets stay
        uncommitted meanwhile and backpressure holds intake.
        """
        pending = list(replies)
        delay = 0.2
        while pending:
            outcomes = await asyncio.gather(*(self._deliver(r) for r in pending), return_exceptions=True)
            retry: list[Outgoing] = []
            for reply, outcome in zip(pending, outcomes, strict=True):
                if outcome is None:
                    self.tracker.done(reply.origin.tp, reply.origin.offset)
                    self._count(reply)
                elif isinstance(outcome, Exception):
                    retry += self._after_failure(reply, outcome)
                else:
                    raise outcome  # CancelledError and friends end the task
            self._progress.set()
            await self._commit()
            self._apply_backpressure()
            pending = retry
            if pending:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _count(self, reply: Outgoing) -> None:
        outcome = "ok" if reply.error is None else reply.error.code.value
        model = reply.model if reply.model in self.models else "unknown"  # bounded label values
        self.metrics.requests.labels(model, reply.origin.modality.value, outcome).inc()

    def _after_failure(self, reply: Outgoing, exc: Exception) -> list[Outgoing]:
        """What to do with a reply the broker did not take: re-route, replace, or retry it.

        Only a refusal of the topic itself re-routes a reply_to reply; a broker that is down
        (NodeNotReady, timeouts, ...) is waited for, so no reply lands where its client is
        not listening. Nothing is given up: an unanswered offset would stall its partition.
        """
        origin = reply.origin
        default = results_topic(origin.modality, self.settings.topic_prefix)
        if isinstance(exc, _TOPIC_REFUSED) and origin.reply_topic != default:
            log.warning("reply_to %r refused (%s); answering on %s", origin.reply_topic, exc, default)
            origin.reply_topic = default
            return [reply]
        if isinstance(exc, _TOO_LARGE) and reply.error is None:
            log.warning("the result for %s offset %d is too large to publish", origin.tp, origin.offset)
            message = "the result is larger than the producer may send (max_message_bytes)"
            return [self._error(origin, reply.request_id, reply.model, ErrorCode.PAYLOAD_TOO_LARGE, message)]
        if self._state.stopping:
            log.error(
                "publishing the reply to %s offset %d failed at shutdown: %r", origin.tp, origin.offset, exc
            )
            return []
        log.warning("publishing a reply failed (%r); retrying", exc)
        return [reply]

    async def _deliver(self, reply: Outgoing) -> None:
        """One reply and its DLQ copy, acknowledged by the broker."""
        acks = [await send for send in self._send(reply)]
        await asyncio.gather(*acks)

    def _send(self, reply: Outgoing) -> Iterator[Awaitable[Awaitable[Any]]]:
        """Queue a reply and its DLQ copy in the producer; each yields its delivery future."""
        origin = reply.origin
        key = (reply.request_id or "").encode() or None
        yield self.broker.publish(
            reply.body,
            origin.reply_topic,
            key=key,
            headers={"content-type": "application/json"},
            correlation_id=origin.correlation_id,
            no_confirm=True,
        )
        if reply.error is None:
            return
        headers = {
            "error_code": reply.error.code.value,
            "error_message": reply.error.message[:1000],
            "source_topic": origin.tp.topic,
            "source_partition": str(origin.tp.partition),
            "source_offset": str(origin.offset),
        }
        raw = origin.raw
        if len(raw) > self._dlq_limit:
            # Larger than one produce request may carry: keep the head, say how big it was.
            headers["dlq_truncated_from_bytes"] = str(len(raw))
            raw = raw[: self._dlq_limit]
        yield self.broker.publish(
            raw,
            dlq_topic(self.settings.topic_prefix),
            key=key,
            headers=headers,
            correlation_id=origin.correlation_id,
            no_confirm=True,
        )

    async def _commit(self) -> None:
        """Commit every partition position that advanced (explicit offsets, never ``ack()``)."""
        async with self._commit_lock:
            commits = self.tracker.take_commits()
            consumer = self.consumer
            if consumer is None or not commits:
                return
            owned = {tp: offset for tp, offset in commits.items() if tp in consumer.assignment()}
            if not owned:
                return
            try:
                await consumer.commit(owned)
            except KafkaError as exc:
                # Lost partitions or a rebalance in progress: the messages come back, as duplicates at worst.
                log.warning("commit of %s failed: %s", owned, exc)

    def _apply_backpressure(self) -> None:
        """Pause every partition above max_in_flight; resume below half of it."""
        in_flight = self.tracker.in_flight
        limit = self.settings.max_in_flight
        if not self._state.paused and in_flight >= limit:
            self._state.paused = True
            if self.consumer is not None:
                self.consumer.pause(*self.consumer.assignment())
            log.info("backpressure: %d requests in flight, partitions paused", in_flight)
        elif self._state.paused and in_flight <= limit // 2 and not self._state.draining:
            self._state.paused = False
            if self.consumer is not None:
                self.consumer.resume(*self.consumer.assignment())
            log.info("backpressure: %d requests in flight, partitions resumed", in_flight)

    @property
    def paused(self) -> bool:
        """True while backpressure holds the partitions paused."""
        return self._state.paused

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._state.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._state.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def _wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate`` holds, re-checking whenever requests make progress."""
        while not predicate():
            self._progress.clear()
            await self._progress.wait()

    async def wait_answered(self, partitions: Collection[TopicPartition]) -> None:
        """Wait until nothing fetched from ``partitions`` is unanswered."""
        await self._wait_until(lambda: not self.tracker.pending(partitions))


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Before partitions move away: answer what was fetched from them, commit, forget them."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        if not revoked:
            return
        # Bounded well below the session timeout so the group is not held up for long.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.worker.settings.session_timeout_ms / 2000):
                await self.worker.wait_answered(revoked)
        await self.worker._commit()
        self.worker.tracker.forget(revoked)

    async def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        consumer = self.worker.consumer
        if self.worker.paused and assigned and consumer is not None:
            consumer.pause(*assigned)
