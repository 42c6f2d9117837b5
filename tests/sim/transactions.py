"""Kafka transactions for the simulation: the transaction coordinator's state, and a fake of the transactional
AIOKafkaProducer as worker/kafka/transactions.py uses it (exactly-once delivery).

Semantics copied from aiokafka 0.14 and Apache Kafka (KIP-98), only as far as the worker can see them:
- ``start`` bootstraps (raises ``KafkaConnectionError`` when no broker answers) and then gets the producer id
  (InitProducerId), retried with no time bound while the coordinator is away. InitProducerId bumps the id's
  epoch: a transaction the previous epoch left open is aborted, one whose commit the coordinator had
  taken is completed. Every later call of an older epoch's producer raises ``ProducerFenced``.
- A transaction's records and offsets become visible together when its commit (EndTxn) reaches the
  coordinator; read_committed readers see nothing of an aborted one. Outputs are recorded on the cluster
  (and so checked) only then: the checker is the read_committed reader.
- ``send`` waits for a topic's metadata as the plain producer does; its acknowledgement fails like the plain
  producer's (outage past the request timeout, a leader moving, a topic refused).
- AddOffsetsToTxn, EndTxn (commit or abort) are retried with no time bound while the broker is away; an
  EndTxn that reached the coordinator completes even if its answer is lost (the call returns once the
  broker is back).
- The broker's transaction timeout: a transaction open longer than its producer's
  ``transaction_timeout_ms`` (from its first record or offsets, while no commit has reached the coordinator) is
  aborted at the coordinator's next check for such (every 10 s), and the id's epoch moves on, so the producer is
  fenced (aiokafka raises ``ProducerFenced`` for the broker's INVALID_PRODUCER_EPOCH) though no other producer
  took its id. Worked out lazily, whenever the coordinator is asked anything.
Not modelled: the last stable offset an open transaction holds read_committed readers at.
"""

from __future__ import annotations

import asyncio
import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError, ProducerFenced

from tests.sim.cluster import _offset_of

if TYPE_CHECKING:
    from tests.sim.cluster import Cluster, FakeClients

#: Apache Kafka's transaction.abort.timed.out.transaction.cleanup.interval.ms: how often the coordinator
#: looks for transactions open past their timeout.
TIMEOUT_CHECK_S = 10.0


@dataclass
class OpenTxn:
    """One transaction as the coordinator holds it."""

    epoch: int
    #: (topic, key, value, headers, correlation id) of each record the broker acknowledged in it
    outputs: list[tuple[str, bytes | None, bytes, dict[str, str], str]] = field(default_factory=list)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
    #: EndTxn(commit) reached the coordinator: nothing stops it any more
    committing: bool = False
    #: when its first record or offsets reached the coordinator (its timeout counts from there)
    began: float | None = None


class TxnCoordinator:
    """Epochs and open transactions per transactional id; outlives every worker process."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.epochs: dict[str, int] = {}
        self.open: dict[str, OpenTxn] = {}
        #: each id's transaction timeout (s), as its last InitProducerId gave it
        self.timeouts: dict[str, float] = {}

    def init_producer_id(self, tid: str, timeout_s: float) -> int:
        self.expire()
        self.timeouts[tid] = timeout_s
        left = self.open.pop(tid, None)
        if left is not None and left.committing:
            self._complete(tid, left)
        elif left is not None:
            self.cluster.note(f"txn {tid} epoch {left.epoch} aborted by a new producer")
        self.epochs[tid] = self.epochs.get(tid, -1) + 1
        self.cluster.note(f"txn {tid} init epoch {self.epochs[tid]}")
        return self.epochs[tid]

    def expire(self) -> None:
        """Abort, and fence, every transaction open past its timeout at the last check for such."""
        checked = math.floor(self.cluster.loop.now / TIMEOUT_CHECK_S) * TIMEOUT_CHECK_S
        for tid, txn in list(self.open.items()):
            if txn.began is None or txn.committing:
                continue
            if txn.began + self.timeouts[tid] < checked:
                del self.open[tid]
                self.epochs[tid] += 1
                self.cluster.note(f"txn {tid} epoch {txn.epoch} timed out (open since {txn.began:.1f}): aborted, "
                                  f"epoch {self.epochs[tid]}")  # fmt: skip

    def fenced(self, tid: str, epoch: int | None) -> bool:
        self.expire()
        return epoch is None or self.epochs.get(tid) != epoch

    def begin(self, tid: str, epoch: int) -> OpenTxn:
        txn = OpenTxn(epoch)
        self.open[tid] = txn
        return txn

    def started(self, txn: OpenTxn) -> None:
        """A record or the offsets of ``txn`` reached the coordinator: its timeout runs from the first."""
        if txn.began is None:
            txn.began = self.cluster.loop.now

    def commit(self, tid: str, txn: OpenTxn) -> None:
        self.expire()
        txn.committing = True
        if self.open.get(tid) is txn:
            del self.open[tid]
            self._complete(tid, txn)

    def abort(self, tid: str, txn: OpenTxn) -> None:
        self.expire()
        if self.open.get(tid) is txn:
            del self.open[tid]
            self.cluster.note(f"txn {tid} epoch {txn.epoch} aborted ({len(txn.outputs)} records)")

    def _complete(self, tid: str, txn: OpenTxn) -> None:
        cluster = self.cluster
        cluster.note(f"txn {tid} epoch {txn.epoch} commits {len(txn.outputs)} records, offsets "
                     f"{sorted((tp.partition, o) for tp, o in txn.offsets.items())}")  # fmt: skip
        for topic, key, value, headers, correlation_id in txn.outputs:
            cluster.record_output(topic, key, value, headers, correlation_id)
        if txn.offsets:
            if cluster.checker is not None:
                cluster.checker.on_commit(txn.offsets)
            cluster.committed.update(txn.offsets)


class TrackedTopics:
    """aiokafka's client as ``worker.kafka.topics.track_topic`` uses it: the topics the producer keeps in its
    metadata (the simulation has no metadata to lose: ``FakeClients.metadata`` stands for it)."""

    def __init__(self) -> None:
        self.topics: set[str] = set()

    def add_topic(self, topic: str) -> None:
        self.topics.add(topic)


class FakeTxnProducer:
    """AIOKafkaProducer with a transactional id, as worker/kafka/transactions.py uses it."""

    def __init__(self, clients: FakeClients, transactional_id: str, transaction_timeout_ms: int) -> None:
        self.clients = clients
        self.timeout_s = transaction_timeout_ms / 1000
        self.cluster = clients.cluster
        self.coordinator = clients.cluster.transactions
        self.tid = transactional_id
        self.epoch: int | None = None
        self.txn: OpenTxn | None = None
        self._sends: set[asyncio.Task[None]] = set()
        self._stopped = False
        self.client = TrackedTopics()

    async def _round_trip(self) -> None:
        """One request the client retries with no time bound while the broker is away."""
        while True:
            await self.cluster.wait_connected()
            await asyncio.sleep(self.cluster.sched.ack_latency())
            await self.clients._alive()
            if self.cluster.connected:
                return

    def _check(self) -> None:
        if self.coordinator.fenced(self.tid, self.epoch):
            raise ProducerFenced()

    async def start(self) -> None:
        await self.clients._alive()
        if not self.cluster.connected:
            await asyncio.sleep(1.0)
            raise KafkaConnectionError("Unable to bootstrap from [('sim', 9092)]")
        await self._round_trip()  # InitProducerId
        self.epoch = self.coordinator.init_producer_id(self.tid, self.timeout_s)

    async def begin_transaction(self) -> None:
        await self.clients._alive()
        self._check()
        self.txn = self.coordinator.begin(self.tid, self.epoch or 0)

    async def send(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[None]:
        await self.clients._alive()
        self._check()
        pairs = {name: raw.decode() for name, raw in headers or []}
        correlation_id = pairs.pop("correlation_id", "")
        await self.clients.metadata(topic, correlation_id)
        txn = self.txn
        assert txn is not None, "a send outside a transaction"
        ack: asyncio.Future[None] = self.cluster.loop.create_future()
        record = (topic, key, value, pairs, correlation_id)
        task = asyncio.create_task(
            self.clients.acknowledge(
                ack,
                topic,
                functools.partial(self._land, txn, record),
                fenced=lambda: (
                    self.coordinator.fenced(self.tid, self.epoch)
                    or self.coordinator.open.get(self.tid) is not txn
                ),
            )
        )
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)
        return ack

    def _land(self, txn: OpenTxn, record: tuple[str, bytes | None, bytes, dict[str, str], str]) -> None:
        """The broker acknowledged a record of ``txn``: it is in the transaction (seen at its commit)."""
        self.coordinator.started(txn)
        txn.outputs.append(record)

    async def send_offsets_to_transaction(self, offsets: dict[TopicPartition, Any], group_id: str) -> None:
        await self.clients._alive()
        self._check()
        txn = self.txn
        assert txn is not None, "offsets outside a transaction"
        await self._round_trip()  # AddOffsetsToTxn, then TxnOffsetCommit
        self._check()
        self.coordinator.started(txn)
        txn.offsets.update({tp: _offset_of(value) for tp, value in offsets.items()})

    async def commit_transaction(self) -> None:
        await self.clients._alive()
        self._check()
        txn = self.txn
        assert txn is not None, "a commit outside a transaction"
        if (cut := self.cluster.sched.cut_now()) is not None:
            self.cluster.cut_for(cut)  # the connection drops before EndTxn reaches the coordinator
        await self._round_trip()
        self._check()
        self.coordinator.commit(self.tid, txn)
        if (cut := self.cluster.sched.cut_now()) is not None:
            self.cluster.cut_for(cut)  # committed, its answer lost: the client retries until it hears
            await self._round_trip()
        self.txn = None

    async def abort_transaction(self) -> None:
        await self.clients._alive()
        txn = self.txn
        await self._round_trip()
        self._check()
        if txn is not None:
            self.coordinator.abort(self.tid, txn)
        self.txn = None

    async def stop(self) -> None:
        """Close: a transaction left open stays open at the coordinator (the next epoch ends it)."""
        self._stopped = True
        for task in list(self._sends):
            task.cancel()
