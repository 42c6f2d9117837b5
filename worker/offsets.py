"""Per-partition offset tracking: commit only past a contiguous run of answered messages.

Invariant 1 of DESIGN.md lives here: a partition's committable position advances over
an offset only when that message, and every earlier one tracked in the partition, has
had its reply acknowledged by the broker.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

P = TypeVar("P", bound=Hashable)


class OffsetTracker(Generic[P]):
    """Tracks in-flight offsets per partition and the position that is safe to commit."""

    def __init__(self) -> None:
        self._pending: dict[P, OrderedDict[int, bool]] = {}
        self._committable: dict[P, int] = {}
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        """Messages tracked but not yet answered, over all partitions."""
        return self._in_flight

    def track(self, partition: P, offset: int) -> None:
        """Register a fetched message; offsets of one partition arrive in increasing order."""
        pending = self._pending.setdefault(partition, OrderedDict())
        if offset in pending:
            return  # a redelivery of a message still in flight: one answer covers both
        if pending and offset < next(reversed(pending)):
            raise ValueError(f"offset {offset} of {partition!r} arrived out of order")
        pending[offset] = False
        self._in_flight += 1

    def done(self, partition: P, offset: int) -> None:
        """Mark a message answered (its reply acknowledged by the broker)."""
        pending = self._pending.get(partition)
        if pending is None or pending.get(offset) is not False:
            return
        pending[offset] = True
        self._in_flight -= 1
        while pending and pending[next(iter(pending))]:
            first, _ = pending.popitem(last=False)
            self._committable[partition] = first + 1

    def take_commits(self) -> dict[P, int]:
        """Positions that advanced since the last call (the next offset to read, Kafka style)."""
        commits, self._committable = self._committable, {}
        return commits

    def pending(self, partitions: Iterable[P] | None = None) -> int:
        """Unanswered messages in ``partitions`` (all when None)."""
        chosen = (
            self._pending
            if partitions is None
            else {p: self._pending.get(p, OrderedDict()) for p in partitions}
        )
        return sum(1 for pending in chosen.values() for answered in pending.values() if not answered)

    def forget(self, partitions: Iterable[P]) -> None:
        """Drop partitions we no longer own; their unanswered messages will be redelivered elsewhere."""
        for partition in partitions:
            pending = self._pending.pop(partition, None)
            if pending:
                self._in_flight -= sum(1 for answered in pending.values() if not answered)
            self._committable.pop(partition, None)
