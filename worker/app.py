"""The Kafka worker: a thin lifecycle shell over intake, batching, answers, delivery and flow.

Life of a message: the fetch loop (worker/fetching.py) takes records one partition at a time;
intake (worker/intake.py) reads each record's coordinates and, in the executor, parses,
validates, decodes and prepares it; flow (worker/flow.py) tracks its offset and bytes; the
job waits in its model's micro-batcher (worker/batching.py); a model loop runs ready batches in
the executor (worker/answers.py) and hands one reply per request to delivery
(worker/delivery.py), which publishes it (acks=all) off the intake path. Only then is the
message marked done, and offsets are committed past contiguous runs of done messages.

Lifecycle: ``start()`` -> serve -> ``drain()`` (stop fetching, flush batchers, publish,
commit; bounded by drain_timeout_s) -> ``stop()`` (close the clients; bounded by
STOP_BUDGET_S). ``serve()`` wires SIGTERM/SIGINT to that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import signal
import time
from collections.abc import Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import ConsumerStoppedError, KafkaError
from faststream.kafka import KafkaBroker

from worker.answers import run_batch, split_expired
from worker.batching import BatcherClosed, BatchQueue, MicroBatcher
from worker.budget import batch_limit
from worker.clients import KafkaClients
from worker.delivery import Delivery, GiveUp
from worker.envelopes import Outgoing
from worker.fetching import POLL_MS, BrokerWait, Fetched, PartitionFetcher
from worker.flow import Flow, Rebalance
from worker.intake import Intake, Job, now_ms
from worker.metadata import Bucket
from worker.metrics import HealthServer, WorkerMetrics
from worker.offsets import OffsetTracker
from worker.quarantine import Quarantine, open_quarantine, poison_answer
from worker.registry import ServedModel
from worker.routing import ReplyPolicy, TopicDirectory
from worker.settings import Settings
from worker.topics import dlq_topic, requests_topic, results_topic

log = logging.getLogger(__name__)

#: After drain_timeout_s, the most that the final commit and closing the clients may take together.
STOP_BUDGET_S = 5.0
#: Fetch rounds failing in a row before /readyz says so.
FETCH_ERRORS_NOT_READY = 5
NOT_READY_REASONS = ("fetch_failing", "publish_failing", "model_loop_died")


@dataclass
class _State:
    """Mutable run state, kept in one place."""

    stopping: bool = False
    fetching_rounds: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    #: models whose loop died and is waiting to be restarted
    dead_loops: set[str] = field(default_factory=set)
    not_ready: frozenset[str] = frozenset()


class Worker:
    """One worker process: one consumer over every modality topic, a batcher and loop per model."""

    def __init__(self, settings: Settings, models: Mapping[str, ServedModel]) -> None:
        if not settings.bootstrap_servers:
            raise ValueError("no Kafka bootstrap servers configured (WORKER_BOOTSTRAP_SERVERS)")
        self.settings = settings
        self.models = dict(models)
        self.modalities = sorted({m.metadata.modality for m in self.models.values()})
        self.metrics = WorkerMetrics()
        # Every model's batches in flight at once, and one more thread for the intake's preprocessing.
        threads = (
            settings.executor_threads or max(m.engine.batches_in_flight for m in self.models.values()) + 1
        )
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="inference")
        self.clients = KafkaClients(settings)
        modality_of = {requests_topic(m, settings.topic_prefix): m for m in self.modalities}
        policy = ReplyPolicy(settings.topic_prefix, re.compile(settings.reply_to_pattern))
        self.intake = Intake(settings, self.models, modality_of, policy, self.metrics)
        self.flow = Flow(settings)
        self.delivery = Delivery(
            self.clients.publish,
            TopicDirectory(self.clients.list_topics),
            self.metrics,
            prefix=settings.topic_prefix,
            limit_bytes=min(settings.max_publish_bytes, self.clients.max_request_size),
            dlq_payload=settings.dlq_payload,
            retry_s=settings.publish_retry_s,
        )
        self.fetcher: PartitionFetcher | None = None
        self.quarantine: Quarantine | None = None
        self.batchers: dict[str, MicroBatcher[Bucket, Job]] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._fetching: asyncio.Task[None] | None = None
        self._observer: asyncio.Task[None] | None = None
        self._state = _State()
        self.health = (
            HealthServer(self.metrics, lambda: self.ready, settings.metrics_port)
            if settings.metrics_port is not None
            else None
        )

    @property
    def broker(self) -> KafkaBroker:
        """The FastStream broker the replies are published through."""
        return self.clients.broker

    @property
    def consumer(self) -> AIOKafkaConsumer | None:
        """The consumer of the request topics (None before start and after stop)."""
        return self.clients.consumer

    @property
    def tracker(self) -> OffsetTracker[Any]:
        """Offsets and bytes in flight."""
        return self.flow.tracker

    @property
    def paused(self) -> bool:
        """True while backpressure holds the partitions paused."""
        return self.flow.paused

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (retrying until Kafka answers), start the batchers' loops and the fetch loop."""
        s = self.settings
        if self.health is not None:
            self.health.start()  # /healthz answers while Kafka is still being waited for
        self._observer = asyncio.create_task(self._observe(), name="observe")
        requests = list(self.intake.modality_of)
        written = [*(results_topic(m, s.topic_prefix) for m in self.modalities), dlq_topic(s.topic_prefix)]
        await self.clients.connect([*requests, *written], requests, Rebalance(self.flow))
        self.delivery.limit_bytes = await self.clients.record_limit(written)
        assert self.clients.consumer is not None
        self.flow.consumer = self.clients.consumer
        broker_wait = BrokerWait(self.clients.consumer, s.fetch_max_wait_ms, s.idle_fetch_max_wait_ms)
        self.fetcher = PartitionFetcher(
            self.clients.consumer, max_attempts=s.max_decode_attempts, broker_wait=broker_wait
        )
        self.flow.on_revoked = self.fetcher.forget
        self.quarantine = await open_quarantine(
            s, self.clients, lambda tp: self.tracker.pending([tp]), self.flow.wait_until
        )
        self.flow.on_revoking = self.quarantine.release
        for name, model in self.models.items():
            size, wait, tokens = s.batching_for(name)
            queue: BatchQueue[Bucket, Job] = BatchQueue(
                size,
                wait,
                size_of=functools.partial(batch_limit, model.metadata, max_rows=size, max_tokens=tokens),
                rank_of=model.merge_rank,
                length_of=functools.partial(_job_length, model),
            )
            batcher = MicroBatcher(queue)
            self.batchers[name] = batcher
            self._loops.append(asyncio.create_task(self._supervise(model, batcher), name=f"model:{name}"))
        self._fetching = asyncio.create_task(self._fetch_loop(), name="fetch")
        log.info(
            "worker started: models %s on %s, group %s, records up to %d bytes",
            ", ".join(sorted(self.models)),
            ", ".join(requests),
            s.group_id,
            self.delivery.limit_bytes,
        )

    async def drain(self) -> None:
        """Stop fetching, finish and publish what is in flight, commit: drain_timeout_s + STOP_BUDGET_S/2."""
        self.flow.pause_all()
        try:
            await asyncio.wait_for(self._drain_in_flight(), self.settings.drain_timeout_s)
        except TimeoutError:
            log.warning(
                "drain timed out with %d requests unanswered (left uncommitted)", self.tracker.in_flight
            )
        self.delivery.stopping = True  # what still retries gives up now: it stays uncommitted
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_BUDGET_S / 2):
                await self.flow.commit()
                if self.quarantine is not None and self.consumer is not None:
                    await self.quarantine.release(self.consumer.assignment())

    async def _drain_in_flight(self) -> None:
        await self.flow.wait_until(lambda: self._state.fetching_rounds == 0)
        for batcher in self.batchers.values():
            batcher.close()
        await asyncio.gather(*self._loops, return_exceptions=True)
        while self._state.tasks:
            await asyncio.gather(*list(self._state.tasks), return_exceptions=True)

    async def stop(self) -> None:
        """Close the Kafka clients (bounded); cancels what drain left behind."""
        self._state.stopping = True
        self.flow.draining = True
        self.delivery.stopping = True
        tasks = [*self._loops, *self._state.tasks]
        tasks += [t for t in (self._observer, self._fetching) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.flow.consumer = None
        if self.quarantine is not None:
            await self.quarantine.close(STOP_BUDGET_S / 4)
        await self.clients.close(STOP_BUDGET_S / 4)
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
        consumer = self.consumer
        return consumer is not None and bool(consumer.assignment()) and not self.not_ready_reasons()

    def not_ready_reasons(self) -> frozenset[str]:
        """Why /readyz says no, beyond "no partitions yet" (one of NOT_READY_REASONS each)."""
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
                for reason in NOT_READY_REASONS:
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
        while not self.flow.draining:
            room = min(s.fetch_max_records, s.max_in_flight - self.tracker.in_flight)
            byte_room = s.max_in_flight_bytes - self.tracker.bytes_in_flight
            if self.flow.paused or room <= 0:
                await asyncio.sleep(POLL_MS / 1000)  # answers free room soon: look again shortly
                continue
            try:
                assert self.quarantine is not None  # records it held back come before fetching more
                timeout_ms = self.quarantine.fetch_timeout_ms(s.fetch_timeout_ms)
                fetched = await self.quarantine.held_back() or await self.fetcher.fetch(
                    room, timeout_ms, byte_room
                )
            except ConsumerStoppedError:
                return
            if fetched.empty:
                if self.fetcher.consecutive_errors:
                    self.metrics.fetch_errors.inc()
                    await asyncio.sleep(min(0.1 * self.fetcher.consecutive_errors, 2.0))
                continue
            self._state.fetching_rounds += 1
            try:
                await self._take(fetched)
                log.debug("Processed a fetch of %d records", len(fetched.records) + len(fetched.undecodable))
            except Exception as exc:
                # A fault here costs a redelivery: read this round's partitions again from its first offsets.
                log.exception("internal error taking in %d records", len(fetched.records))
                self._read_again(fetched, exc)
            finally:
                self._state.fetching_rounds -= 1
                self.flow.progressed()

    def _read_again(self, fetched: Fetched, why: BaseException) -> None:
        """Rewind every partition of a round that could not be taken in to its first offset."""
        coordinates = [(TopicPartition(r.topic, r.partition), r.offset) for r in fetched.records]
        coordinates += [(u.tp, u.offset) for u in fetched.undecodable]
        first: dict[TopicPartition, int] = {}
        for tp, offset in coordinates:
            first[tp] = min(offset, first.get(tp, offset))
        for tp, offset in first.items():
            self.flow.redeliver(tp, offset, why)

    async def _take(self, fetched: Fetched) -> None:
        """Track, prepare and queue one fetched round; errors are answered off the intake path."""
        tracker = self.tracker
        assert self.quarantine is not None
        admitted = await self.quarantine.admit(fetched)  # markers acknowledged before anything runs
        fetched = admitted.fetched
        rejected = []
        for record, crashes in admitted.poisoned:
            poison = self.intake.origin(record)
            tracker.track(poison.tp, poison.offset, len(poison.raw))
            rejected.append(poison_answer(poison, record.key, crashes))
        origins = [self.intake.origin(r) for r in fetched.records]
        for origin in origins:
            tracker.track(origin.tp, origin.offset, len(origin.raw))
        for bad in fetched.undecodable:
            tracker.track(bad.tp, bad.offset)
            rejected.append(self.intake.undecodable(bad))
        loop = asyncio.get_running_loop()
        outcomes = (
            await loop.run_in_executor(self.executor, self.intake.prepare_all, origins) if origins else []
        )
        for outcome in outcomes:
            if isinstance(outcome, Outgoing):
                rejected.append(outcome)
            else:
                tracker.add_bytes(outcome.origin.tp, outcome.origin.offset, outcome.prepared_bytes)
                self.batchers[outcome.model.name].put(outcome.prepared.shape_key, outcome)
        if rejected:
            self._spawn(self._publish(rejected))
        self.flow.apply_backpressure()

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
        """Take ready batches of one model and run as many at once as its engine takes, in the executor;
        each hands its replies on as it ends."""
        slots = asyncio.Semaphore(model.engine.batches_in_flight)
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                await slots.acquire()
                for task in [t for t in running if t.done()]:
                    running.discard(task)
                    task.result()  # a batch that failed outside run_batch's own handling ends the loop
                try:
                    # A batch slot is free (the semaphore): what is queued runs at once, as waiting for
                    # max_wait would only add latency. Under load the slots are busy and batches fill.
                    key, jobs = await batcher.get(eager=self.settings.eager_when_idle)
                except BatcherClosed:
                    return
                task = asyncio.create_task(self._answer(model, key, jobs))
                running.add(task)
                task.add_done_callback(lambda _: slots.release())
        finally:
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    async def _answer(self, model: ServedModel, key: Bucket, jobs: list[Job]) -> None:
        """Run one batch in the executor and hand its replies to delivery."""
        now = now_ms()
        jobs, replies = split_expired(jobs, now)
        if jobs:
            started = time.perf_counter()
            run = functools.partial(run_batch, model, jobs, now, self.metrics, key)
            replies += await asyncio.get_running_loop().run_in_executor(self.executor, run)
            log.debug(
                "%s: batch of %d in %.1f ms", model.name, len(jobs), (time.perf_counter() - started) * 1e3
            )
        # Publishing runs beside the next batch: the executor stays busy meanwhile.
        self._spawn(self._publish(replies))

    # --- replies -----------------------------------------------------------------------

    async def _publish(self, replies: list[Outgoing]) -> None:
        """Deliver replies (and DLQ copies), mark each done once acknowledged, commit.

        A reply whose delivery gave up (the broker away past publish_retry_s) is left uncommitted
        and read again: its partition is rewound to it, so a fault costs a redelivery, not a stall.
        """
        outcomes = await asyncio.gather(*(self.delivery.deliver(r) for r in replies), return_exceptions=True)
        for reply, outcome in zip(replies, outcomes, strict=True):
            origin = reply.origin
            if outcome is None:
                self.tracker.done(origin.tp, origin.offset)
                self._count(reply)
            elif isinstance(outcome, Exception):
                if not isinstance(outcome, GiveUp):
                    log.error("delivering the reply to %s offset %d failed", origin.tp, origin.offset,
                              exc_info=outcome)  # fmt: skip
                self.flow.redeliver(origin.tp, origin.offset, outcome)
            else:
                raise outcome  # CancelledError and friends end the task
        self.flow.progressed()
        await self.flow.commit()
        self.flow.apply_backpressure()

    def _count(self, reply: Outgoing) -> None:
        outcome = "ok" if reply.error is None else reply.error.code.value
        model = reply.model if reply.model in self.models else "unknown"  # bounded label values
        self.metrics.requests.labels(model, reply.origin.modality.value, outcome).inc()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._state.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._state.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())


def _job_length(model: ServedModel, job: Job) -> int | None:
    """A queued request's real token length, where its model's batches run at their longest one."""
    return model.batch_length(job.prepared)
