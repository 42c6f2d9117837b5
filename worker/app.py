"""The Kafka worker: a thin lifecycle shell over intake, batching, answers, delivery and flow.

Life of a message: the fetch loop (worker/fetching.py) takes records one partition at a time;
intake (worker/intake.py) reads each record's coordinates and, on its own threads, one request
each, parses, validates, decodes and prepares it; flow (worker/flow.py) tracks its offset and bytes; the
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

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import ConsumerStoppedError, KafkaError
from faststream.kafka import KafkaBroker

from schemas import ErrorCode
from worker.answers import run_batch, split_expired
from worker.batching import BatcherClosed, BatchQueue, MicroBatcher
from worker.budget import batch_limit
from worker.clients import KafkaClients
from worker.delivery import Delivery, GiveUp
from worker.envelopes import Origin, Outgoing, rejection
from worker.fetching import POLL_MS, BrokerWait, Fetched, PartitionFetcher
from worker.flow import Flow, Rebalance
from worker.intake import Intake, Job, now_ms
from worker.metadata import Bucket
from worker.metrics import HealthServer, WorkerMetrics
from worker.offsets import OffsetTracker
from worker.quarantine import Admitted, Quarantine, open_quarantine, poison_answer
from worker.registry import ServedModel
from worker.routing import ReplyPolicy, TopicDirectory
from worker.settings import Settings
from worker.topics import dlq_topic, requests_topic, results_topic
from worker.tracing import Tracing, configure
from worker.transactions import TransactionalRebalance, Transactions

log = logging.getLogger(__name__)

#: After drain_timeout_s, the most that the final commit and closing the clients may take together.
STOP_BUDGET_S = 5.0
#: Fetch rounds failing in a row before /readyz says so.
FETCH_ERRORS_NOT_READY = 5
#: How often the worker asks the broker for its topic list (a cheap metadata request), and the bound
#: on each ask. aiokafka's fetches fail inside its own task and an idle getmany() returns nothing
#: either way, so this ask is what tells an idle worker that the broker is away.
BROKER_CHECK_S = 2.0
BROKER_CHECK_TIMEOUT_S = 3.0
#: Asks failing for this long make /readyz say broker_unreachable: with the two above, an idle worker
#: turns not ready at most about BROKER_CHECK_S + BROKER_UNREACHABLE_S + BROKER_CHECK_TIMEOUT_S = 10 s
#: after the broker went away, and ready again at the first ask that succeeds (within about 2 s).
BROKER_UNREACHABLE_S = 5.0
#: The name under which a dead fetch loop is kept with the dead model loops.
FETCH_LOOP = "(fetch loop)"
NOT_READY_REASONS = (
    "fetch_failing",
    "publish_failing",
    "model_loop_died",
    "fetch_loop_died",
    "broker_unreachable",
)


@dataclass
class _State:
    """Mutable run state, kept in one place."""

    stopping: bool = False
    fetching_rounds: int = 0
    #: fetch rounds in a row that ended in an error of the broker or the client
    failed_rounds: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    #: models whose loop died and is waiting to be restarted (FETCH_LOOP for the fetch loop)
    dead_loops: set[str] = field(default_factory=set)
    #: monotonic start of the first of the broker checks failing in a row (None: the last one worked)
    unreachable_since: float | None = None
    not_ready: frozenset[str] = frozenset()


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
        # Exactly-once delivery (worker/transactions.py): answers and offsets go in transactions, not through
        # delivery and flow.commit.
        self.transactions = (
            Transactions(
                settings,
                self.flow.tracker,
                self.delivery,
                self.flow.redeliver,
                on_published=self._published,
                on_redelivered=self._redelivered,
                max_request_size=self.clients.max_request_size,
            )
            if settings.delivery == "exactly-once"
            else None
        )
        if self.transactions is not None:
            self.flow.before_seek_to_committed = self.transactions.settled
            self.flow.own_commit = self.transactions.own_commit
        self.fetcher: PartitionFetcher | None = None
        self.quarantine: Quarantine | None = None
        self.batchers: dict[str, MicroBatcher[Bucket, Job]] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._fetching: asyncio.Task[None] | None = None
        self._observer: asyncio.Task[None] | None = None
        self._checker: asyncio.Task[None] | None = None
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
        listener = Rebalance(self.flow)
        if self.transactions is not None:
            listener = TransactionalRebalance(listener, self.transactions, lambda: self.clients.consumer)
        await self.clients.connect([*requests, *written], requests, listener)
        if self.transactions is not None:
            await self.transactions.probe()  # at start, not at the first reply: a refusal ends the start
        self.delivery.limit_bytes = await self.clients.record_limit(written)
        self._checker = asyncio.create_task(self._check_broker(), name="check-broker")
        assert self.clients.consumer is not None
        self.flow.consumer = self.clients.consumer
        broker_wait = BrokerWait(self.clients.consumer, s.fetch_max_wait_ms, s.idle_fetch_max_wait_ms)
        self.fetcher = PartitionFetcher(
            self.clients.consumer,
            max_attempts=s.max_decode_attempts,
            broker_wait=broker_wait,
            idle_poll=self.flow.keep_membership,
            linger_ms=s.fetch_linger_ms,
        )
        self.flow.on_revoked = self.fetcher.forget
        self.quarantine = await open_quarantine(
            s, self.clients, self.tracker, self.flow.wait_until, lambda: self.flow.generation
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
        self.flow.on_dropped = self._drop_stale
        self.flow.on_seek_failed = self._seek_failed
        self._fetching = asyncio.create_task(self._supervise_fetching(), name="fetch")
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
        tasks += [t for t in (self._observer, self._fetching, self._checker) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.flow.consumer = None
        if self.transactions is not None:
            await self.transactions.close()
        if self.quarantine is not None:
            await self.quarantine.close(STOP_BUDGET_S / 4)
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

    # --- readiness ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Partitions assigned, fetching and publishing working, every model loop alive."""
        consumer = self.consumer
        return consumer is not None and bool(consumer.assignment()) and not self.not_ready_reasons()

    def not_ready_reasons(self) -> frozenset[str]:
        """Why /readyz says no, beyond "no partitions yet" (one of NOT_READY_REASONS each)."""
        reasons = set()
        if self._state.failed_rounds >= FETCH_ERRORS_NOT_READY:
            reasons.add("fetch_failing")
        failing = self.delivery.failing_since
        if failing is not None and time.monotonic() - failing > self.settings.publish_retry_s / 2:
            reasons.add("publish_failing")
        if self._state.dead_loops - {FETCH_LOOP}:
            reasons.add("model_loop_died")
        if FETCH_LOOP in self._state.dead_loops:
            reasons.add("fetch_loop_died")
        since = self._state.unreachable_since
        if since is not None and time.monotonic() - since >= BROKER_UNREACHABLE_S:
            reasons.add("broker_unreachable")
        return frozenset(reasons)

    async def _check_broker(self) -> None:
        """Every BROKER_CHECK_S, ask the broker for its topics (bounded); record since when asks fail."""
        while True:
            asked = time.monotonic()
            try:
                async with asyncio.timeout(BROKER_CHECK_TIMEOUT_S):
                    await self.clients.list_topics()
            except (TimeoutError, KafkaError, OSError) as exc:
                if self._state.unreachable_since is None:
                    log.warning("the broker did not answer a metadata request: %r", exc)
                    self._state.unreachable_since = asked
            else:
                self._state.unreachable_since = None
            await asyncio.sleep(BROKER_CHECK_S)

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

    async def _supervise_fetching(self) -> None:
        """Keep the fetch loop running: a loop that dies is logged, reported not-ready, and restarted
        from the committed offsets (its last round's records may be gone from the client)."""
        delay = 1.0
        restarting = False
        while True:
            try:
                if restarting:
                    await self.flow.restart_from_committed()
                    self._state.dead_loops.discard(FETCH_LOOP)
                await self._fetch_loop()
                return
            except Exception:
                log.exception("the fetch loop died; restarting in %.0f s", delay)
                self._state.dead_loops.add(FETCH_LOOP)
                restarting = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _fetch_loop(self) -> None:
        """Fetch, track and prepare records until draining; no fault here stops the consumer."""
        s = self.settings
        assert self.fetcher is not None
        while not self.flow.draining:
            self.flow.apply_seeks()  # rewinds asked for since the last round: before the next fetch
            room = min(s.fetch_max_records, s.max_in_flight - self.tracker.in_flight)
            byte_room = s.max_in_flight_bytes - self.tracker.bytes_in_flight
            if self.flow.paused or room <= 0:
                # Answers free room soon: look again shortly, polling so the group keeps this member.
                await self.flow.keep_membership(POLL_MS)
                continue
            epochs, generation = self.tracker.epochs(), self.flow.generation
            errors = self.fetcher.consecutive_errors
            try:
                assert self.quarantine is not None  # records it held back come before fetching more
                timeout_ms = self.quarantine.fetch_timeout_ms(s.fetch_timeout_ms)
                fetched = await self.quarantine.held_back() or await self.fetcher.fetch(
                    room, timeout_ms, byte_room
                )
            except ConsumerStoppedError:
                return
            except Exception as exc:
                # No fault may end this loop (a dead fetch task left the worker alive and "ready"):
                # counted as a failed round, which readiness reads and the backoff below spaces out.
                # What the round took from the client may be gone with it: start over from the
                # committed offsets (records still in flight are not tracked twice).
                log.exception("a fetch round failed; its partitions start over from their committed offsets")
                self.fetcher.round_failed(exc)
                await self.flow.restart_from_committed()
                generation = self.flow.generation  # its own restart: a failed round, not an overtaken one
                fetched = Fetched([], [])
            # Crash markers armed (acknowledged) before anything of the round is tracked or runs.
            admitted = await self._admit(fetched, epochs, generation)
            if admitted is None:
                # A revoke came during the round: aiokafka's getmany waits out a reassignment and then
                # returns records of the new one, so records in hand may belong to either. None is
                # tracked; the partitions they came from start again from their committed offsets.
                await self.flow.seek_to_committed(_partitions_of(fetched))
                continue
            # The records named as poison are tracked too (each the first of its partition in the round).
            poison_of = {(_tp_of(r), r.offset): crashes for r, crashes in admitted.poisoned}
            tracked = self._track(
                Fetched(
                    [*(r for r, _ in admitted.poisoned), *admitted.fetched.records],
                    admitted.fetched.undecodable,
                ),
                epochs,
            )
            # A round that raised no broker error, even an empty one, shows fetching works again: an
            # idle worker would otherwise stay fetch_failing until its next record.
            failed = self.fetcher.consecutive_errors > errors
            self._state.failed_rounds = self._state.failed_rounds + 1 if failed else 0
            if tracked.empty:
                if failed:
                    self.metrics.fetch_errors.inc()
                    await asyncio.sleep(min(0.1 * self._state.failed_rounds, 2.0))
                continue
            self._state.fetching_rounds += 1
            try:
                await self._take(tracked, poison_of, epochs)
                log.debug("Processed a fetch of %d records", len(tracked.records) + len(tracked.undecodable))
            except Exception as exc:
                # A fault here costs a redelivery: read this round's partitions again from its first offsets.
                log.exception("internal error taking in %d records", len(tracked.records))
                self._read_again(tracked, epochs, exc)
            finally:
                self._state.fetching_rounds -= 1
                self.flow.progressed()

    async def _admit(
        self, fetched: Fetched, epochs: Mapping[TopicPartition, int], generation: int
    ) -> Admitted | None:
        """The quarantine's view of a fetched round (None: a revoke overtook it). Markers that cannot be
        armed (the broker away) send the round back: its partitions are sought to its first offsets
        (nothing of it was tracked), and the failure counts as a failed fetch round."""
        assert self.quarantine is not None and self.consumer is not None and self.fetcher is not None
        if self.flow.generation != generation:
            return None
        if fetched.empty:
            return Admitted(fetched, [])
        try:
            return await self.quarantine.admit(fetched, epochs, generation)
        except Exception as exc:  # the broker away, mostly; no fault may end the fetch loop
            log.warning("could not arm the crash markers of a round (%r); it is read again", exc)
            self.fetcher.round_failed(exc)
            first = _first_offsets(fetched)
            self.quarantine.reread(first)
            for tp, offset in first.items():
                if tp in self.consumer.assignment():
                    self.consumer.seek(tp, offset)
            return Admitted(Fetched([], []), [])

    def _seek_failed(self, exc: BaseException) -> None:
        """A try to seek partitions to their committed offsets failed: a failed fetch round for readiness."""
        assert self.fetcher is not None
        self.fetcher.round_failed(exc)
        self._state.failed_rounds += 1
        self.metrics.fetch_errors.inc()

    def _track(self, fetched: Fetched, epochs: Mapping[TopicPartition, int]) -> Fetched:
        """Track one round's records in the epochs they were fetched in (``epochs``, taken as the round
        began); those a rewind or a revoke overtook during the round are left out: they are read again.
        Nothing here can fail but a broken offset order: what is tracked is what ``_read_again`` rewinds."""
        tracker = self.tracker
        return Fetched(
            [
                record
                for record in fetched.records
                if tracker.track(
                    tp := _tp_of(record), record.offset, len(record.value or b""), epochs.get(tp, 0)
                )
            ],
            [
                bad
                for bad in fetched.undecodable
                if tracker.track(bad.tp, bad.offset, 0, epochs.get(bad.tp, 0))
            ],
        )

    def _read_again(self, tracked: Fetched, epochs: Mapping[TopicPartition, int], why: BaseException) -> None:
        """Rewind every partition of a round that could not be taken in to its first offset."""
        for tp, offset in _first_offsets(tracked).items():
            self.flow.redeliver(tp, offset, epochs.get(tp, 0), why)
        for tp, offset in _coordinates(tracked):  # what reached no batcher and no delivery is let go here
            self.tracker.release(tp, offset, epochs.get(tp, 0))

    async def _take(
        self,
        tracked: Fetched,
        poison_of: Mapping[tuple[TopicPartition, int], int],
        epochs: Mapping[TopicPartition, int],
    ) -> None:
        """Prepare and queue one tracked round; errors are answered off the intake path, and the records
        the quarantine named as poison (``poison_of``: coordinates -> crashes) without being prepared."""
        poisoned = [r for r in tracked.records if (_tp_of(r), r.offset) in poison_of]
        origins = [self.intake.origin(r) for r in tracked.records if (_tp_of(r), r.offset) not in poison_of]
        rejected = [self.intake.undecodable(bad) for bad in tracked.undecodable]
        rejected += [
            poison_answer(self.intake.origin(r), r.key, poison_of[(_tp_of(r), r.offset)]) for r in poisoned
        ]
        for origin in [*origins, *(out.origin for out in rejected)]:
            origin.epoch = epochs.get(origin.tp, 0)
        if rejected:
            self._spawn(self._publish(rejected))
        if origins:
            # Each request goes to its batcher (or is answered) the moment it is prepared; the round
            # counts as being taken in until its last one is, so a drain waits for them.
            self._state.fetching_rounds += 1
            try:
                handed_on = await self.intake.take_in(origins, self._prepared, self._not_prepared)
            except BaseException:
                self._state.fetching_rounds -= 1
                raise
            self._spawn(self._round_taken(handed_on))
        self.flow.apply_backpressure()

    def _prepared(self, outcome: Job | Outgoing) -> None:
        """One request prepared: its bytes counted at once (admission sees them), then queued or answered."""
        origin, tracker = outcome.origin, self.tracker
        if not tracker.current(origin.tp, origin.offset, origin.epoch):
            tracker.release(origin.tp, origin.offset, origin.epoch)  # rewound or revoked while prepared
            return
        if isinstance(outcome, Outgoing):
            self._spawn(self._publish([outcome]))
            return
        tracker.add_bytes(origin.tp, origin.offset, outcome.prepared_bytes, origin.epoch)
        self.batchers[outcome.model.name].put(outcome.prepared.shape_key, outcome, outcome.rows)
        self.flow.apply_backpressure()

    def _not_prepared(self, origin: Origin, why: BaseException) -> None:
        """A fault of ours while preparing: it costs a redelivery of that record, not the request."""
        log.error("internal error preparing %s offset %d", origin.tp, origin.offset, exc_info=why)
        self.flow.redeliver(origin.tp, origin.offset, origin.epoch, why)
        self.tracker.release(origin.tp, origin.offset, origin.epoch)  # it reached no batcher

    async def _round_taken(self, handed_on: asyncio.Future[list[None]]) -> None:
        try:
            await handed_on
        finally:
            self._state.fetching_rounds -= 1
            self.flow.progressed()

    def _drop_stale(self) -> None:
        """After a rewind or a revoke: queued jobs of dropped offsets leave the batchers (they are read
        again) and stop counting; jobs already running count until their batch ends."""
        tracker = self.tracker
        for batcher in self.batchers.values():
            stale = batcher.drop(
                lambda job: not tracker.current(job.origin.tp, job.origin.offset, job.origin.epoch)
            )
            for job in stale:
                tracker.release(job.origin.tp, job.origin.offset, job.origin.epoch)
        self.flow.progressed()
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
        """Run one batch in the executor and hand its replies to delivery.

        A fault outside ``run_batch``'s own handling (an engine that returns the wrong number of
        outputs, say) answers every request of the batch with an internal error (reply and DLQ
        copy, as ``run_batch`` answers a request that fails alone): the batch is settled either way.
        """
        now = now_ms()
        live, replies = split_expired(jobs, now)
        if live:
            started = time.perf_counter()
            started_ns = time.time_ns()
            for job in live:
                self.tracing.stage(job.origin.trace, "queue wait", job.queued_ns, started_ns)
            span = self.tracing.batch(
                (job.origin.trace for job in live),
                start_ns=started_ns,
                attributes={"inference.model": model.name, "inference.batch_size": len(live)},
            )
            run = functools.partial(run_batch, model, live, now, self.metrics, key)
            try:
                replies += await asyncio.get_running_loop().run_in_executor(self.executor, run)
            except Exception as exc:
                log.exception("internal error answering a batch of %d for %s", len(live), model.name)
                self.tracing.batch_done(span, exc)
                replies += [
                    rejection(j.origin, j.request_id, model.name, ErrorCode.INTERNAL, "internal error")
                    for j in live
                ]
            else:
                self.tracing.batch_done(span)
            log.debug(
                "%s: batch of %d in %.1f ms", model.name, len(live), (time.perf_counter() - started) * 1e3
            )
        # Publishing runs beside the next batch: the executor stays busy meanwhile.
        self._spawn(self._publish(replies))

    # --- replies -----------------------------------------------------------------------

    async def _publish(self, replies: list[Outgoing]) -> None:
        """Deliver replies (and DLQ copies), mark each done once acknowledged, commit.

        A reply whose delivery gave up (the broker away past publish_retry_s) is left uncommitted
        and read again: its partition is rewound to it, so a fault costs a redelivery, not a stall.
        A reply whose message was rewound or revoked meanwhile is not sent: it is read again.
        Exactly-once: replies go to the transactions instead, which commit them with their offsets.
        """
        started_ns = time.time_ns()
        tracker = self.tracker
        current = []
        for reply in replies:
            origin = reply.origin
            if tracker.current(origin.tp, origin.offset, origin.epoch):
                current.append(reply)
            else:
                tracker.release(origin.tp, origin.offset, origin.epoch)
                self._redelivered(reply)
        replies = current
        if self.transactions is not None:
            await self.transactions.publish(replies)
            self.flow.progressed()
            self.flow.apply_backpressure()
            return
        outcomes = await asyncio.gather(*(self.delivery.deliver(r) for r in replies), return_exceptions=True)
        for reply, outcome in zip(replies, outcomes, strict=True):
            origin = reply.origin
            if outcome is None:
                tracker.done(origin.tp, origin.offset, origin.epoch)
                self._published(reply, started_ns)
            elif isinstance(outcome, Exception):
                if not isinstance(outcome, GiveUp):
                    log.error("delivering the reply to %s offset %d failed", origin.tp, origin.offset,
                              exc_info=outcome)  # fmt: skip
                self.flow.redeliver(origin.tp, origin.offset, origin.epoch, outcome)
                tracker.release(origin.tp, origin.offset, origin.epoch)
                self._redelivered(reply)
            else:
                raise outcome  # CancelledError and friends end the task
        self.flow.progressed()
        await self.flow.commit()
        self.flow.apply_backpressure()

    def _published(self, reply: Outgoing, started_ns: int) -> None:
        """A reply acknowledged (exactly-once: committed) since ``started_ns``: counted, its trace ended."""
        self._count(reply)
        self.tracing.stage(reply.origin.trace, "publish", started_ns)
        self.tracing.request_done(reply.origin.trace, reply.error.code.value if reply.error else None)

    def _redelivered(self, reply: Outgoing) -> None:
        """A reply given up on: its request is read again, and traced anew."""
        self.tracing.request_done(reply.origin.trace, "redelivered")

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


def _tp_of(record: ConsumerRecord[Any, Any]) -> TopicPartition:
    return TopicPartition(record.topic, record.partition)


def _coordinates(fetched: Fetched) -> list[tuple[TopicPartition, int]]:
    return [(_tp_of(r), r.offset) for r in fetched.records] + [(u.tp, u.offset) for u in fetched.undecodable]


def _partitions_of(fetched: Fetched) -> set[TopicPartition]:
    return {tp for tp, _ in _coordinates(fetched)}


def _first_offsets(fetched: Fetched) -> dict[TopicPartition, int]:
    """Each partition of a round, with the round's first offset of it."""
    first: dict[TopicPartition, int] = {}
    for tp, offset in _coordinates(fetched):
        first[tp] = min(offset, first.get(tp, offset))
    return first


def _job_length(model: ServedModel, job: Job) -> int | None:
    """A queued request's real token length, where its model's batches run at their longest one."""
    return model.batch_length(job.prepared)
