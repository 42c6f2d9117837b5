"""The Kafka worker: one fetch loop over every request topic, a batcher and loop per model, replies, commits.

Life of a message: the fetch loop (worker/fetching.py) takes records one partition at a time;
each is tracked by partition/offset and its bytes, parsed (schemas/), decoded and prepared in
the executor, and queued in its model's micro-batcher. A model loop takes ready batches, runs
them in the executor, and hands one reply per request to delivery (worker/delivery.py), which
publishes it (acks=all) off the intake path. Only then is the message marked done, and offsets
are committed past contiguous runs of done messages (worker/offsets.py). Rejected messages and
records the client cannot decode get an error reply and/or a DLQ record through the same path.

Lifecycle: ``start()`` -> serve -> ``drain()`` (stop fetching, flush batchers, publish,
commit; bounded by drain_timeout_s) -> ``stop()`` (leave the group; bounded by STOP_BUDGET_S).
``serve()`` wires SIGTERM/SIGINT to that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import signal
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import ConsumerStoppedError, KafkaError
from faststream.kafka import KafkaBroker

from schemas import (
    ErrorCode,
    ErrorDetail,
    ErrorReply,
    RequestRejected,
    Result,
    Timing,
    parse_request,
)
from worker.batching import BatcherClosed, BatchQueue, MicroBatcher
from worker.decoding import MediaLimits, decode_inputs
from worker.delivery import Delivery, GiveUp
from worker.envelopes import Origin, Outgoing
from worker.errors import DeadlineExceeded, InferenceError, InvalidRequest, UnknownModel
from worker.fetching import Fetched, PartitionFetcher, Undecodable
from worker.metadata import Bucket
from worker.metrics import HealthServer, WorkerMetrics
from worker.offsets import OffsetTracker
from worker.processors import Prepared
from worker.registry import ServedModel
from worker.routing import ReplyPolicy, TopicDirectory
from worker.settings import Settings
from worker.topics import (
    MissingTopics,
    dlq_topic,
    ensure_topics,
    max_message_bytes,
    requests_topic,
    results_topic,
)

log = logging.getLogger(__name__)

#: After drain_timeout_s, the most that the final commit and closing the clients may take together.
STOP_BUDGET_S = 5.0
#: Fetch rounds failing in a row before /readyz says so.
FETCH_ERRORS_NOT_READY = 5


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
class _State:
    """Mutable run state, kept in one place."""

    paused: bool = False
    draining: bool = False
    stopping: bool = False
    handlers_running: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    #: models whose loop died and is waiting to be restarted
    dead_loops: set[str] = field(default_factory=set)
    not_ready: frozenset[str] = frozenset()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _header(record: ConsumerRecord[Any, Any], name: str) -> str | None:
    for key, value in record.headers or ():
        if key == name and value is not None:
            return bytes(value).decode("utf-8", "replace")
    return None


def _prepared_bytes(prepared: Prepared) -> int:
    return sum(int(getattr(array, "nbytes", 0)) for array in prepared.arrays.values())


class Worker:
    """One worker process: one consumer over every modality topic, a batcher and loop per model."""

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
            max_video_seconds=settings.max_video_seconds,
            max_video_frames_decoded=settings.max_video_frames_decoded,
            max_video_pixels=settings.max_video_pixels,
        )
        self.tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self.executor = ThreadPoolExecutor(settings.executor_threads, thread_name_prefix="inference")
        self._max_request_size = max(settings.max_message_bytes * 2, 1024 * 1024)
        self.broker = KafkaBroker(
            settings.bootstrap_servers,
            acks="all",
            enable_idempotence=False,  # the embedded broker refuses idempotent producers
            max_batch_size=1024 * 1024,
            max_request_size=self._max_request_size,
            compression_type=None if settings.compression_type == "none" else settings.compression_type,
            graceful_timeout=settings.drain_timeout_s,
            security=settings.kafka_security(),
            logger=logging.getLogger("worker.kafka"),
            log_level=logging.DEBUG,
        )
        self.policy = ReplyPolicy(settings.topic_prefix, re.compile(settings.reply_to_pattern))
        self.metrics = WorkerMetrics()
        self._admin: AIOKafkaAdminClient | None = None
        self.directory = TopicDirectory(self._list_topics)
        self.delivery = Delivery(
            self._publish_record,
            self.directory,
            self.metrics,
            prefix=settings.topic_prefix,
            limit_bytes=min(settings.max_publish_bytes, self._max_request_size),
            dlq_payload=settings.dlq_payload,
            retry_s=settings.publish_retry_s,
        )
        self.consumer: AIOKafkaConsumer | None = None
        self.fetcher: PartitionFetcher | None = None
        self.batchers: dict[str, MicroBatcher[Bucket, Job]] = {}
        self._modality_of = {requests_topic(m, settings.topic_prefix): m for m in self.modalities}
        self._loops: list[asyncio.Task[None]] = []
        self._intake: asyncio.Task[None] | None = None
        self._observer: asyncio.Task[None] | None = None
        self._state = _State()
        self._commit_lock = asyncio.Lock()
        self._progress = asyncio.Event()
        self.health = (
            HealthServer(self.metrics, lambda: self.ready, settings.metrics_port)
            if settings.metrics_port is not None
            else None
        )

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (retrying until Kafka answers), start the batchers' loops and the fetch loop."""
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
            self._loops.append(asyncio.create_task(self._supervise(model, batcher), name=f"model:{name}"))
        self._intake = asyncio.create_task(self._fetch_loop(), name="fetch")
        log.info(
            "worker started: models %s on %s, group %s, records up to %d bytes",
            ", ".join(sorted(self.models)),
            ", ".join(self._modality_of),
            s.group_id,
            self.delivery.limit_bytes,
        )

    async def _connect(self) -> None:
        """Check (or create) the worker's own topics, learn the size limit, start producer and consumer.

        A broker that does not answer is waited for; missing topics that may not be created are fatal.
        """
        s = self.settings
        assert s.bootstrap_servers
        own = [*self._modality_of, *(results_topic(m, s.topic_prefix) for m in self.modalities)]
        own.append(dlq_topic(s.topic_prefix))
        delay = 0.5
        while True:
            try:
                self._admin = AIOKafkaAdminClient(
                    bootstrap_servers=s.bootstrap_servers,
                    request_timeout_ms=10_000,
                    **s.kafka_client_kwargs(),
                )
                await self._admin.start()
                created = await ensure_topics(self._admin, own, s.partitions, create=s.create_topics)
                if created:
                    log.info("created topics %s", ", ".join(created))
                await self._learn_size_limit(own[len(self._modality_of) :])
                await self.broker.start()
                self.consumer = AIOKafkaConsumer(
                    bootstrap_servers=s.bootstrap_servers,
                    group_id=s.group_id,
                    enable_auto_commit=False,  # offsets are committed only past answered messages
                    auto_offset_reset="earliest",
                    fetch_max_wait_ms=s.fetch_max_wait_ms,
                    fetch_max_bytes=s.fetch_max_bytes,
                    max_partition_fetch_bytes=max(s.max_message_bytes, 1024 * 1024),
                    session_timeout_ms=s.session_timeout_ms,
                    heartbeat_interval_ms=s.heartbeat_interval_ms,
                    **s.kafka_client_kwargs(),
                )
                await self.consumer.start()
                self.consumer.subscribe(list(self._modality_of), listener=_Rebalance(self))
                self.fetcher = PartitionFetcher(self.consumer, max_attempts=s.max_decode_attempts)
                return
            except MissingTopics:
                await self._close_clients()
                raise
            except (KafkaError, OSError) as exc:
                log.warning(
                    "Kafka at %s is not reachable (%s); retrying in %.1f s", s.bootstrap_servers, exc, delay
                )
                await self._close_clients()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _learn_size_limit(self, written: list[str]) -> None:
        """Keep every reply and DLQ copy under the broker's real limit for the topics written to."""
        assert self._admin is not None
        try:
            async with asyncio.timeout(5):
                reported = await max_message_bytes(self._admin, written)
        except (KafkaError, TimeoutError, OSError) as exc:
            log.info("the broker did not report max.message.bytes (%r)", exc)
            reported = None
        if reported is None:
            log.info("record size limit: %d bytes (max_publish_bytes)", self.settings.max_publish_bytes)
            return
        self.delivery.limit_bytes = min(reported, self._max_request_size)
        log.info("record size limit: %d bytes (the broker's max.message.bytes)", reported)

    async def _list_topics(self) -> set[str]:
        if self._admin is None:
            raise KafkaError("not connected")
        return set(await self._admin.list_topics())

    async def drain(self) -> None:
        """Stop fetching, finish and publish what is in flight, commit: drain_timeout_s + STOP_BUDGET_S."""
        self._state.draining = True
        if self.consumer is not None:
            self.consumer.pause(*self.consumer.assignment())
        try:
            await asyncio.wait_for(self._drain_in_flight(), self.settings.drain_timeout_s)
        except TimeoutError:
            log.warning(
                "drain timed out with %d requests unanswered (left uncommitted)", self.tracker.in_flight
            )
        self.delivery.stopping = True  # what still retries gives up now: it stays uncommitted
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_BUDGET_S / 2):
                await self._commit()

    async def _drain_in_flight(self) -> None:
        await self._wait_until(lambda: self._state.handlers_running == 0)
        for batcher in self.batchers.values():
            batcher.close()
        await asyncio.gather(*self._loops, return_exceptions=True)
        while self._state.tasks:
            await asyncio.gather(*list(self._state.tasks), return_exceptions=True)

    async def stop(self) -> None:
        """Leave the group and close the Kafka clients; cancels what drain left behind. Bounded."""
        self._state.stopping = True
        self.delivery.stopping = True
        tasks = [*self._loops, *self._state.tasks]
        tasks += [t for t in (self._observer, self._intake) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._close_clients(STOP_BUDGET_S / 2)
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.health is not None:
            self.health.stop()
        log.info("worker stopped")

    async def _close_clients(self, budget_s: float = 10.0) -> None:
        """Stop consumer, producer and admin client, all within ``budget_s`` whatever the broker does."""
        closing: list[Awaitable[Any]] = [self.broker.stop()]
        if self.consumer is not None:
            closing.append(self.consumer.stop())
        if self._admin is not None:
            closing.append(self._admin.close())
        tasks = [asyncio.ensure_future(c) for c in closing]
        done, pending = await asyncio.wait(tasks, timeout=budget_s)
        for task in pending:
            task.cancel()
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.warning("closing a Kafka client failed: %r", task.exception())
        if pending:
            log.warning("%d Kafka clients did not close within %.1f s; abandoned", len(pending), budget_s)
        self.consumer = None
        self._admin = None

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
        if starting.exception() is not None:
            stopped.cancel()
            await self.stop()
            starting.result()
        try:
            await stopped
            log.info("shutdown requested: draining")
            await self.drain()
        finally:
            await self.stop()

    # --- readiness ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Partitions assigned, fetching and publishing working, every model loop alive."""
        return self.consumer is not None and bool(self.consumer.assignment()) and not self.not_ready_reasons()

    def not_ready_reasons(self) -> frozenset[str]:
        """Why /readyz says no, beyond "no partitions yet": fetch_failing, publish_failing, model_loop_died."""
        reasons = set()
        if self.fetcher is not None and self.fetcher.consecutive_errors >= FETCH_ERRORS_NOT_READY:
            reasons.add("fetch_failing")
        failing = self.delivery.failing_since
        if failing is not None and time.monotonic() - failing > self.settings.publish_retry_s / 2:
            reasons.add("publish_failing")
        if self._state.dead_loops:
            reasons.add("model_loop_died")
        return frozenset(reasons)

    async def _observe(self) -> None:
        """Once a second: prove the loop is alive, refresh the gauges, say why readiness changed."""
        while True:
            self.metrics.tick()
            self.metrics.in_flight.set(self.tracker.in_flight)
            self.metrics.in_flight_bytes.set(self.tracker.bytes_in_flight)
            reasons = self.not_ready_reasons()
            if reasons != self._state.not_ready:
                for reason in reasons - self._state.not_ready:
                    log.error("not ready: %s", reason)
                for reason in self._state.not_ready - reasons:
                    log.info("%s cleared", reason)
                for reason in ("fetch_failing", "publish_failing", "model_loop_died"):
                    self.metrics.not_ready.labels(reason).set(1 if reason in reasons else 0)
                self._state.not_ready = reasons
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

    # --- intake ------------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        """Fetch, track and prepare records until draining; no fault here stops the consumer."""
        s = self.settings
        assert self.fetcher is not None
        while not self._state.draining:
            room = min(s.fetch_max_records, s.max_in_flight - self.tracker.in_flight)
            if self._state.paused or room <= 0:
                await asyncio.sleep(s.fetch_timeout_ms / 1000)
                continue
            try:
                byte_room = s.max_in_flight_bytes - self.tracker.bytes_in_flight
                fetched = await self.fetcher.fetch(room, s.fetch_timeout_ms, byte_room)
            except ConsumerStoppedError:
                return
            if fetched.empty:
                if self.fetcher.consecutive_errors:
                    self.metrics.fetch_errors.inc()
                    await asyncio.sleep(min(0.1 * self.fetcher.consecutive_errors, 2.0))
                continue
            self._state.handlers_running += 1
            try:
                await self._on_records(fetched)
                log.debug("Processed a fetch of %d records", len(fetched.records) + len(fetched.undecodable))
            except Exception:
                # Their offsets stay tracked and unanswered: nothing past them is committed.
                log.exception("internal error taking in %d records", len(fetched.records))
            finally:
                self._state.handlers_running -= 1
                self._progress.set()

    async def _on_records(self, fetched: Fetched) -> None:
        """Track, parse and prepare one fetched round; errors are answered off the intake path."""
        origins = [self._origin(r) for r in fetched.records]
        for origin in origins:
            self.tracker.track(origin.tp, origin.offset, len(origin.raw))
        rejected = [self._undecodable(u) for u in fetched.undecodable]
        loop = asyncio.get_running_loop()
        outcomes = await loop.run_in_executor(self.executor, self._prepare_all, origins) if origins else []
        for outcome in outcomes:
            if isinstance(outcome, Outgoing):
                rejected.append(outcome)
            else:
                origin = outcome.origin
                self.tracker.add_bytes(origin.tp, origin.offset, _prepared_bytes(outcome.prepared))
                self.batchers[outcome.model.name].put(outcome.prepared.shape_key, outcome)
        if rejected:
            self._spawn(self._publish(rejected))
        self._apply_backpressure()

    def _undecodable(self, bad: Undecodable) -> Outgoing:
        """A record the client could not decode: no reply (nobody to address), a DLQ record naming it."""
        self.tracker.track(bad.tp, bad.offset)
        self.metrics.undecodable_records.inc()
        modality = self._modality_of[bad.tp.topic]
        origin = Origin(
            modality=modality,
            tp=bad.tp,
            offset=bad.offset,
            reply_topic=results_topic(modality, self.settings.topic_prefix),
            correlation_id=f"{bad.tp.topic}:{bad.tp.partition}:{bad.offset}",
            raw=b"",
            timestamp_ms=_now_ms(),
        )
        message = f"the Kafka client cannot decode this record: {bad.error}"
        return Outgoing(
            origin, None, None, None, ErrorDetail(code=ErrorCode.UNDECODABLE_INPUT, message=message)
        )

    def _origin(self, record: ConsumerRecord[Any, Any]) -> Origin:
        s = self.settings
        modality = self._modality_of[record.topic]
        default = results_topic(modality, s.topic_prefix)
        key = record.key.decode("utf-8", "replace") if isinstance(record.key, bytes) else None
        origin = Origin(
            modality=modality,
            tp=TopicPartition(record.topic, record.partition),
            offset=record.offset,
            reply_topic=default,
            correlation_id=key or f"{record.topic}:{record.partition}:{record.offset}",
            raw=record.value or b"",
            timestamp_ms=record.timestamp if record.timestamp and record.timestamp > 0 else _now_ms(),
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
            if origin.rejected is not None:
                raise InvalidRequest(origin.rejected)
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

    async def _supervise(self, model: ServedModel, batcher: MicroBatcher[Bucket, Job]) -> None:
        """Keep a model's loop running: a loop that dies is logged, reported not-ready, and restarted."""
        delay = 1.0
        while True:
            try:
                await self._model_loop(model, batcher)
                return
            except Exception:
                log.exception("the loop of model %s died; restarting in %.0f s", model.name, delay)
                self._state.dead_loops.add(model.name)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
            self._state.dead_loops.discard(model.name)

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
        """Deliver replies (and DLQ copies), mark each done once acknowledged, commit.

        A reply whose delivery gave up (the broker away past publish_retry_s) is left uncommitted
        and read again: its partition is rewound to it, so a fault costs a redelivery, not a stall.
        """
        outcomes = await asyncio.gather(*(self.delivery.deliver(r) for r in replies), return_exceptions=True)
        for reply, outcome in zip(replies, outcomes, strict=True):
            if outcome is None:
                self.tracker.done(reply.origin.tp, reply.origin.offset)
                self._count(reply)
            elif isinstance(outcome, GiveUp):
                self._redeliver(reply.origin, outcome)
            elif isinstance(outcome, Exception):
                log.error("delivering the reply to %s offset %d failed", reply.origin.tp, reply.origin.offset,
                          exc_info=outcome)  # fmt: skip
                self._redeliver(reply.origin, outcome)
            else:
                raise outcome  # CancelledError and friends end the task
        self._progress.set()
        await self._commit()
        self._apply_backpressure()

    def _redeliver(self, origin: Origin, why: BaseException) -> None:
        if self._state.draining or self._state.stopping:
            log.warning("%s offset %d stays uncommitted (%s)", origin.tp, origin.offset, why)
            return
        log.warning("%s offset %d will be read again (%s)", origin.tp, origin.offset, why)
        self.tracker.rewind(origin.tp, origin.offset)
        consumer = self.consumer
        if consumer is not None and origin.tp in consumer.assignment():
            consumer.seek(origin.tp, origin.offset)

    async def _publish_record(
        self, value: bytes, topic: str, key: bytes | None, headers: dict[str, str], correlation_id: str
    ) -> Awaitable[Any]:
        """Queue one record in the producer; returns its delivery future (the broker's ack)."""
        ack: Awaitable[Any] = await self.broker.publish(
            value, topic, key=key, headers=headers, correlation_id=correlation_id, no_confirm=True
        )
        return ack

    def _count(self, reply: Outgoing) -> None:
        outcome = "ok" if reply.error is None else reply.error.code.value
        model = reply.model if reply.model in self.models else "unknown"  # bounded label values
        self.metrics.requests.labels(model, reply.origin.modality.value, outcome).inc()

    async def _commit(self) -> None:
        """Commit every partition position that advanced (explicit offsets)."""
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
        """Pause every partition above max_in_flight requests or bytes; resume below half of both."""
        s = self.settings
        count, held = self.tracker.in_flight, self.tracker.bytes_in_flight
        if not self._state.paused and (count >= s.max_in_flight or held >= s.max_in_flight_bytes):
            self._state.paused = True
            if self.consumer is not None:
                self.consumer.pause(*self.consumer.assignment())
            log.info("backpressure: %d requests (%d bytes) in flight, partitions paused", count, held)
        elif (
            self._state.paused
            and count <= s.max_in_flight // 2
            and held <= s.max_in_flight_bytes // 2
            and not self._state.draining
        ):
            self._state.paused = False
            if self.consumer is not None:
                self.consumer.resume(*self.consumer.assignment())
            log.info("backpressure: %d requests (%d bytes) in flight, partitions resumed", count, held)

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

    async def partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        """Before partitions move away: answer what was fetched from them (bounded), commit, forget them."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.session_timeout_ms / 2000):
                await self.wait_answered(revoked)
        await self._commit()
        self.tracker.forget(revoked)
        if self.fetcher is not None:
            self.fetcher.forget(revoked)

    def partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        """New partitions start paused while backpressure or a drain holds the others."""
        if (self._state.paused or self._state.draining) and assigned and self.consumer is not None:
            self.consumer.pause(*assigned)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Hands aiokafka's rebalance callbacks to the worker."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        log.info("revoked partitions: (%s)", ", ".join(map(repr, sorted(revoked))))
        if revoked:
            await self.worker.partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        log.info("assigned to partitions: (%s)", ", ".join(map(repr, sorted(assigned))))
        self.worker.partitions_assigned(assigned)
