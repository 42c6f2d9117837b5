"""Each assigned input partition's transactional producer: opened (fencing), replaced, awaited past a late
commit, closed.

Fencing is KIP-98's: one transactional producer per assigned input partition, with the transactional
id ``<group>.<topic>.<partition>`` on every worker and across restarts. A partition's new owner
initialises that id (InitProducerId bumps its epoch, aborting an open transaction of the old owner)
before it reads the partition's committed offset; from then on a worker that lost the partition
(a zombie) cannot commit for it. KIP-447's fencing by consumer group metadata is not available:
aiokafka 0.14 sends TxnOffsetCommit v0 only.

A commit that gets no answer within the transaction's bound may still commit: aiokafka's sender goes on
retrying EndTxn, and the coordinator may have prepared the commit already. Such a run is neither read again
nor published again until that outcome is known (``_await_outcome``): read again from its first offset, as
after an abort, it was answered twice once the late commit landed (issue 26, a network cut).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection, Coroutine
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from worker.kafka.messages import Outgoing
from worker.kafka.offsets import OffsetTracker
from worker.settings import Settings

# The logger of the part this is a piece of: its records keep the name operators and tests filter by.
log = logging.getLogger("worker.kafka.transactions")


#: How long opening (initialising) one partition's producer may take on assignment.
OPEN_TIMEOUT_S = 20.0
#: How long aborting a failed transaction, or closing a producer, may take.
CLOSE_TIMEOUT_S = 5.0


class CommitUnanswered(Exception):
    """A transaction's commit was asked for and not answered within its bound: it may still commit."""

    def __init__(self, ending: asyncio.Future[None]) -> None:
        super().__init__("the commit got no answer in time")
        #: commit_transaction, still running: aiokafka retries EndTxn until the coordinator answers
        self.ending = ending


def transactional_id(group_id: str, tp: TopicPartition) -> str:
    """The id of the one producer that publishes answers for ``tp`` (stable across workers and restarts)."""
    return f"{group_id}.{tp.topic}.{tp.partition}"


class PartitionProducers(abc.ABC):
    """The partitions' producers of ``Transactions`` (which holds the state and publishes the runs): opened on
    assignment, replaced after a failure, out of service while a late commit is awaited, closed on revoke."""

    settings: Settings
    tracker: OffsetTracker[TopicPartition]
    redeliver: Callable[[TopicPartition, int, int, BaseException], None]
    consumer: AIOKafkaConsumer | None
    _producers: dict[TopicPartition, AIOKafkaProducer]
    _locks: dict[TopicPartition, asyncio.Lock]
    _committed: dict[TopicPartition, int]
    _replacing: dict[TopicPartition, asyncio.Task[None]]
    #: revoked partitions' producers being closed
    _stopping: set[asyncio.Task[None]]
    #: assigned partitions kept paused until their producer is open and they are positioned
    unready: set[TopicPartition]
    #: called with a partition that was unready once it is (the flow resumes it)
    on_ready: Callable[[TopicPartition], None]
    #: called once requests left the flight (``Transactions``)
    on_settled: Callable[[], None]

    @abc.abstractmethod
    def _producer(self, transactional: str) -> AIOKafkaProducer:
        """A transactional producer with the id ``transactional``, not started."""

    @abc.abstractmethod
    async def _flush(self, tp: TopicPartition) -> None:
        """Publish the partition's ready runs."""

    @abc.abstractmethod
    def _done(self, tp: TopicPartition, run: list[tuple[int, Outgoing]], started_ns: int) -> None:
        """A run's transaction committed."""

    @abc.abstractmethod
    def _give_up(
        self, tp: TopicPartition, run: list[tuple[int, Outgoing]], why: BaseException | None
    ) -> None:
        """The run was not committed: read it again."""

    @abc.abstractmethod
    def _drop_stale(self, tp: TopicPartition) -> None:
        """Let held answers of a rewound or revoked message go."""

    def _await_outcome_later(
        self,
        producer: AIOKafkaProducer,
        tp: TopicPartition,
        run: list[tuple[int, Outgoing]],
        unanswered: CommitUnanswered,
        started_ns: int,
    ) -> None:
        """Take the partition's producer out of service until its late commit's outcome is known."""
        if not self._out_of_service(tp, producer):
            # Revoked meanwhile, its producer closed (its commit will never answer here): the partition's
            # next producer ends the transaction, and its next owner reads from what it committed.
            unanswered.ending.cancel()
            self._give_up(tp, run, None)
            return
        log.warning("%s: the commit of offsets %d-%d got no answer in time; awaiting its outcome", tp, run[0][0],
                    run[-1][0])  # fmt: skip
        self._bring_back(
            tp, self._await_outcome(producer, tp, run, unanswered.ending, started_ns), "await-commit"
        )

    def _out_of_service(self, tp: TopicPartition, producer: AIOKafkaProducer) -> bool:
        """Take ``producer`` out of service if it still serves ``tp`` (a revoke and a new assignment may have put
        another in its place meanwhile, which stays); whether it did."""
        if self._producers.get(tp) is not producer:
            return False
        del self._producers[tp]
        return True

    async def _retire(self, tp: TopicPartition, producer: AIOKafkaProducer, why: BaseException) -> None:
        """``producer`` cannot go on: out of service and another opened in its place while the partition is ours
        (``_replace_later``), if it still served ``tp``; closed either way."""
        if self._out_of_service(tp, producer):
            self._replace_later(tp, why)
        await stop_producer(producer)

    def _bring_back(self, tp: TopicPartition, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``work``, which brings the partition's producer back into service, as its ``_replacing`` task."""
        task = asyncio.create_task(work, name=f"{name}:{tp.topic}:{tp.partition}")
        self._replacing[tp] = task
        task.add_done_callback(
            lambda done: self._replacing.pop(tp) if self._replacing.get(tp) is done else None
        )

    async def _await_outcome(
        self,
        producer: AIOKafkaProducer,
        tp: TopicPartition,
        run: list[tuple[int, Outgoing]],
        ending: asyncio.Future[None],
        started_ns: int,
    ) -> None:
        """Until the commit answers: committed, the run is answered and the producer goes on; refused, the
        run is read again and a new producer opened. Cancelled (the partition revoked, the worker closing),
        the producer is closed: the partition's next producer (InitProducerId) ends the transaction either way.

        Nothing of the partition is read or committed meanwhile (``settled`` waits for this): its committed
        offset may not yet show a commit that is coming.
        """
        try:
            await ending
        except asyncio.CancelledError:
            await stop_producer(producer)
            self._give_up(tp, run, None)
            raise
        except Exception as exc:
            log.warning("%s: the commit of offsets %d-%d failed (%r); the producer is replaced", tp, run[0][0],
                        run[-1][0], exc)  # fmt: skip
            await stop_producer(producer)
            self._give_up(tp, run, exc)
            await self._replace(tp, exc)
            return
        log.info("%s: the late commit of offsets %d-%d went through", tp, run[0][0], run[-1][0])
        self._done(tp, run, started_ns)
        if not self._bringing_back(tp):
            await stop_producer(producer)  # let go meanwhile (revoked, or closing)
            return
        self._producers[tp] = producer
        await self._back_in_service(tp)

    async def _back_in_service(self, tp: TopicPartition) -> None:
        """The partition's producer is back: publish what waited, no longer as the task that brought it back, so
        that a failure of these transactions can take it out of service again (``_replace_later``)."""
        if self._bringing_back(tp):
            del self._replacing[tp]
        await self._flush(tp)

    def _bringing_back(self, tp: TopicPartition) -> bool:
        """Whether the running task is still the one bringing the partition's producer back: a revoke or a close
        lets it go (its cancellation can be lost: Python 3.11's wait_for returns a result that came with it)."""
        return self._replacing.get(tp) is asyncio.current_task()

    def _replace_later(self, tp: TopicPartition, why: BaseException) -> None:
        """Open the partition's producer again in a task of its own, retrying while the partition is ours."""
        if tp not in self._replacing:
            self._bring_back(tp, self._replace(tp, why), "replace-producer")

    async def _replace(self, tp: TopicPartition, why: BaseException) -> None:
        """Until a new producer is open and the partition read from its committed offset (then publish what
        waited), or the partition is no longer ours."""
        delay = 0.5
        while (
            (consumer := self.consumer) is not None
            and tp in consumer.assignment()
            and self._bringing_back(tp)
        ):
            if await self._still_owned(tp):
                try:
                    producer = await self._started(tp)
                    try:
                        committed = await consumer.committed(tp)
                    except BaseException:
                        await stop_producer(producer)
                        raise
                except Exception as exc:
                    log.warning("%s: opening a new transactional producer failed (%r)", tp, exc)
                else:
                    if not self._bringing_back(tp):
                        await stop_producer(producer)  # let go meanwhile
                        return
                    log.info("%s: a new transactional producer took over at offset %s", tp, committed)
                    # In service only now: a transaction begun before the partition is read from its committed
                    # offset would commit answers that _read_from then sends to be read again (answered twice).
                    self._read_from(tp, committed, why)
                    self._producers[tp] = producer
                    await self._back_in_service(tp)
                    return
            await asyncio.sleep(delay)  # the broker is away, or the group is moving the partition
            delay = min(delay * 2, 10.0)

    def _read_from(self, tp: TopicPartition, committed: int | None, why: BaseException) -> None:
        """After a transaction of unknown outcome: what it committed is answered, the rest is read again."""
        if committed is None:
            return  # nothing ever committed: the failed run is read again already
        epoch = self.tracker.epoch(tp)
        for offset in [o for o in self.tracker.unanswered(tp) if o < committed]:
            self.tracker.done(tp, offset, epoch)  # answered by the transaction whose commit the failure hid
        self.redeliver(tp, committed, epoch, why)
        self._drop_stale(tp)
        self.on_settled()

    async def _still_owned(self, tp: TopicPartition) -> bool:
        """Whether the group still gives ``tp`` to this worker, asked before its id is initialised anew.

        The consumer's own view may be stale (a worker cut off from the group past its session), and
        initialising the id would then fence the partition's real owner. Committing the partition's
        committed offset again changes nothing, but passes the group's generation check only for the
        current owner (TxnOffsetCommit v0 has no such check). With none committed yet, its first offset
        is: reading from there is what the group does without a committed offset (auto_offset_reset).
        """
        consumer = self.consumer
        if consumer is None or tp not in consumer.assignment():
            return False
        try:
            committed = await consumer.committed(tp)
            if committed is None:
                committed = (await consumer.beginning_offsets([tp]))[tp]
            await consumer.commit({tp: committed})
        except (KafkaError, AssertionError) as exc:
            log.warning("%s: not re-opened, the group may have moved it (%r)", tp, exc)
            return False
        return True

    # --- rebalances --------------------------------------------------------------------

    async def assigned(
        self, consumer: AIOKafkaConsumer, partitions: Collection[TopicPartition]
    ) -> list[TopicPartition]:
        """Open each new partition's producer (fencing its previous owner), then read the partition from
        its committed offset, final only now; returns the partitions ready (the others stay paused)."""
        self.consumer = consumer
        # In partition order, not a set's (which follows str hashing): the simulation replays a seed in any
        # interpreter only if the producers open in the same order.
        in_order = sorted(partitions)
        opened = await asyncio.gather(*(self._open(tp) for tp in in_order), return_exceptions=True)
        ready = []
        for tp, outcome in zip(in_order, opened, strict=True):
            if isinstance(outcome, BaseException):
                log.error("%s: its transactional producer did not open (%r); the partition stays paused until "
                          "one does", tp, outcome)  # fmt: skip
                self._open_later(tp)
                continue
            ready.append(tp)
        if not ready:
            return []
        try:
            await consumer.seek_to_committed(*ready)
        except (KafkaError, AssertionError) as exc:
            # Reassigned meanwhile (IllegalStateError), or the coordinator away: paused until it answers.
            log.error("reading the committed offsets of %s failed (%r); they stay paused until it answers",
                      ready, exc)  # fmt: skip
            for tp in ready:
                self._open_later(tp)
            return []
        return ready

    def _open_later(self, tp: TopicPartition) -> None:
        """Keep ``tp`` paused and open its producer, then position it, in a task of its own."""
        self.unready.add(tp)
        if tp not in self._replacing:
            self._bring_back(tp, self._open_until_ready(tp), "open-producer")

    async def _open_until_ready(self, tp: TopicPartition) -> None:
        """Until the partition's producer is open (fencing its previous owner) and the partition sought to its
        committed offset, then read; or until the partition is no longer ours."""
        delay = 0.5
        while (
            (consumer := self.consumer) is not None
            and tp in consumer.assignment()
            and self._bringing_back(tp)
        ):
            await asyncio.sleep(delay)  # the broker is away, or the group is moving the partition
            delay = min(delay * 2, 10.0)
            try:
                if not await self._still_owned(tp):
                    continue
                if tp not in self._producers:
                    producer = await self._started(tp)
                    if not self._bringing_back(tp):
                        await stop_producer(producer)  # let go meanwhile
                        return
                    self._producers[tp] = producer
                await consumer.seek_to_committed(tp)
            except Exception as exc:  # whatever it is, the partition must not stay paused for good
                log.warning("%s: still not ready to be read (%r); trying again", tp, exc)
                continue
            if not self._bringing_back(tp):
                return
            log.info(
                "%s: its transactional producer is open; the partition is read from its committed offset", tp
            )
            self.unready.discard(tp)
            self.on_ready(tp)
            return

    async def _open(self, tp: TopicPartition) -> None:
        """Start the partition's producer and put it in service."""
        self._producers[tp] = await self._started(tp)

    async def _started(self, tp: TopicPartition) -> AIOKafkaProducer:
        """The partition's producer, started (bounded), not yet in service."""
        producer = self._producer(transactional_id(self.settings.group_id, tp))
        try:
            async with asyncio.timeout(OPEN_TIMEOUT_S):
                await producer.start()  # InitProducerId: the epoch moves on, the previous owner is fenced
        except BaseException:
            await stop_producer(producer)
            raise
        return producer

    async def revoked(self, partitions: Collection[TopicPartition], wait_s: float | None = None) -> None:
        """Let a transaction in progress end (for ``wait_s``, default half the session), drop held answers, take
        the partitions' producers out of service (each closed in the background: the rebalance need not wait
        for a broker that is away; the partition's next producer fences it anyway)."""
        wait_s = self.settings.session_timeout_ms / 2000 if wait_s is None else wait_s

        async def close(tp: TopicPartition) -> None:
            replacing = self._replacing.pop(tp, None)
            if replacing is not None:
                replacing.cancel()  # a lost cancellation ends it at its next step (_bringing_back)
                await asyncio.wait([replacing], timeout=wait_s)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    async with self._locks.setdefault(tp, asyncio.Lock()):
                        pass
            producer = self._producers.pop(tp, None)
            if producer is not None:
                stopping = asyncio.create_task(
                    stop_producer(producer), name=f"stop-producer:{tp.topic}:{tp.partition}"
                )
                self._stopping.add(stopping)
                stopping.add_done_callback(self._stopping.discard)

        await asyncio.gather(*(close(tp) for tp in sorted(partitions)))  # in partition order, as in assigned
        self.unready.difference_update(partitions)
        for tp in partitions:
            self._committed.pop(
                tp, None
            )  # the flow forgot them first: what is held is stale, counted until let go
            self._drop_stale(tp)

    async def close(self) -> None:
        """Close every producer (bounded): what was not committed is read again by the next owner."""
        replacing, self._replacing = list(self._replacing.values()), {}
        for task in replacing:
            task.cancel()
        if replacing:
            await asyncio.wait(replacing, timeout=CLOSE_TIMEOUT_S)
        producers, self._producers = list(self._producers.values()), {}
        await asyncio.gather(*(stop_producer(p) for p in producers), *self._stopping)


async def stop_producer(producer: AIOKafkaProducer) -> None:
    """Stop a producer within CLOSE_TIMEOUT_S whatever the broker does."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await producer.stop()
    except Exception as exc:
        log.warning("closing a transactional producer failed: %r", exc)
