"""Rebalances under exactly-once: each assigned partition's transactional producer opened before it is read."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from worker.kafka.commits import Flow, Rebalance
from worker.kafka.transactions import Transactions


class TransactionalRebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """The flow's rebalance handling, with each assigned partition's producer opened before it is read."""

    def __init__(
        self, inner: Rebalance, transactions: Transactions, consumer: Callable[[], AIOKafkaConsumer | None]
    ) -> None:
        self.inner = inner
        self.flow: Flow = inner.flow
        self.transactions = transactions
        self.consumer = consumer
        transactions.on_ready = self._resume

    async def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        loop = asyncio.get_running_loop()
        began = loop.time()
        await self.inner.on_partitions_revoked(revoked)
        # A transaction still in progress ends within the flow's wait for answers (half the session), what is
        # left of it: the whole revoke stays within the at-least-once one's bound (simulation seed 814).
        left = max(0.0, began + self.flow.settings.session_timeout_ms / 2000 - loop.time())
        await self.transactions.revoked(revoked, left)

    async def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        consumer = self.consumer()
        assert consumer is not None
        # Paused before any await: nothing is read until the producer has fenced the previous owner and the
        # committed offset is read again (aiokafka fetches it before calling this listener).
        consumer.pause(*assigned)
        await self.inner.on_partitions_assigned(assigned)
        ready = await self.transactions.assigned(consumer, assigned)
        self._resume(*ready)  # the others once their producers open (``Transactions.on_ready``)

    def _resume(self, *partitions: TopicPartition) -> None:
        """Read ``partitions`` (those still assigned), unless backpressure or a drain holds every partition."""
        consumer = self.consumer()
        if consumer is not None and not (self.flow.paused or self.flow.draining):
            consumer.resume(*(set(partitions) & consumer.assignment()))
