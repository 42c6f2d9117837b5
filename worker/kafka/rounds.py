"""A fetched round's coordinates: its records' partitions and offsets, each partition's first offset."""

from __future__ import annotations

from typing import Any

from aiokafka import ConsumerRecord, TopicPartition

from worker.kafka.fetching import Fetched


def tp_of(record: ConsumerRecord[Any, Any]) -> TopicPartition:
    """The partition a record came from."""
    return TopicPartition(record.topic, record.partition)


def coordinates(fetched: Fetched) -> list[tuple[TopicPartition, int]]:
    """Partition and offset of every record of a round, undecodable ones included."""
    return [(tp_of(r), r.offset) for r in fetched.records] + [(u.tp, u.offset) for u in fetched.undecodable]


def partitions_of(fetched: Fetched) -> set[TopicPartition]:
    """The partitions a round's records came from."""
    return {tp for tp, _ in coordinates(fetched)}


def first_offsets(fetched: Fetched) -> dict[TopicPartition, int]:
    """Each partition of a round, with the round's first offset of it."""
    first: dict[TopicPartition, int] = {}
    for tp, offset in coordinates(fetched):
        first[tp] = min(offset, first.get(tp, offset))
    return first
