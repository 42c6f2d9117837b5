"""Reading the record batch that holds an offset straight from the partition's leader, one record at a time.

aiokafka 0.14 cannot get past a record it fails to decode in the middle of a batch: Kafka
answers a fetch from the first offset of the batch holding the position, and aiokafka decodes
every record of that batch before it drops those below the position
(``PartitionRecords._unpack_records``), so one bad record (a header name that is not UTF-8)
fails every fetch from any later offset of its batch. A compressed batch that does not inflate
raises its codec's own error (``zlib.error``, ``cramjam.DecompressionError``), not a
``KafkaError``. The consumer's only way past either is to seek past the whole batch, losing the
good records in it. ``LeaderBatches`` fetches that one batch with the consumer's own client and
decodes it here record by record: each record that fails is named by its offset, the others are
returned as the consumer would have returned them.

This is the one module that reaches below aiokafka's public API: it reads
``AIOKafkaConsumer._client``, ``_max_partition_fetch_bytes`` and ``_isolation_level``; the rest
(``FetchRequest``, ``DefaultRecordBatch``, ``aiokafka.codec``, ``aiokafka.record.util``) is
public. tests/test_record_batches.py pins it to aiokafka>=0.14,<0.15 (pyproject.toml).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.codec import gzip_decode, lz4_decode, snappy_decode, zstd_decode
from aiokafka.errors import (
    CorruptRecordException,
    KafkaError,
    KafkaTimeoutError,
    LeaderNotAvailableError,
    NoError,
    for_code,
)
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.record.default_records import DefaultRecordBatch
from aiokafka.record.util import decode_varint

#: Base offset (int64) and batch length (int32): the length counts the bytes after these 12.
_FRAMING = struct.Struct(">qi")
#: A v2 batch header is 61 bytes (Kafka protocol guide, "Record Batch"); the magic byte is at 16.
_HEADER_BYTES = 61
_MAGIC_AT = 16
#: Attributes bit 3 of a v2 batch: timestamps are the broker's append time (max_timestamp).
_LOG_APPEND_TIME = 1
_READ_UNCOMMITTED = 0
#: The fetch's wait: the batch is there (the consumer just failed on it), so Kafka answers at once;
#: tansu answers a fetch whose wait is 0 with no partitions at all (measured on tansu 0.6.0, the embedded broker), 1 ms and up
#: with the records.
_WAIT_MS = 10

_INFLATE: dict[int, Callable[[bytes], bytes]] = {
    DefaultRecordBatch.CODEC_GZIP: gzip_decode,
    DefaultRecordBatch.CODEC_SNAPPY: snappy_decode,
    DefaultRecordBatch.CODEC_LZ4: lz4_decode,
    DefaultRecordBatch.CODEC_ZSTD: zstd_decode,
}


@dataclass(frozen=True)
class BatchRead:
    """One batch read from an offset: the records that decoded, those that did not, and where to go on."""

    records: list[ConsumerRecord[bytes, bytes]]
    failed: list[tuple[int, str]]
    """(offset, why) of each record at or after the offset read from that could not be decoded."""
    next_offset: int
    """The partition's position after this read (past the batch, or past the last record returned)."""


class LeaderBatches:
    """Reads the batch holding an offset with a started consumer's own connections (read_uncommitted)."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self.consumer = consumer

    async def read(self, tp: TopicPartition, offset: int, limit: int) -> BatchRead | None:
        """The batch of ``tp`` holding ``offset``, decoded record by record (at most ``limit`` good ones).

        None when there is nothing this reader can decode there (no v2 batch holds the offset,
        or the consumer reads only committed transactions, whose aborted records it would not know);
        a broker's refusal, or an answer without the partition, raises a ``KafkaError``.
        """
        consumer = self.consumer
        if getattr(consumer, "_isolation_level", "read_uncommitted") != "read_uncommitted":
            return None
        client = consumer._client
        leader = client.cluster.leader_for_partition(tp)
        if leader is None or leader == -1:
            raise LeaderNotAvailableError(f"no leader known for {tp}")
        max_bytes = consumer._max_partition_fetch_bytes
        request = FetchRequest(
            _WAIT_MS, 1, max_bytes, _READ_UNCOMMITTED, [(tp.topic, [(tp.partition, offset, max_bytes)])]
        )
        response = await client.send(leader, request)
        for topic, partitions in response.topics:
            for partition, error_code, _highwater, *part_data in partitions:
                if (topic, partition) != (tp.topic, tp.partition):
                    continue
                error: type[KafkaError] = for_code(error_code)
                if error is not NoError:
                    raise error()
                return decode_batch_at(tp, bytes(part_data[-1] or b""), offset, limit)
        raise KafkaTimeoutError(f"the leader's fetch answer holds nothing of {tp}")


def decode_batch_at(tp: TopicPartition, data: bytes, offset: int, limit: int) -> BatchRead | None:
    """The records at or after ``offset`` of the first batch in ``data`` (a fetched record set) holding it.

    Never raises for what the bytes hold: a record that does not decode is named in ``failed``;
    a batch that does not inflate, or whose CRC is wrong, names every offset of it from ``offset`` on.
    None when no complete v2 batch holds the offset.
    """
    pos = 0
    while pos + _FRAMING.size <= len(data):
        _base, length = _FRAMING.unpack_from(data, pos)
        end = pos + _FRAMING.size + length
        if length < _HEADER_BYTES - _FRAMING.size or end > len(data) or data[pos + _MAGIC_AT] != 2:
            return None  # cut off at the end of the response, or an old message format
        raw = data[pos:end]
        pos = end
        batch = DefaultRecordBatch(raw)
        if batch.next_offset <= offset:
            continue
        if batch.is_control_batch:
            return BatchRead([], [], batch.next_offset)
        if not batch.validate_crc():
            return _all_failed(batch, offset, "CorruptRecordException: the batch's CRC does not match")
        # Each codec raises its own type (zlib.error, gzip.BadGzipFile, cramjam.DecompressionError, ...).
        try:
            inflate = _INFLATE.get(batch.compression_type)
            records = bytearray(inflate(raw[_HEADER_BYTES:]) if inflate else raw[_HEADER_BYTES:])
        except Exception as exc:
            return _all_failed(batch, offset, _why(exc))
        return _decode_records(tp, batch, records, offset, limit)
    return None


def _decode_records(
    tp: TopicPartition, batch: DefaultRecordBatch, data: bytearray, offset: int, limit: int
) -> BatchRead:
    out = BatchRead([], [], batch.next_offset)
    expected = batch.base_offset  # the offset of the next record if no offsets were compacted away
    pos = 0
    while pos < len(data):
        try:
            length, start = decode_varint(data, pos)
            if length < 0 or start + length > len(data):
                raise CorruptRecordException(f"a record of {length} bytes runs past its batch")
            pos = start + length
            record_offset, decoded = _decode_record(tp, batch, data[start:pos], expected)
            if not expected <= record_offset < batch.next_offset:
                raise CorruptRecordException(f"a record at offset {record_offset}, outside its batch")
        except Exception as exc:
            # Without a length or an offset to trust, the following records cannot be found or
            # named: the rest of the batch is lost (bytes that inflated to garbage end here too).
            out.failed.extend((o, _why(exc)) for o in range(max(expected, offset), batch.next_offset))
            return out
        expected = record_offset + 1
        if record_offset < offset:
            continue
        if isinstance(decoded, str):
            out.failed.append((record_offset, decoded))
            continue
        out.records.append(decoded)
        if len(out.records) >= limit:
            return BatchRead(out.records, out.failed, record_offset + 1)
    return out


def _decode_record(
    tp: TopicPartition, batch: DefaultRecordBatch, body: bytearray, expected: int
) -> tuple[int, ConsumerRecord[bytes, bytes] | str]:
    """(offset, record) or (offset, why it does not decode); ``expected`` stands in for an unreadable offset."""
    offset = expected
    try:
        pos = 1  # attributes (int8): unused in v2 records
        timestamp_delta, pos = decode_varint(body, pos)
        offset_delta, pos = decode_varint(body, pos)
        offset = batch.base_offset + offset_delta
        key, pos = _nullable_bytes(body, pos)
        value, pos = _nullable_bytes(body, pos)
        count, pos = decode_varint(body, pos)
        if count < 0:
            raise CorruptRecordException(f"a negative header count {count}")
        headers: list[tuple[str, bytes | None]] = []
        for _ in range(count):
            name, pos = _nullable_bytes(body, pos)
            header_value, pos = _nullable_bytes(body, pos)
            if name is None:
                raise CorruptRecordException("a header without a name")
            headers.append((name.decode("utf-8"), header_value))  # a null value stays None, as in aiokafka
        if pos != len(body):
            raise CorruptRecordException(f"{len(body) - pos} bytes left after the record's fields")
    except Exception as exc:  # whatever the bytes make the decoder raise belongs to this record alone
        return offset, _why(exc)
    log_append = batch.timestamp_type == _LOG_APPEND_TIME
    return offset, ConsumerRecord(
        topic=tp.topic,
        partition=tp.partition,
        offset=offset,
        timestamp=batch.max_timestamp if log_append else batch.first_timestamp + timestamp_delta,
        timestamp_type=batch.timestamp_type,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=-1 if key is None else len(key),
        serialized_value_size=-1 if value is None else len(value),
        headers=tuple(headers),
    )


def _nullable_bytes(body: bytearray, pos: int) -> tuple[bytes | None, int]:
    length, pos = decode_varint(body, pos)
    if length < 0:
        return None, pos
    if pos + length > len(body):
        raise CorruptRecordException(f"a field of {length} bytes runs past its record")
    return bytes(body[pos : pos + length]), pos + length


def _all_failed(batch: DefaultRecordBatch, offset: int, why: str) -> BatchRead:
    failed = [(o, why) for o in range(max(batch.base_offset, offset), batch.next_offset)]
    return BatchRead([], failed, batch.next_offset)


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]
