"""The worker's own fetch loop over aiokafka: a fault in one partition never costs another's records.

aiokafka's ``getmany()`` drains partitions one after another and moves each one's position
as it goes; when decoding a later partition raises (a header name that is not UTF-8, a codec
the client lacks, a corrupt batch), the exception escapes and the records already drained
from the earlier partitions are gone, their positions moved past them
(``Fetcher.fetched_records`` in aiokafka 0.14). So records are taken one partition per call
here: an exception then belongs to exactly one partition, and that partition's position has
not moved. A partition that failed is read one record at a time until it passes the failing
position; a record that still cannot be decoded after ``max_attempts`` is skipped (the caller
publishes a DLQ record for it before its offset may be committed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import (
    ConsumerStoppedError,
    CorruptRecordException,
    KafkaError,
    RecordTooLargeError,
    UnsupportedCodecError,
)

log = logging.getLogger(__name__)

#: Raised while a record's bytes are unpacked: the fault is in the record, not the broker.
CONTENT_ERRORS: tuple[type[BaseException], ...] = (
    UnicodeDecodeError,
    UnsupportedCodecError,
    CorruptRecordException,
    ValueError,
    IndexError,
    KeyError,
    TypeError,
    AssertionError,
)

#: Fetch rounds polled partition by partition after a decode error that named no partition.
SUSPECT_ROUNDS = 100
#: Pause between rounds while a failing partition is read one record at a time, and while no
#: partition is assigned: short, because these rounds poll instead of waiting on the client.
POLL_MS = 20
#: Pause between rounds while no partition is assigned (a member without partitions idles).
UNASSIGNED_POLL_MS = 100


@dataclass(frozen=True)
class Undecodable:
    """A record the client library could not decode, skipped after the allowed attempts."""

    tp: TopicPartition
    offset: int
    error: str


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


class BrokerWait:
    """How long the broker may hold the consumer's fetches: short while records flow, longer the longer
    the worker has been idle.

    Apache Kafka answers a fetch as soon as records arrive, so there the wait costs only the
    empty fetches of an idle consumer (1000 / wait_ms a second). tansu answers only when the wait
    runs out, so there it is also latency. Short while busy keeps that latency low under load;
    doubled after each fetch round that found nothing, up to ``idle_ms``, it keeps a worker idle for
    long (and the broker answering it) near zero CPU, while a stream that pauses for a second or two
    resumes with a short wait: on tansu the first request after an idle spell pays up to the wait
    reached, on Kafka nothing. aiokafka reads ``Fetcher._fetch_max_wait_ms`` each time it builds a
    fetch request (aiokafka 0.14, ``Fetcher._get_actions_per_node``); there is no public setter.
    """

    def __init__(self, consumer: AIOKafkaConsumer, busy_ms: int, idle_ms: int) -> None:
        self._fetcher = getattr(consumer, "_fetcher", None)
        self.busy_ms = busy_ms
        self.idle_ms = max(idle_ms, busy_ms)
        self.wait_ms = busy_ms
        """The wait the next fetch request will carry."""
        if self._fetcher is not None and not hasattr(self._fetcher, "_fetch_max_wait_ms"):
            log.warning("this aiokafka keeps no _fetch_max_wait_ms: the fetch wait stays %d ms", busy_ms)
            self._fetcher = None

    def round_ended(self, found: bool) -> None:
        """A fetch round found records (back to the busy wait) or none (the wait doubles, up to idle_ms)."""
        wait = self.busy_ms if found else min(self.idle_ms, max(2 * self.wait_ms, 1))
        if wait != self.wait_ms:
            self.wait_ms = wait
            if self._fetcher is not None:
                self._fetcher._fetch_max_wait_ms = wait


class PartitionFetcher:
    """Takes records from a started, subscribed consumer one partition per call."""

    def __init__(
        self, consumer: AIOKafkaConsumer, *, max_attempts: int = 3, broker_wait: BrokerWait | None = None
    ) -> None:
        self.consumer = consumer
        self.max_attempts = max_attempts
        #: lengthened after each round that found nothing, back to the busy wait on the first record
        self.broker_wait = broker_wait
        #: partition -> (position that failed, failures there); such partitions are read one record at a time
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

    async def fetch(self, max_records: int, timeout_ms: int, max_bytes: int | None = None) -> Fetched:
        """Up to ``max_records`` records from the assigned, unpaused partitions; waits up to ``timeout_ms``.

        With ``max_bytes``, no further partition is read once the round holds that many value bytes
        (one partition's buffered records may go past it).
        """
        fetchable = sorted(self.consumer.assignment() - self.consumer.paused())
        out = Fetched([], [])
        if not fetchable or max_records <= 0 or (max_bytes is not None and max_bytes <= 0):
            # Nothing to read (no partitions yet, or all paused): wait instead of spinning.
            await asyncio.sleep(UNASSIGNED_POLL_MS / 1000)
            return out
        for tp in fetchable:
            room = max_records - len(out.records)
            if room <= 0 or (max_bytes is not None and out.value_bytes >= max_bytes):
                break
            await self._take(tp, 1 if tp in self._failing else room, out)
        if out.empty and (self._failing or self._suspect_rounds):
            # A failure not yet located or passed: poll one partition per call, so the fault shows
            # in the partition that has it (a multi-partition wait would hide whose it is).
            self._suspect_rounds = max(0, self._suspect_rounds - 1)
            await asyncio.sleep(min(timeout_ms, POLL_MS) / 1000)
        elif out.empty:
            await self._wait(timeout_ms, out)
        if self.broker_wait is not None and out.records:
            self.broker_wait.round_ended(found=True)
        return out

    async def _take(self, tp: TopicPartition, limit: int, out: Fetched) -> None:
        try:
            taken = await self.consumer.getmany(tp, timeout_ms=0, max_records=limit)
        except ConsumerStoppedError:
            raise
        except CONTENT_ERRORS as exc:
            skipped = await self._failed(tp, exc)
            if skipped is not None:
                out.undecodable.append(skipped)
            return
        except RecordTooLargeError as exc:
            out.undecodable += _skipped_as_too_large(exc)
            return
        except KafkaError as exc:
            self._broker_error(exc)
            return
        records = taken.get(tp, [])
        if records:
            self.consecutive_errors = 0
            out.records.extend(records)
        elif tp in self._failing and await self.consumer.position(tp) > self._failing[tp][0]:
            # Everything buffered since the failure decoded: back to whole batches.
            del self._failing[tp]

    async def _wait(self, timeout_ms: int, out: Fetched) -> None:
        """Nothing buffered: wait for the next fetch, taking at most one record so a fault costs nothing.

        With ``max_records=1`` aiokafka stops at the first record, so no other partition has been
        drained when it raises; which partition failed shows on the next round, one partition per call.
        It returns as soon as a record arrives, so a long ``timeout_ms`` costs no latency; it names
        no partition, so one assigned during the wait counts too (paused ones return nothing).
        """
        try:
            taken = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=1)
        except ConsumerStoppedError:
            raise
        except CONTENT_ERRORS as exc:
            log.debug("a record failed to decode while waiting (%r); locating it", exc)
            self._suspect_rounds = SUSPECT_ROUNDS
            return
        except RecordTooLargeError as exc:
            out.undecodable += _skipped_as_too_large(exc)
            return
        except KafkaError as exc:
            self._broker_error(exc)
            return
        for records in taken.values():
            if records:
                self.consecutive_errors = 0
            out.records.extend(records)
        if not out.records and self.broker_wait is not None:
            self.broker_wait.round_ended(found=False)

    def _broker_error(self, exc: KafkaError) -> None:
        self.consecutive_errors += 1
        self.last_error = repr(exc)
        log.warning("fetching failed (%d in a row): %r", self.consecutive_errors, exc)

    async def _failed(self, tp: TopicPartition, exc: BaseException) -> Undecodable | None:
        """Count a decode failure at the partition's position; skip the record there after max_attempts."""
        self._suspect_rounds = 0
        position = await self.consumer.position(tp)
        at, count = self._failing.get(tp, (position, 0))
        count = count + 1 if at == position else 1
        log.warning("%s offset %d cannot be decoded (attempt %d): %r", tp, position, count, exc)
        if count < self.max_attempts:
            self._failing[tp] = (position, count)
            return None
        # Skip it; the partition stays one-at-a-time until it passes, in case its neighbours fail too.
        self._failing[tp] = (position + 1, 0)
        self.consumer.seek(tp, position + 1)
        return Undecodable(tp, position, f"{type(exc).__name__}: {exc}"[:500])


def _skipped_as_too_large(exc: RecordTooLargeError) -> list[Undecodable]:
    """A record larger than max_partition_fetch_bytes: aiokafka has already moved past it, silently.

    Its error carries the partition and offset (``Fetcher._proc_fetch_request`` in aiokafka 0.14):
    the skipped record becomes a DLQ record instead of a silent loss.
    """
    args = exc.args
    if len(args) >= 3 and isinstance(args[1], TopicPartition) and isinstance(args[2], int):
        log.error("%s offset %d is larger than the fetch size; skipped to the DLQ", args[1], args[2])
        return [Undecodable(args[1], args[2], "the record is larger than the consumer's fetch size")]
    log.error("a record larger than the fetch size was skipped where it cannot be named: %r", exc)
    return []
