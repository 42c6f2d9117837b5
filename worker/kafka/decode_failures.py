"""Records the client cannot decode: which errors are a record's own, what of a batch read record by record
one round takes, and a record too large for the fetch named instead of lost."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import CorruptRecordException, KafkaError, RecordTooLargeError, UnsupportedCodecError

from worker.kafka.record_batches import BatchRead

# The fetcher's logger: its records keep the name operators and tests filter by.
log = logging.getLogger("worker.kafka.fetching")

#: The KafkaErrors aiokafka raises while it unpacks a record's bytes: the fault is in the record, not
#: the broker. Whatever else that is not a KafkaError (UnicodeDecodeError, zlib.error,
#: cramjam.DecompressionError, ...) counts as the record's too: see ``_in_the_records``.
CONTENT_KAFKA_ERRORS: tuple[type[KafkaError], ...] = (UnsupportedCodecError, CorruptRecordException)


@dataclass(frozen=True)
class Undecodable:
    """A record the client library could not decode, skipped after the allowed attempts."""

    tp: TopicPartition
    offset: int
    error: str


def _trackable_part(read: BatchRead) -> tuple[list[ConsumerRecord[Any, Any]], list[tuple[int, str]], int]:
    """What of a batch read one round can hand over, and the offset to go on from.

    A round's records are tracked before its skipped ones, and a partition's offsets must be
    tracked in order: so the records before the first failure, then the failures up to the next
    good record. The partition goes on from there; the rest of the batch comes in later rounds.
    """
    if not read.failed:
        return read.records, [], read.next_offset
    first_failure = read.failed[0][0]
    later = [r.offset for r in read.records if r.offset > first_failure]
    resume = later[0] if later else read.next_offset
    before = [r for r in read.records if r.offset < first_failure]
    return before, [(offset, why) for offset, why in read.failed if offset < resume], resume


def _in_the_records(exc: BaseException) -> bool:
    """Whether an exception of ``getmany`` came from a record's bytes rather than the broker or the network.

    aiokafka raises a KafkaError for what the broker or the network did; what its decoders raise
    on the bytes is anything else, or one of CONTENT_KAFKA_ERRORS.
    """
    return not isinstance(exc, KafkaError) or isinstance(exc, CONTENT_KAFKA_ERRORS)


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
