"""worker.kafka.record_batches, the one module below aiokafka's public API: its assumptions pinned, its decoding alone,
and how the fetcher hands a read over to a round.

The batches are built with aiokafka's own record builder (as its producer builds them) and
the expected records are the ones the test put in; no broker is needed to decode bytes.
The path through a real broker is tested in tests/test_production_kafka.py.
"""

from __future__ import annotations

import struct
import tomllib
from pathlib import Path

import aiokafka
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.record.default_records import DefaultRecordBatch
from packaging.requirements import Requirement

from tests.kafka_support import build_batch, spoil_compressed
from worker.kafka.record_batches import decode_batch_at

TP = TopicPartition("inference.text.requests", 2)
NOT_UTF8 = b"\xff\xfe-not-utf8"
CODECS = {
    "none": 0,
    "gzip": DefaultRecordBatch.CODEC_GZIP,
    "snappy": DefaultRecordBatch.CODEC_SNAPPY,
    "lz4": DefaultRecordBatch.CODEC_LZ4,
    "zstd": DefaultRecordBatch.CODEC_ZSTD,
}


class _UndecodableName(str):
    """A header name whose bytes on the wire are not UTF-8 (the pure-Python builder writes them as given)."""

    __slots__ = ()

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return NOT_UTF8


def _values(count: int, tag: str = "r") -> list[bytes]:
    return [f'{{"id": "{tag}-{i}"}}'.encode() for i in range(count)]


def _at(base_offset: int, batch: bytes | bytearray) -> bytes:
    """The batch as the broker stores it at ``base_offset`` (the offset is outside the CRC)."""
    placed = bytearray(batch)
    struct.pack_into(">q", placed, 0, base_offset)
    return bytes(placed)


async def test_the_aiokafka_this_module_reads_below_is_the_one_pinned_in_pyproject() -> None:
    """If this fails, re-read aiokafka's Fetcher/PartitionRecords and the consumer attributes used."""
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    [pinned] = [Requirement(d) for d in project["project"]["dependencies"] if d.startswith("aiokafka")]
    assert pinned.specifier.contains(aiokafka.__version__), (aiokafka.__version__, str(pinned.specifier))
    assert str(pinned.specifier) in ("<0.15,>=0.14", ">=0.14,<0.15")
    consumer = AIOKafkaConsumer(bootstrap_servers="localhost:9", max_partition_fetch_bytes=12345)
    assert consumer._max_partition_fetch_bytes == 12345
    assert consumer._isolation_level == "read_uncommitted"
    assert callable(consumer._client.send) and callable(consumer._client.cluster.leader_for_partition)


@pytest.mark.parametrize("codec", CODECS.values(), ids=CODECS.keys())
def test_a_record_that_does_not_decode_in_the_middle_of_a_batch_costs_only_itself(codec: int) -> None:
    values = _values(20)
    entries: list[tuple[bytes, list[tuple[str, bytes | None]]]] = [(v, [("k", b"v")]) for v in values]
    entries.insert(10, (b"bad", [(_UndecodableName("x"), b"1")]))
    read = decode_batch_at(TP, _at(100, build_batch(entries, codec)), 100, 1000)
    assert read is not None
    assert [(r.offset, r.value, r.headers) for r in read.records] == [
        (100 + i + (i >= 10), v, (("k", b"v"),)) for i, v in enumerate(values)
    ]
    assert {(r.topic, r.partition) for r in read.records} == {(TP.topic, TP.partition)}
    [(offset, why)] = read.failed
    assert offset == 110 and why.startswith("UnicodeDecodeError")
    assert read.next_offset == 121


def test_records_below_the_offset_read_from_are_neither_returned_nor_charged() -> None:
    entries: list[tuple[bytes, list[tuple[str, bytes | None]]]] = [(v, []) for v in _values(6)]
    entries[2] = (b"bad", [(_UndecodableName("x"), None)])
    read = decode_batch_at(TP, _at(0, build_batch(entries)), 3, 1000)
    assert read is not None and read.failed == []
    assert [r.offset for r in read.records] == [3, 4, 5] and read.next_offset == 6


def test_a_read_stops_after_limit_good_records_and_goes_on_from_there() -> None:
    entries: list[tuple[bytes, list[tuple[str, bytes | None]]]] = [(v, []) for v in _values(8)]
    entries[1] = (b"bad", [(_UndecodableName("x"), b"")])
    read = decode_batch_at(TP, _at(0, build_batch(entries)), 0, 3)
    assert read is not None
    assert [r.offset for r in read.records] == [0, 2, 3] and [o for o, _ in read.failed] == [1]
    assert read.next_offset == 4


@pytest.mark.parametrize("codec", [c for c in CODECS.values() if c], ids=[n for n, c in CODECS.items() if c])
def test_a_batch_that_does_not_inflate_names_each_of_its_offsets_from_the_one_read(codec: int) -> None:
    spoilt = spoil_compressed(build_batch([(v, []) for v in _values(5)], codec))
    read = decode_batch_at(TP, _at(40, spoilt), 41, 1000)
    assert read is not None and read.records == []
    assert [offset for offset, _ in read.failed] == [41, 42, 43, 44] and read.next_offset == 45


def test_the_batch_holding_the_offset_is_read_not_its_neighbours() -> None:
    first = _at(0, build_batch([(v, []) for v in _values(3, "a")]))
    second = _at(3, build_batch([(v, []) for v in _values(3, "b")], DefaultRecordBatch.CODEC_GZIP))
    third = _at(6, build_batch([(v, []) for v in _values(3, "c")]))
    read = decode_batch_at(TP, first + second + third, 4, 1000)
    assert read is not None and read.failed == []
    assert [r.value for r in read.records] == _values(3, "b")[1:] and read.next_offset == 6


def test_a_batch_with_a_wrong_crc_names_its_offsets() -> None:
    corrupt = bytearray(_at(7, build_batch([(v, []) for v in _values(2)])))
    corrupt[-1] ^= 0xFF  # a byte of the last record's value: the CRC no longer matches
    read = decode_batch_at(TP, bytes(corrupt), 7, 1000)
    assert read is not None and read.records == []
    assert [o for o, _ in read.failed] == [7, 8] and "CRC" in read.failed[0][1]


def test_nothing_is_decoded_from_a_batch_cut_off_at_the_end_of_the_response() -> None:
    batch = _at(0, build_batch([(v, []) for v in _values(3)]))
    assert decode_batch_at(TP, batch[:-5], 0, 1000) is None
    assert decode_batch_at(TP, b"", 0, 1000) is None


@pytest.mark.parametrize(
    ("bad", "records", "skipped", "resume"),
    [
        ({2}, [0, 1], [2], 3),  # the records before the failure, the failure, then on from the next good one
        ({0, 1}, [], [0, 1], 2),
        ({4}, [0, 1, 2, 3], [4], 5),
        (set(), [0, 1, 2, 3, 4], [], 5),
    ],
)
def test_a_round_hands_over_a_partitions_records_before_its_failures_in_offset_order(
    bad: set[int], records: list[int], skipped: list[int], resume: int
) -> None:
    """The worker tracks a round's records before its skipped ones, each partition in offset order."""
    from worker.kafka.decode_failures import _trackable_part

    entries: list[tuple[bytes, list[tuple[str, bytes | None]]]] = [
        (v, [(_UndecodableName("x"), b"")] if i in bad else []) for i, v in enumerate(_values(5))
    ]
    read = decode_batch_at(TP, _at(0, build_batch(entries)), 0, 1000)
    assert read is not None
    taken, failed, next_offset = _trackable_part(read)
    assert ([r.offset for r in taken], [o for o, _ in failed], next_offset) == (records, skipped, resume)
