"""The worker's own fetch loop over aiokafka: a fault in one partition never costs another's records.

aiokafka's ``getmany()`` drains partitions one after another and moves each one's position
as it goes; when decoding a later partition raises (a header name that is not UTF-8, a codec
the client lacks, a corrupt batch, compressed bytes that do not inflate), the exception escapes
and the records already drained from the earlier partitions are gone, their positions moved
past them (``Fetcher.fetched_records`` in aiokafka 0.14). So records are taken one partition per
call here: an exception then belongs to exactly one partition, and that partition's position has
not moved. After ``max_attempts`` failures at the same position the batch holding it is read
record by record below the consumer (``worker.kafka.record_batches``): the records that decode are
taken, each one that does not is skipped (the caller publishes a DLQ record for it before its
offset may be committed), and the partition goes on after them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import ConsumerStoppedError, KafkaError, RecordTooLargeError

from worker.arrivals import ArrivalRate
from worker.kafka.broker_wait import BrokerWait
from worker.kafka.decode_failures import Undecodable, _in_the_records, _skipped_as_too_large, _trackable_part
from worker.kafka.record_batches import BatchRead, LeaderBatches

log = logging.getLogger(__name__)

#: Fetch rounds polled partition by partition after a decode error that named no partition.
SUSPECT_ROUNDS = 100
#: Pause between rounds while a failing partition is read one record at a time, and while no
#: partition is assigned: short, because these rounds poll instead of waiting on the client.
POLL_MS = 20
#: Pause between rounds while no partition is assigned (a member without partitions idles).
UNASSIGNED_POLL_MS = 100


@dataclass
class Fetched:
    """One round of fetching: decoded records (per partition in offset order) and skipped ones."""

    records: list[ConsumerRecord[Any, Any]]
    undecodable: list[Undecodable]

    @property
    def empty(self) -> bool:
        return not self.records and not self.undecodable

    @property
    def value_bytes(self) -> int:
        return sum(len(r.value or b"") for r in self.records)


class BatchReader(Protocol):
    """Reads the batch holding an offset record by record, past records the consumer cannot decode.

    The seam a simulated consumer fakes; ``worker.kafka.record_batches.LeaderBatches`` is the real one.
    """

    async def read(self, tp: TopicPartition, offset: int, limit: int) -> BatchRead | None:
        """The batch of ``tp`` holding ``offset`` from there on (at most ``limit`` records); None: unknown."""
        ...


class PartitionFetcher:
    """Takes records from a started, subscribed consumer one partition per call."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        *,
        max_attempts: int = 3,
        broker_wait: BrokerWait | None = None,
        batches: BatchReader | None = None,
        idle_poll: Callable[[int], Awaitable[None]] | None = None,
        linger_ms: int = 0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """``idle_poll(wait_ms)``: how to wait while every assigned partition is paused (the flow's
        ``keep_membership``, which polls the consumer so the group keeps this member); default a sleep.
        ``linger_ms``: how long a round that waited for its first record waits for more, while the
        arrival rate says more come within it (``clock``, default the loop's, times the rate)."""
        self.consumer = consumer
        self.linger_s = linger_ms / 1000
        self._clock = clock
        #: records fetched per second, recently
        self.arrivals = ArrivalRate()
        self.idle_poll = idle_poll
        self.max_attempts = max_attempts
        #: lengthened after each round that found nothing, back to the busy wait on the first record
        self.broker_wait = broker_wait
        #: reads a failing batch record by record once the consumer failed there max_attempts times
        self.batches: BatchReader = batches if batches is not None else LeaderBatches(consumer)
        #: partition -> (position that failed, failures there), until the partition gets past it
        self._failing: dict[TopicPartition, tuple[int, int]] = {}
        #: rounds left to poll partition by partition after an error that named no partition
        self._suspect_rounds = 0
        #: consecutive rounds that ended in an error of the broker or the client (not of one record)
        self.consecutive_errors = 0
        self.last_error: str | None = None

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop the failure state of partitions this member no longer owns."""
        for tp in partitions:
            self._failing.pop(tp, None)

    def round_failed(self, exc: BaseException) -> None:
        """Count a fetch round that ended in an error of the broker or the client (readiness reads the count)."""
        self.consecutive_errors += 1
        self.last_error = repr(exc)

    async def fetch(self, max_records: int, timeout_ms: int, max_bytes: int | None = None) -> Fetched:
        """Up to ``max_records`` records from the assigned, unpaused partitions; waits up to ``timeout_ms``.

        With ``max_bytes``, no further partition is read once the round holds that many value bytes
        (one partition's buffered records, or one batch read past a failure, may go past it).
        """
        fetchable = sorted(self.consumer.assignment() - self.consumer.paused())
        out = Fetched([], [])
        if not fetchable or max_records <= 0 or (max_bytes is not None and max_bytes <= 0):
            # Nothing to read (no partitions yet, or all paused): wait instead of spinning. Paused
            # for long (a record run alone after a crash, say), a consumer that is not polled leaves
            # its group after max_poll_interval_ms: the idle poll keeps it in.
            if self.idle_poll is not None:
                await self.idle_poll(UNASSIGNED_POLL_MS)
            else:
                await asyncio.sleep(UNASSIGNED_POLL_MS / 1000)
            return out
        await self._take_buffered(max_records, max_bytes, out)
        if out.empty and (self._failing or self._suspect_rounds):
            # A failure not yet located or passed: poll one partition per call, so the fault shows
            # in the partition that has it (a multi-partition wait would hide whose it is).
            self._suspect_rounds = max(0, self._suspect_rounds - 1)
            await asyncio.sleep(min(timeout_ms, POLL_MS) / 1000)
        elif out.empty:
            await self._wait(timeout_ms, out)
            if out.records:
                # The rest of the fetch that brought the first record is in hand: the same round takes it.
                await self._take_buffered(max_records, max_bytes, out)
                if self._lingers():
                    await self._linger(max_records, max_bytes, out)
        if out.records:
            self.arrivals.add(self._now(), len(out.records))
            if self.broker_wait is not None:
                self.broker_wait.round_ended(found=True)
        return out

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def _lingers(self) -> bool:
        return self.linger_s > 0 and self.arrivals.expected(self._now(), self.linger_s) >= 1

    async def _linger(self, max_records: int, max_bytes: int | None, out: Fetched) -> None:
        """A steady stream: the next records are due within the linger, so this round takes what arrives
        in it, instead of a round (a crash marker, an intake pass, a batch) for each record.

        aiokafka fetches a partition again only once its last fetch is read to the end, so the records
        are taken as they come (each wait wakes on the next one), not once the linger is over.
        """
        deadline = self._now() + self.linger_s
        while True:
            left_ms = int((deadline - self._now()) * 1000)
            if left_ms <= 0 or _full(out, max_records, max_bytes) or self._suspect_rounds or self._failing:
                return
            before = len(out.records) + len(out.undecodable)
            await self._wait(left_ms, out, idle_when_empty=False)
            if len(out.records) + len(out.undecodable) == before:
                return  # nothing more came within the linger, or a fault to locate next round
            await self._take_buffered(max_records, max_bytes, out)

    async def _take_buffered(self, max_records: int, max_bytes: int | None, out: Fetched) -> None:
        """What the consumer holds of each assigned, unpaused partition, until the round is full."""
        for tp in sorted(self.consumer.assignment() - self.consumer.paused()):
            if _full(out, max_records, max_bytes):
                break
            await self._take(tp, max_records - len(out.records), out)

    async def _getmany(
        self,
        out: Fetched,
        on_content: Callable[[Exception], Awaitable[None]],
        *partitions: TopicPartition,
        timeout_ms: int,
        max_records: int,
    ) -> dict[TopicPartition, list[ConsumerRecord[Any, Any]]] | None:
        """The consumer's getmany; None after a fault, which went where it belongs: a record too large
        to the round's undecodable ones, one in the records' bytes to ``on_content``, else the broker's."""
        try:
            taken: dict[TopicPartition, list[ConsumerRecord[Any, Any]]] = await self.consumer.getmany(
                *partitions, timeout_ms=timeout_ms, max_records=max_records
            )
        except ConsumerStoppedError:
            raise
        except RecordTooLargeError as exc:
            out.undecodable += _skipped_as_too_large(exc)
            return None
        except Exception as exc:
            if _in_the_records(exc):
                await on_content(exc)
            else:
                self._broker_error(exc)
            return None
        return taken

    async def _take(self, tp: TopicPartition, limit: int, out: Fetched) -> None:
        taken = await self._getmany(
            out, lambda exc: self._failed(tp, limit, exc, out), tp, timeout_ms=0, max_records=limit
        )
        if taken is None:
            return
        records = taken.get(tp, [])
        if records:
            self.consecutive_errors = 0
            out.records.extend(records)
            self._failing.pop(tp, None)
        elif tp in self._failing and await self.consumer.position(tp) != self._failing[tp][0]:
            # Moved away from the failure (a seek, a rewind): it is counted again if it recurs.
            del self._failing[tp]

    async def _wait(self, timeout_ms: int, out: Fetched, *, idle_when_empty: bool = True) -> None:
        """Nothing buffered: wait for the next fetch, taking at most one record so a fault costs nothing.

        With ``max_records=1`` aiokafka stops at the first record, so no other partition has been
        drained when it raises; which partition failed shows on the next round, one partition per call.
        It returns as soon as a record arrives, so a long ``timeout_ms`` costs no latency; it names
        no partition, so one assigned during the wait counts too (paused ones return nothing).
        """
        taken = await self._getmany(out, self._locate, timeout_ms=timeout_ms, max_records=1)
        if taken is None:
            return
        for records in taken.values():
            if records:
                self.consecutive_errors = 0
            out.records.extend(records)
        if not out.records and self.broker_wait is not None and idle_when_empty:
            self.broker_wait.round_ended(found=False)

    async def _locate(self, exc: Exception) -> None:
        """A record failed to decode during a wait that named no partition: the next rounds find it."""
        log.debug("a record failed to decode while waiting (%r); locating it", exc)
        self._suspect_rounds = SUSPECT_ROUNDS

    def _broker_error(self, exc: BaseException) -> None:
        self.round_failed(exc)
        log.warning("fetching failed (%d in a row): %r", self.consecutive_errors, exc)

    async def _failed(self, tp: TopicPartition, limit: int, exc: BaseException, out: Fetched) -> None:
        """Count a decode failure at the partition's position; after max_attempts read its batch record by record.

        The failing record may be anywhere in the batch aiokafka decodes from its first offset:
        ``self.batches`` returns the batch's records from the position on, each one that does not
        decode named on its own, and the partition goes on after them.
        """
        self._suspect_rounds = 0
        position = await self.consumer.position(tp)
        at, count = self._failing.get(tp, (position, 0))
        count = count + 1 if at == position else 1
        self._failing[tp] = (position, count)
        log.warning("%s cannot be decoded from offset %d (attempt %d): %r", tp, position, count, exc)
        if count < self.max_attempts:
            return
        try:
            read = await self.batches.read(tp, position, limit)
        except KafkaError as error:
            self._broker_error(error)  # the failure stays counted: read again next round
            return
        del self._failing[tp]
        if tp not in self.consumer.assignment() or await self.consumer.position(tp) != position:
            return  # revoked, rewound or reassigned while it was read: fetched again from where it is now
        if read is None or read.next_offset <= position:
            # Nothing could be read past the position: the record there is the one skipped.
            out.undecodable.append(Undecodable(tp, position, f"{type(exc).__name__}: {exc}"[:500]))
            self.consumer.seek(tp, position + 1)
            return
        records, failed, resume = _trackable_part(read)
        for offset, why in failed:
            log.warning("%s offset %d cannot be decoded; skipped to the DLQ: %s", tp, offset, why)
        out.records.extend(records)
        out.undecodable += [Undecodable(tp, offset, why) for offset, why in failed]
        self.consumer.seek(tp, resume)


def _full(out: Fetched, max_records: int, max_bytes: int | None) -> bool:
    """Whether a round holds ``max_records`` records or, with ``max_bytes``, that many value bytes."""
    return len(out.records) >= max_records or (max_bytes is not None and out.value_bytes >= max_bytes)
