"""Readiness: why /readyz says no, the broker probe that tells an idle worker the broker is away, the gauges."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from worker.kafka.clients import KafkaClients
from worker.kafka.delivery import Delivery
from worker.kafka.offsets import OffsetTracker
from worker.metrics import WorkerMetrics
from worker.run_state import FETCH_LOOP, RunState
from worker.settings import Settings

log = logging.getLogger(__name__)

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
NOT_READY_REASONS = (
    "fetch_failing",
    "publish_failing",
    "model_loop_died",
    "fetch_loop_died",
    "broker_unreachable",
)


class Readiness:
    """What /readyz reads, and the two loops that keep it and the gauges current."""

    def __init__(
        self,
        state: RunState,
        settings: Settings,
        clients: KafkaClients,
        delivery: Delivery,
        tracker: OffsetTracker[Any],
        metrics: WorkerMetrics,
    ) -> None:
        self._state = state
        self.settings = settings
        self.clients = clients
        self.delivery = delivery
        self.tracker = tracker
        self.metrics = metrics

    @property
    def consumer(self) -> AIOKafkaConsumer | None:
        """The consumer of the request topics (None before start and after stop)."""
        return self.clients.consumer

    def not_ready_reasons(self) -> frozenset[str]:
        """Why /readyz says no, beyond "no partitions yet" (one of NOT_READY_REASONS each)."""
        reasons = set()
        if self._state.failed_rounds >= FETCH_ERRORS_NOT_READY:
            reasons.add("fetch_failing")
        if self._publishing_fails():
            reasons.add("publish_failing")
        if self._state.dead_loops - {FETCH_LOOP}:
            reasons.add("model_loop_died")
        if FETCH_LOOP in self._state.dead_loops:
            reasons.add("fetch_loop_died")
        since = self._state.unreachable_since
        if since is not None and time.monotonic() - since >= BROKER_UNREACHABLE_S:
            reasons.add("broker_unreachable")
        return frozenset(reasons)

    def _publishing_fails(self) -> bool:
        """A publish has failed for over publish_retry_s / 2, and nothing since says publishing works.

        A reply that gets through clears the delivery's ``failing_since``. So does, here, the broker
        answering after the failures began while no publish fails any more: an idle worker whose last
        reply gave up during an outage has nothing left to publish that could prove the broker back.
        """
        since = self.delivery.failing_since
        if since is None or time.monotonic() - since <= self.settings.publish_retry_s / 2:
            return False
        answered = self._state.broker_answered_at
        return self.delivery.failing_calls > 0 or answered is None or answered <= since

    async def check_broker(self) -> None:
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
                self._state.broker_answered_at = time.monotonic()
            await asyncio.sleep(BROKER_CHECK_S)

    async def observe(self) -> None:
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
