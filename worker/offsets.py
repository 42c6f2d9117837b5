"""Per-partition offset tracking: commit only past a contiguous run of answered messages.

Invariant 1 of DESIGN.md lives here: a partition's committable position advances over
an offset only when that message, and every earlier one tracked in the partition, has
had its reply acknowledged by the broker. The tracker also counts the bytes that
unanswered messages hold, so backpressure can bound memory in bytes, not only in count.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator
from typing import Generic, TypeVar

P = TypeVar("P", bound=Hashable)

#: The value of an answered offset in a partition's pending map (unanswered ones hold their bytes).
_ANSWERED = -1


class OffsetTracker(Generic[P]):
    """Tracks in-flight offsets per partition, the bytes they hold, and the position safe to commit."""

    def __init__(self) -> None:
        self._pending: dict[P, OrderedDict[int, int]] = {}
        self._committable: dict[P, int] = {}
        self._in_flight = 0
        self._bytes = 0

    @property
    def in_flight(self) -> int:
        """Messages tracked but not yet answered, over all partitions."""
        return self._in_flight

    @property
    def bytes_in_flight(self) -> int:
        """Bytes held by unanswered messages (as reported to ``track`` and ``add_bytes``)."""
        return self._bytes

    def track(self, partition: P, offset: int, nbytes: int = 0) -> None:
        """Register a fetched message; offsets of one partition arrive in increasing order."""
        pending = self._pending.setdefault(partition, OrderedDict())
        if offset in pending:
            return  # a redelivery of a message still in flight: one answer covers both
        if pending and offset < next(reversed(pending)):
            raise ValueError(f"offset {offset} of {partition!r} arrived out of order")
        pending[offset] = max(0, nbytes)
        self._in_flight += 1
        self._bytes += max(0, nbytes)

    def add_bytes(self, partition: P, offset: int, nbytes: int) -> None:
        """Count more bytes held by an unanswered message (its prepared arrays, say)."""
        pending = self._pending.get(partition)
        if pending is None or pending.get(offset, _ANSWERED) == _ANSWERED or nbytes <= 0:
            return
        pending[offset] += nbytes
        self._bytes += nbytes

    def done(self, partition: P, offset: int) -> None:
        """Mark a message answered (its reply acknowledged by the broker)."""
        pending = self._pending.get(partition)
        if pending is None or pending.get(offset, _ANSWERED) == _ANSWERED:
            return
        self._bytes -= pending[offset]
        pending[offset] = _ANSWERED
        self._in_flight -= 1
        while pending and pending[next(iter(pending))] == _ANSWERED:
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
        return sum(1 for pending in chosen.values() for held in pending.values() if held != _ANSWERED)

    def unanswered(self, partition: P) -> Iterator[int]:
        """The partition's unanswered offsets, oldest first (exactly-once delivery publishes in this order)."""
        return (offset for offset, held in self._pending.get(partition, {}).items() if held != _ANSWERED)

    def rewind(self, partition: P, offset: int) -> None:
        """Forget ``offset`` and everything after it in ``partition``: they will be read again.

        Answers that arrive later for forgotten offsets are ignored; nothing at or past
        ``offset`` is committed until it is tracked and answered anew.
        """
        pending = self._pending.get(partition)
        if not pending:
            return
        for later in [o for o in pending if o >= offset]:
            held = pending.pop(later)
            if held != _ANSWERED:
                self._in_flight -= 1
                self._bytes -= held

    def forget(self, partitions: Iterable[P]) -> None:
        """Drop partitions we no longer own; their unanswered messages will be redelivered elsewhere."""
        for partition in partitions:
            pending = self._pending.pop(partition, None)
            for held in (pending or {}).values():
                if held != _ANSWERED:
                    self._in_flight -= 1
                    self._bytes -= held
            self._committable.pop(partition, None)
