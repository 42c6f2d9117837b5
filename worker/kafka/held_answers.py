"""Answers held per partition until every earlier offset of it is answered: the order exactly-once commits in."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

P = TypeVar("P")
A = TypeVar("A")


class HeldAnswers(Generic[P, A]):
    """Answers held per partition until every earlier offset of the partition is answered (no Kafka here)."""

    def __init__(self) -> None:
        self._held: dict[P, dict[int, A]] = {}

    def hold(self, partition: P, offset: int, answer: A) -> None:
        """Keep ``answer`` for ``offset`` (a later answer for the same offset replaces it)."""
        self._held.setdefault(partition, {})[offset] = answer

    def take_run(self, partition: P, unanswered: Iterable[int]) -> list[tuple[int, A]]:
        """Pop the answers of the longest prefix of ``unanswered`` (the partition's unanswered offsets,
        oldest first) that is held entirely; empty if its first offset is not answered yet.

        Answers for offsets before the first unanswered one are dropped: those offsets were published,
        rewound or forgotten since, so the answer is stale.
        """
        held = self._held.get(partition)
        if not held:
            return []
        run: list[tuple[int, A]] = []
        first: int | None = None
        for offset in unanswered:
            first = offset if first is None else first
            if offset not in held:
                break
            run.append((offset, held.pop(offset)))
        for stale in [o for o in held if first is None or o < first]:
            del held[stale]
        if not held:
            del self._held[partition]
        return run

    def drop(self, partition: P, stale: Callable[[int, A], bool]) -> list[tuple[int, A]]:
        """Pop the partition's held answers for which ``stale(offset, answer)`` holds."""
        held = self._held.get(partition, {})
        dropped = [(offset, answer) for offset, answer in held.items() if stale(offset, answer)]
        for offset, _ in dropped:
            del held[offset]
        if not held:
            self._held.pop(partition, None)
        return dropped

    def count(self, partitions: Iterable[P] | None = None) -> int:
        """Answers held (in ``partitions``, or all)."""
        chosen = self._held if partitions is None else {p: self._held.get(p, {}) for p in partitions}
        return sum(len(held) for held in chosen.values())

    def forget(self, partitions: Iterable[P]) -> None:
        """Drop the answers of partitions no longer owned: they will be answered by the new owner."""
        for partition in partitions:
            self._held.pop(partition, None)
