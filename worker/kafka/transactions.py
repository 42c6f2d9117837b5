"""Exactly-once delivery (``--delivery exactly-once``): answers and offsets in one Kafka transaction.

A transaction holds the replies (and DLQ records) of a contiguous run of one input partition's
offsets, starting at its first unanswered offset, and commits the offset after the run with them
(``send_offsets_to_transaction``). Answers that arrive out of order wait in ``HeldAnswers`` until
every earlier offset of their partition is answered: a transaction past a gap commits an offset
beyond an unanswered request, and replies committed for a later offset would be produced again when
the gap is redelivered. A transaction that fails is aborted and its run is read again.

Each partition's producer (its fencing, replacement and a late commit) is ``PartitionProducers``'s.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import aiokafka.producer.sender
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    InvalidTransactionTimeout,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    NodeNotReadyError,
    ProducerFenced,
    RequestTimedOutError,
)

from worker.kafka.delivery import Delivery
from worker.kafka.held_answers import HeldAnswers
from worker.kafka.messages import Outgoing
from worker.kafka.offsets import OffsetTracker
from worker.kafka.partition_producers import (
    CLOSE_TIMEOUT_S,
    CommitUnanswered,
    PartitionProducers,
    stop_producer,
)
from worker.kafka.topics import track_topic
from worker.settings import Settings

log = logging.getLogger(__name__)


#: How long the start-up probe may take to get a transactional producer id (the first one on a
#: fresh Apache Kafka creates __transaction_state: a few seconds).
PROBE_TIMEOUT_S = 30.0
#: Beyond publish_retry_s (what delivery retries for), the most a transaction's offsets and commit may take.
COMMIT_SLACK_S = 15.0
#: The wait before a transaction's first AddPartitionsToTxn is sent again after CONCURRENT_TRANSACTIONS (the
#: previous commit's markers not written yet): aiokafka 0.14 waits a fixed 20 ms (``BACKOFF_OVERRIDE`` in
#: aiokafka/producer/sender.py, whatever retry_backoff_ms says), which back-to-back transactions of a partition
#: paid each time. One transaction of two records, back to back (Apache Kafka 4.4, this 2-core machine, three
#: runs each): 23-25 ms at 20 ms, 9-10 ms at 5 ms, 6-7 ms at 2 ms.
CONCURRENT_RETRY_S = 0.005


#: Failures of a broker that could not be reached, as opposed to one that answered with a refusal.
UNREACHABLE = (
    KafkaConnectionError,
    NodeNotReadyError,
    RequestTimedOutError,
    KafkaTimeoutError,
    TimeoutError,
    OSError,
)


class TransactionsRefused(RuntimeError):
    """The broker will not run transactions: exactly-once delivery cannot start on it."""

    code = "transactions_refused"


class Transactions(PartitionProducers):
    """The Kafka side: one transactional producer per assigned input partition, one transaction per run.

    ``publish`` holds answers and commits each partition's ready runs; ``assigned`` and ``revoked``
    open and close the partitions' producers. Offsets are committed only inside transactions.
    """

    def __init__(
        self,
        settings: Settings,
        tracker: OffsetTracker[TopicPartition],
        delivery: Delivery,
        redeliver: Callable[[TopicPartition, int, int, BaseException], None],
        *,
        on_published: Callable[[Outgoing, int], None],
        on_redelivered: Callable[[Outgoing], None],
        max_request_size: int,
        on_settled: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.tracker = tracker
        #: the worker's delivery, copied for each transaction with its publish bound to the partition's producer
        self.delivery = delivery
        self.redeliver = redeliver
        #: called with each reply once its transaction committed, and the time (ns) the transaction began
        self.on_published = on_published
        #: called with each reply of a transaction given up on
        self.on_redelivered = on_redelivered
        #: called once a run is committed or given up on (fewer requests in flight): from ``publish``, or later
        #: from a task of its own (a late commit's outcome, a producer replaced), which nothing else follows
        self.on_settled = on_settled
        self.max_request_size = max_request_size
        self.held: HeldAnswers[TopicPartition, Outgoing] = HeldAnswers()
        # Process-wide, but only transactional producers read it.
        aiokafka.producer.sender.BACKOFF_OVERRIDE = CONCURRENT_RETRY_S
        self.consumer: AIOKafkaConsumer | None = None
        self._producers: dict[TopicPartition, AIOKafkaProducer] = {}
        #: one transaction at a time per partition; waiting answers join the next one
        self._locks: dict[TopicPartition, asyncio.Lock] = {}
        #: partition -> the offset this worker's last transaction for it committed (while it is ours)
        self._committed: dict[TopicPartition, int] = {}
        #: partitions without a producer in service, each with the task that brings one back (it awaits a
        #: late commit's outcome, or opens a new producer)
        self._replacing: dict[TopicPartition, asyncio.Task[None]] = {}
        self.unready: set[TopicPartition] = set()
        self._stopping: set[asyncio.Task[None]] = set()
        self.on_ready: Callable[[TopicPartition], None] = lambda tp: None

    def _producer(self, transactional: str) -> AIOKafkaProducer:
        s = self.settings
        return AIOKafkaProducer(
            bootstrap_servers=s.bootstrap_servers,
            transactional_id=transactional,
            transaction_timeout_ms=s.transaction_timeout_ms,
            acks="all",
            # A transaction begun right after a commit is refused (CONCURRENT_TRANSACTIONS) until the commit
            # markers are written, then retried after this: measured 25 -> 18 ms median per transaction
            # with 100 -> 20 ms (Apache Kafka 4.4, this 2-core machine; the Java client retries this case after 20 ms too).
            retry_backoff_ms=20,
            max_batch_size=1024 * 1024,
            max_request_size=self.max_request_size,
            compression_type=None if s.compression_type == "none" else s.compression_type,
            **s.kafka_client_kwargs(),
        )

    # --- start-up ----------------------------------------------------------------------

    async def probe(self) -> None:
        """Get a transactional producer id once: TransactionsRefused if the broker answers that it will not.

        A broker that cannot be reached (no connection, no answer within PROBE_TIMEOUT_S) is tried again, as
        ``KafkaClients.connect`` does: an outage at start is not a refusal (simulation seed 4584, exactly-once:
        the worker exited at start naming the setting, a broker restart away from working).
        """
        delay = 0.5
        while True:
            producer = self._producer(f"{self.settings.group_id}.probe")
            try:
                async with asyncio.timeout(PROBE_TIMEOUT_S):
                    await producer.start()
                return
            except UNREACHABLE as exc:
                log.warning("the broker at %s did not answer InitProducerId (%r); trying again in %.1f s",
                            self.settings.bootstrap_servers, exc, delay)  # fmt: skip
            except InvalidTransactionTimeout as exc:
                raise TransactionsRefused(
                    f"the broker at {self.settings.bootstrap_servers} refuses a transaction timeout of "
                    f"{self.settings.transaction_timeout_ms} ms, above its transaction.max.timeout.ms: lower "
                    "WORKER_TRANSACTION_TIMEOUT_MS (--transaction-timeout-ms)"
                ) from exc
            except KafkaError as exc:
                raise TransactionsRefused(
                    f"the broker at {self.settings.bootstrap_servers} refuses transactions (InitProducerId: "
                    f"{exc!r}); WORKER_DELIVERY=exactly-once (--delivery exactly-once) needs them: use a broker "
                    "that runs transactions (Apache Kafka; the embedded broker does not), or "
                    "WORKER_DELIVERY=at-least-once"
                ) from exc
            finally:
                await stop_producer(producer)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    # --- answers -----------------------------------------------------------------------

    async def publish(self, replies: list[Outgoing]) -> None:
        """Hold each answer; publish every run that became ready, one transaction per run."""
        for reply in replies:
            self.held.hold(reply.origin.tp, reply.origin.offset, reply)
        # In partition order, as in assigned: a set's follows str hashing.
        await asyncio.gather(*(self._flush(tp) for tp in sorted({r.origin.tp for r in replies})))

    async def _flush(self, tp: TopicPartition) -> None:
        """Publish the partition's ready runs until none is left (answers held meanwhile join the next)."""
        async with self._locks.setdefault(tp, asyncio.Lock()):
            while (producer := self._producers.get(tp)) is not None:
                self._drop_stale(tp)
                run = self.held.take_run(tp, self.tracker.unanswered(tp))
                if not run:
                    return
                started_ns = time.time_ns()
                try:
                    await self._commit(producer, tp, run)
                except CommitUnanswered as exc:
                    self._await_outcome_later(producer, tp, run, exc, started_ns)
                    return
                except Exception as exc:
                    await self._failed(producer, tp, run, exc)
                    return
                self._done(tp, run, started_ns)

    def _done(self, tp: TopicPartition, run: list[tuple[int, Outgoing]], started_ns: int) -> None:
        """A run's transaction committed: its offsets are answered."""
        self._committed[tp] = run[-1][0] + 1
        for offset, reply in run:
            self.tracker.done(tp, offset, reply.origin.epoch)
            self.on_published(reply, started_ns)
        self.on_settled()

    async def _commit(
        self, producer: AIOKafkaProducer, tp: TopicPartition, run: list[tuple[int, Outgoing]]
    ) -> None:
        """One transaction: begin, deliver each answer (re-route, shrink, DLQ copy), the offsets, commit."""
        delivery = copy.copy(self.delivery)
        delivery.publish_record = functools.partial(_send, producer)
        # No second send of a record in one transaction: one whose acknowledgement failed may have been
        # written, and both would commit. A retriable failure gives up the transaction (a redelivery).
        delivery.retry_s = 0.0
        delivery.bound_attempts = False  # the transaction's own timeout bounds its sends
        ending: asyncio.Future[None] | None = None
        try:
            async with asyncio.timeout(self.settings.publish_retry_s + COMMIT_SLACK_S):
                await producer.begin_transaction()
                outcomes = await asyncio.gather(
                    *(delivery.deliver(r) for _, r in run), return_exceptions=True
                )
                for outcome in outcomes:
                    if isinstance(outcome, BaseException):
                        raise outcome
                await producer.send_offsets_to_transaction({tp: run[-1][0] + 1}, self.settings.group_id)
                # Shielded: once asked for, the commit goes on in aiokafka's sender whatever the timeout does
                # (it cannot be aborted any more), so its outcome is kept to be awaited.
                ending = asyncio.ensure_future(producer.commit_transaction())
                await asyncio.shield(ending)
        except TimeoutError as exc:
            if ending is not None:
                raise CommitUnanswered(ending) from exc
            raise
        finally:
            # /readyz reads the worker's delivery: publishing failing for long turns it not ready, as in
            # at-least-once.
            self.delivery.failing_since = delivery.failing_since
        log.debug("%s: committed offsets %d-%d in one transaction", tp, run[0][0], run[-1][0])

    async def _failed(
        self, producer: AIOKafkaProducer, tp: TopicPartition, run: list[tuple[int, Outgoing]], exc: Exception
    ) -> None:
        """Abort (or, fenced or broken, replace the producer while the partition is ours) and read the run again:
        a give-up, a redelivery."""
        first, last = run[0][0], run[-1][0]
        if isinstance(exc, ProducerFenced):
            # Either another worker initialised this partition's id (it owns the partition now; the rebalance
            # revokes it here), or the broker aborted the transaction, open past transaction_timeout_ms, and
            # moved the id's epoch on (simulation seed 566, exactly-once: the partition stayed paused for good).
            # A new producer is opened only while the group still gives the partition to this worker
            # (``_still_owned``), so the new owner of the first case is not fenced in turn.
            log.warning("%s: fenced (a new owner, or the transaction timed out); offsets %d-%d are read "
                        "again by whoever owns the partition", tp, first, last)  # fmt: skip
            await self._retire(tp, producer, exc)
        else:
            log.warning("%s: the transaction of offsets %d-%d failed (%r); aborting it", tp, first, last, exc)
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await producer.abort_transaction()
            except Exception as abort_exc:
                # The producer cannot go on (a fatal error, or a commit cut short: the transaction may have
                # committed). A new one takes its place while the partition is ours; its InitProducerId
                # ends what the old one left (commits or aborts it), and then the committed offset says
                # where to read again.
                log.warning("%s: aborting failed (%r); the producer is replaced", tp, abort_exc)
                await self._retire(tp, producer, exc)
        self._give_up(tp, run, exc)

    def own_commit(self, tp: TopicPartition) -> int | None:
        """The offset this worker's last transaction for ``tp`` committed, while ``tp`` is ours."""
        return self._committed.get(tp)

    async def settled(self, partitions: Collection[TopicPartition]) -> None:
        """Wait until no transaction of ``partitions`` is in progress and none awaits its commit's outcome
        (the caller bounds the wait): a committed offset read after this includes every transaction this
        worker began for them."""
        for tp in partitions:
            replacing = self._replacing.get(tp)
            if replacing is not None and tp not in self.unready:  # an unready one has begun no transaction
                await asyncio.wait([replacing])  # not cancelled by the caller's bound
            async with self._locks.setdefault(tp, asyncio.Lock()):
                pass

    def _give_up(
        self, tp: TopicPartition, run: list[tuple[int, Outgoing]], why: BaseException | None
    ) -> None:
        """The run was not committed: read it again (``why`` None: its transaction is left to the partition's
        next producer, this worker closing or the partition revoked)."""
        if why is not None:
            self.redeliver(tp, run[0][0], run[0][1].origin.epoch, why)
        for offset, reply in run:
            self.tracker.release(tp, offset, reply.origin.epoch)
            self.on_redelivered(reply)
        self._drop_stale(tp)
        self.on_settled()

    def _drop_stale(self, tp: TopicPartition) -> None:
        """Held answers whose message was rewound or revoked since: let go (the message is read again)."""
        tracker = self.tracker
        dropped = self.held.drop(
            tp, lambda offset, reply: not tracker.current(tp, offset, reply.origin.epoch)
        )
        for offset, reply in dropped:
            tracker.release(tp, offset, reply.origin.epoch)
            self.on_redelivered(reply)
        if dropped:
            self.on_settled()


async def _send(
    producer: AIOKafkaProducer,
    value: bytes,
    topic: str,
    key: bytes | None,
    headers: dict[str, str],
    correlation_id: str,
) -> Awaitable[Any]:
    """delivery.Publish over a transactional producer: queue the record, return its acknowledgement."""
    pairs = [("correlation_id", correlation_id.encode())] if correlation_id else []
    pairs += [(name, text.encode()) for name, text in headers.items()]
    track_topic(producer, topic)
    ack: Awaitable[Any] = await producer.send(topic, value, key=key, headers=pairs)
    return ack
