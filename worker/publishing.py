"""Publishing a stage's replies: delivered (or given to the transactions), marked done, committed."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from typing import Any

from worker.kafka.commits import Flow
from worker.kafka.delivery import Delivery
from worker.kafka.messages import Outgoing
from worker.kafka.offsets import OffsetTracker
from worker.kafka.publish_retries import GiveUp
from worker.kafka.tracing import Tracing
from worker.kafka.transactions import Transactions
from worker.metrics import WorkerMetrics
from worker.settings import Settings

log = logging.getLogger(__name__)


class Publisher:
    """Hands replies to delivery (or the transactions) and settles their offsets by the outcome."""

    def __init__(
        self,
        settings: Settings,
        flow: Flow,
        delivery: Delivery,
        tracing: Tracing,
        metrics: WorkerMetrics,
        models: Collection[str],
        max_request_size: int,
    ) -> None:
        self.flow = flow
        self.tracker: OffsetTracker[Any] = flow.tracker
        self.delivery = delivery
        self.tracing = tracing
        self.metrics = metrics
        self.models = models
        # Exactly-once delivery (worker/kafka/transactions.py): answers and offsets go in transactions, not through
        # delivery and flow.commit.
        self.transactions = (
            Transactions(
                settings,
                flow.tracker,
                delivery,
                flow.redeliver,
                on_published=self.published,
                on_redelivered=self.redelivered,
                max_request_size=max_request_size,
                on_settled=self._settled,
            )
            if settings.delivery == "exactly-once"
            else None
        )
        if (transactions := self.transactions) is not None:
            flow.before_seek_to_committed = transactions.settled
            flow.own_commit = transactions.own_commit
            flow.kept_paused["transactions"] = lambda: transactions.unready

    async def publish(self, replies: list[Outgoing]) -> None:
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
                self.redelivered(reply)
        replies = current
        if self.transactions is not None:
            await self.transactions.publish(replies)  # each run committed or given up calls _settled
            self._settled()  # stale replies released above
            return
        outcomes = await asyncio.gather(*(self.delivery.deliver(r) for r in replies), return_exceptions=True)
        for reply, outcome in zip(replies, outcomes, strict=True):
            origin = reply.origin
            if outcome is None:
                tracker.done(origin.tp, origin.offset, origin.epoch)
                self.published(reply, started_ns)
            elif isinstance(outcome, Exception):
                if not isinstance(outcome, GiveUp):
                    log.error("delivering the reply to %s offset %d failed", origin.tp, origin.offset,
                              exc_info=outcome)  # fmt: skip
                self.flow.redeliver(origin.tp, origin.offset, origin.epoch, outcome)
                tracker.release(origin.tp, origin.offset, origin.epoch)
                self.redelivered(reply)
            else:
                raise outcome  # CancelledError and friends end the task
        self.flow.progressed()
        await self.flow.commit()
        self.flow.apply_backpressure()

    def _settled(self) -> None:
        """Requests left the flight: wake whoever waits for answers, and resume fetching below the bounds."""
        self.flow.progressed()
        self.flow.apply_backpressure()

    def published(self, reply: Outgoing, started_ns: int) -> None:
        """A reply acknowledged (exactly-once: committed) since ``started_ns``: counted, its trace ended."""
        self._count(reply)
        self.tracing.stage(reply.origin.trace, "publish", started_ns)
        self.tracing.request_done(reply.origin.trace, reply.error.code.value if reply.error else None)

    def redelivered(self, reply: Outgoing) -> None:
        """A reply given up on: its request is read again, and traced anew."""
        self.tracing.request_done(reply.origin.trace, "redelivered")

    def _count(self, reply: Outgoing) -> None:
        outcome = "ok" if reply.error is None else reply.error.code.value
        model = reply.model if reply.model in self.models else "unknown"  # bounded label values
        self.metrics.requests.labels(model, reply.origin.modality.value, outcome).inc()
