"""The Kafka worker: the shell that wires the stages together and runs them from ``start()`` to ``stop()``.

A message: fetched (worker/fetch_loop.py), tracked and prepared (worker/admission.py, worker/intake.py),
batched and run (worker/model_loops.py, worker/answers.py), its reply published (worker/publishing.py,
worker/kafka/delivery.py, acks=all); only then is it marked done, and offsets are committed
(worker/kafka/commits.py) past contiguous runs of done messages. Readiness: worker/readiness.py.

Lifecycle: ``start()`` -> serve -> ``drain()`` (stop fetching, flush batchers, publish,
commit; bounded by drain_timeout_s) -> ``stop()`` (close the clients; bounded by
STOP_BUDGET_S). ``serve()`` wires SIGTERM/SIGINT to that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiokafka import AIOKafkaConsumer
from faststream.kafka import KafkaBroker

from schemas.topics import dlq_topic, requests_topic, results_topic
from worker.admission import Admission
from worker.fetch_loop import FetchLoop
from worker.intake import Intake
from worker.kafka.clients import KafkaClients
from worker.kafka.commits import Flow, Rebalance
from worker.kafka.delivery import Delivery
from worker.kafka.offsets import OffsetTracker
from worker.kafka.routing import ReplyPolicy, TopicDirectory
from worker.kafka.tracing import Tracing, configure
from worker.kafka.transactional_rebalance import TransactionalRebalance
from worker.metrics import HealthServer, WorkerMetrics
from worker.model_loops import ModelLoops
from worker.publishing import Publisher
from worker.readiness import Readiness
from worker.run_state import RunState
from worker.serving.registry import ServedModel
from worker.settings import Settings

log = logging.getLogger(__name__)

#: After drain_timeout_s, the most that the final commit and closing the clients may take together.
STOP_BUDGET_S = 5.0


class Worker:
    """One worker process: one consumer over every modality topic, a batcher and loop per model."""

    def __init__(
        self, settings: Settings, models: Mapping[str, ServedModel], tracing: Tracing | None = None
    ) -> None:
        """``tracing``: where spans go (default: as ``settings.tracing`` and the ``OTEL_*`` variables say)."""
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
        self.tracing = tracing or configure(settings.tracing)
        self.intake = Intake(settings, self.models, modality_of, policy, self.metrics, self.tracing)
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
        self.publisher = Publisher(
            settings,
            self.flow,
            self.delivery,
            self.tracing,
            self.metrics,
            self.models,
            self.clients.max_request_size,
        )
        self.transactions = self.publisher.transactions
        self._state = RunState()
        publish = self.publisher.publish
        self.model_loops = ModelLoops(
            self._state, settings, self.models, self.executor, self.tracing, self.metrics, publish
        )
        self.batchers = self.model_loops.batchers
        self.model_loops.pending = lambda: self.intake.pending
        self.admission = Admission(self._state, self.flow, self.intake, self.batchers, publish)
        self.fetch_loop = FetchLoop(
            self._state, settings, self.clients, self.flow, self.admission, self.metrics
        )
        self.readiness = Readiness(
            self._state, settings, self.clients, self.delivery, self.flow.tracker, self.metrics
        )
        self._loops: list[asyncio.Task[None]] = []
        self._fetching: asyncio.Task[None] | None = None
        self._observer: asyncio.Task[None] | None = None
        self._checker: asyncio.Task[None] | None = None
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

    async def start(self) -> None:
        """Connect (retrying until Kafka answers), start the batchers' loops and the fetch loop."""
        s = self.settings
        if self.health is not None:
            self.health.start()  # /healthz answers while Kafka is still being waited for
        self._observer = asyncio.create_task(self.readiness.observe(), name="observe")
        requests = list(self.intake.modality_of)
        written = [*(results_topic(m, s.topic_prefix) for m in self.modalities), dlq_topic(s.topic_prefix)]
        listener = Rebalance(self.flow)
        if self.transactions is not None:
            listener = TransactionalRebalance(listener, self.transactions, lambda: self.clients.consumer)
        await self.clients.connect([*requests, *written], requests, listener)
        if self.transactions is not None:
            await self.transactions.probe()  # at start, not at the first reply: a refusal ends the start
        self.delivery.limit_bytes = await self.clients.record_limit(written)
        self._checker = asyncio.create_task(self.readiness.check_broker(), name="check-broker")
        await self.fetch_loop.open()
        self._loops = self.model_loops.start()
        self.flow.on_dropped = self.admission.drop_stale
        self.flow.on_seek_failed = self.fetch_loop.seek_failed
        self._fetching = asyncio.create_task(self.fetch_loop.supervise(), name="fetch")
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
                "drain timed out with %d requests unanswered (left uncommitted): %s",
                self.tracker.in_flight,
                self.where_in_flight(),
            )
        self.delivery.stopping = True  # what still retries gives up now: it stays uncommitted
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_BUDGET_S / 2):
                await self.flow.commit()
                quarantine = self.fetch_loop.quarantine
                if quarantine is not None and self.consumer is not None:
                    await quarantine.release(self.consumer.assignment())

    def where_in_flight(self) -> str:
        """Where the requests in flight are, stage by stage (what a drain that timed out reports)."""
        queued = sum(len(batcher) for batcher in self.batchers.values())
        return (
            f"{self._state.fetching_rounds} rounds being taken in, {self.intake.pending} being prepared, "
            f"{queued} queued for a batch, {self.model_loops.running} batches running, "
            f"{len(self._state.tasks)} tasks publishing or handing on, "
            f"{self.delivery.sending} sends awaiting the broker"
        )

    async def _drain_in_flight(self) -> None:
        """Wait for what is in flight to be answered. ``asyncio.wait``, not ``gather``: a drain that times
        out cancels only this waiting, not the batches and publishing it waited for (``stop`` ends those)."""
        await self.flow.wait_until(lambda: self._state.fetching_rounds == 0)
        for batcher in self.batchers.values():
            batcher.close()
        if self._loops:
            await asyncio.wait(self._loops)
        while self._state.tasks:
            await asyncio.wait(list(self._state.tasks))

    async def stop(self) -> None:
        """Close the Kafka clients (bounded); cancels what drain left behind."""
        self._state.stopping = True
        self.flow.draining = True
        self.delivery.stopping = True
        tasks = [*self._loops, *self._state.tasks]
        tasks += [t for t in (self._observer, self._fetching, self._checker) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.flow.consumer = None
        if self.transactions is not None:
            await self.transactions.close()
        if self.fetch_loop.quarantine is not None:
            await self.fetch_loop.quarantine.close(STOP_BUDGET_S / 4)
        await self.clients.close(STOP_BUDGET_S / 4)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.intake.close()
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

    @property
    def ready(self) -> bool:
        """Started (the fetch loop running), partitions assigned, fetching and publishing working, every model
        loop alive."""
        consumer = self.consumer
        return (
            self._fetching is not None
            and consumer is not None
            and bool(consumer.assignment())
            and not self.not_ready_reasons()
        )

    def not_ready_reasons(self) -> frozenset[str]:
        """Why /readyz says no, beyond "no partitions yet" (worker/readiness.py's NOT_READY_REASONS)."""
        return self.readiness.not_ready_reasons()
