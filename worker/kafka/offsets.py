"""Per-partition offset tracking: commit only past a contiguous run of answered messages.

Invariant 1 of DESIGN.md lives here: a partition's committable position advances over
an offset only when that message, and every earlier one tracked in the partition, has
had its reply acknowledged by the broker. The tracker also counts the messages and bytes
that unanswered work holds, so backpressure can bound memory in bytes, not only in count.

Each partition has an epoch, bumped by every rewind and by every revoke. A message is
tracked with the epoch it was fetched in, and every later call about it names that epoch:
a message fetched before a rewind or a revoke can never be tracked after it, and its answer
or give-up can never move the partition (else its late answer would commit past offsets
that are read again). Work dropped by a rewind or a revoke stays counted ("held") until its
holder settles it (``done`` or ``release``): a running batch still holds its memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Generic, TypeVar

P = TypeVar("P", bound=Hashable)

#: The value of an answered offset in a partition's pending map (unanswered ones hold their bytes).
_ANSWERED = -1


class OffsetTracker(Generic[P]):
    """Tracks in-flight offsets per partition and epoch, the bytes they hold, and the position safe to commit."""

    def __init__(self) -> None:
        #: partition -> offset -> (epoch it was tracked in, bytes held or _ANSWERED)
        self._pending: dict[P, OrderedDict[int, tuple[int, int]]] = {}
        #: (partition, epoch, offset) -> bytes of unanswered work dropped by a rewind or a revoke
        self._held: dict[tuple[P, int, int], int] = {}
        self._epochs: dict[P, int] = {}
        self._committable: dict[P, int] = {}
        self._in_flight = 0
        self._bytes = 0

    @property
    def in_flight(self) -> int:
        """Messages tracked or held but not yet settled, over all partitions."""
        return self._in_flight

    @property
    def bytes_in_flight(self) -> int:
        """Bytes held by unsettled messages (as reported to ``track`` and ``add_bytes``)."""
        return self._bytes

    def epoch(self, partition: P) -> int:
        """The partition's current epoch (0 until its first rewind or revoke)."""
        return self._epochs.get(partition, 0)

    def epochs(self) -> dict[P, int]:
        """A copy of every partition's epoch that moved from 0 (a fetch round's snapshot)."""
        return dict(self._epochs)

    def track(self, partition: P, offset: int, nbytes: int = 0, epoch: int | None = None) -> bool:
        """Register a fetched message (offsets of one partition arrive in increasing order).

        Returns False, tracking nothing, when ``epoch`` (the epoch the message was fetched in;
        None: the current one) is no longer current or the offset is already in flight: the
        caller drops the message (it is read again after the rewind, or answered by the copy
        in flight).
        """
        if epoch is not None and epoch != self.epoch(partition):
            return False
        pending = self._pending.setdefault(partition, OrderedDict())
        if offset in pending:
            return False
        if pending and offset < next(reversed(pending)):
            raise ValueError(f"offset {offset} of {partition!r} arrived out of order")
        pending[offset] = (self.epoch(partition), max(0, nbytes))
        self._in_flight += 1
        self._bytes += max(0, nbytes)
        return True

    def current(self, partition: P, offset: int, epoch: int) -> bool:
        """True while the message tracked in ``epoch`` is still tracked (not rewound, not revoked)."""
        entry = self._entry(partition, offset)
        return entry is not None and entry[0] == epoch

    def _entry(self, partition: P, offset: int) -> tuple[int, int] | None:
        pending = self._pending.get(partition)
        return None if pending is None else pending.get(offset)

    def add_bytes(self, partition: P, offset: int, nbytes: int, epoch: int | None = None) -> None:
        """Count more bytes held by an unsettled message (its prepared arrays, say)."""
        if nbytes <= 0:
            return
        epoch = self.epoch(partition) if epoch is None else epoch
        entry = self._entry(partition, offset)
        if entry is not None and entry[0] == epoch and entry[1] != _ANSWERED:
            self._pending[partition][offset] = (epoch, entry[1] + nbytes)
        elif (partition, epoch, offset) in self._held:
            self._held[(partition, epoch, offset)] += nbytes
        else:
            return
        self._bytes += nbytes

    def done(self, partition: P, offset: int, epoch: int | None = None) -> None:
        """Mark a message answered (its reply acknowledged by the broker).

        An answer of a message no longer tracked in ``epoch`` (rewound, revoked) only stops
        counting it: the partition was or will be read again from before it, so the answer
        must not advance the committed position.
        """
        epoch = self.epoch(partition) if epoch is None else epoch
        entry = self._entry(partition, offset)
        if entry is None or entry[0] != epoch:
            self.release(partition, offset, epoch)
            return
        if entry[1] == _ANSWERED:
            return
        pending = self._pending[partition]
        self._bytes -= entry[1]
        pending[offset] = (epoch, _ANSWERED)
        self._in_flight -= 1
        while pending and pending[next(iter(pending))][1] == _ANSWERED:
            first, _ = pending.popitem(last=False)
            self._committable[partition] = first + 1

    def release(self, partition: P, offset: int, epoch: int) -> None:
        """Stop counting a message dropped by a rewind or a revoke (its holder let it go); else nothing."""
        held = self._held.pop((partition, epoch, offset), None)
        if held is not None:
            self._in_flight -= 1
            self._bytes -= held

    def take_commits(self) -> dict[P, int]:
        """Positions that advanced since the last call (the next offset to read, Kafka style)."""
        commits, self._committable = self._committable, {}
        return commits

    def restore_commits(self, commits: dict[P, int]) -> None:
        """Hand back positions taken by ``take_commits`` that could not be committed (still tracked ones)."""
        for partition, position in commits.items():
            if partition in self._pending and position > self._committable.get(partition, -1):
                self._committable[partition] = position

    def pending(self, partitions: Iterable[P] | None = None) -> int:
        """Unanswered tracked messages in ``partitions`` (all when None); held ones are not counted."""
        chosen = (
            self._pending
            if partitions is None
            else {p: self._pending.get(p, OrderedDict()) for p in partitions}
        )
        return sum(1 for pending in chosen.values() for _, held in pending.values() if held != _ANSWERED)

    def unanswered(self, partition: P) -> Iterator[int]:
        """The partition's unanswered offsets, oldest first (exactly-once delivery publishes in this order)."""
        return (
            o for o, (_, held) in self._pending.get(partition, OrderedDict()).items() if held != _ANSWERED
        )

    def rewind(self, partition: P, offset: int, epoch: int) -> bool:
        """Drop ``offset`` and everything after it in ``partition``: they will be read again.

        Acts only while ``offset`` is still tracked in ``epoch``; a give-up of a message already
        dropped (by an earlier rewind to a lower offset, or a revoke) changes nothing and returns
        False. When it acts, the epoch moves on and the caller must seek the partition to ``offset``.
        Dropped unanswered messages stay counted until they are settled.
        """
        if not self.current(partition, offset, epoch):
            return False
        self._drop(partition, lambda o: o >= offset)
        return True

    def forget(self, partitions: Iterable[P]) -> None:
        """Drop partitions we no longer own (their epoch moves on); their unanswered messages stay counted
        until settled, and will be redelivered to the partition's next owner."""
        for partition in partitions:
            self._drop(partition, lambda o: True)
            self._pending.pop(partition, None)
            self._committable.pop(partition, None)

    def _drop(self, partition: P, dropped: Callable[[int], bool]) -> None:
        pending = self._pending.get(partition, OrderedDict())
        for offset in [o for o in pending if dropped(o)]:
            epoch, held = pending.pop(offset)
            if held != _ANSWERED:
                self._held[(partition, epoch, offset)] = held
        self._epochs[partition] = self.epoch(partition) + 1
