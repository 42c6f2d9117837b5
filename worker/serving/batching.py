"""The micro-batcher: size/time triggers per shape bucket, pure asyncio, no Kafka inside.

``BatchQueue`` is the pure state (testable with plain numbers for time); ``MicroBatcher``
is the thin async shell that waits until the queue has a batch ready. A batch is ready
when its bucket holds ``max_batch_size`` rows (or the bucket's own smaller size, see
``size_of``; an item is one row unless it says more, as a zero-shot request with a row per
candidate label does) or its oldest item has waited ``max_wait`` seconds, whichever comes
first; on close every queued item is flushed.

A consumer with room for another batch (``get(eager=True)``) takes what is queued once it is
worth a run: at once while requests arrive slower than one per ``max_wait`` (low load: waiting
would only add latency), else once the queue holds what the arrival rate brings in ``max_wait``
(``fill``) or the oldest item has waited that long. A run has a fixed cost (a model run at one
row costs about as much CPU as half a dozen rows of a full batch, and each batch is one executor
call, one publish and one commit), so a steady stream answered one request per run costs twice
the CPU per request of a flood; waiting a few milliseconds for the batch the stream fills anyway
keeps it as cheap as a flood, and a flood fills every batch at once.

A full bucket goes alone, at its own shape. A batch that goes on time takes every queued item
of the buckets that ``rank_of`` ranks (token lengths), at the longest shape among them, when
they all fit one batch of that shape: at low load a few short and long requests are answered
in one run instead of one run per bucket. When more is queued than one batch holds (load),
buckets go one by one at their own shapes, so no run pays for padding short texts to long.

Where a batch runs at its longest item (``length_of`` gives each item's length: CPU, text), a
full bucket's batch is its oldest item and the items nearest its length among the next ones
(``ALIKE_WINDOW`` batches' worth): under load a bucket holds texts of, say, 9 to 16 tokens, and a
batch of them in arrival order runs at 16 for all. Every batch takes the bucket's oldest item, so
none waits longer than it would in arrival order by more than the window's other batches.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from worker.arrivals import ArrivalRate

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

#: How many batches' worth of a full bucket's oldest items a batch of like lengths is chosen from.
ALIKE_WINDOW = 4


@dataclass(frozen=True)
class _Queued(Generic[T]):
    item: T
    since: float
    order: int
    """Arrival number: breaks ties between items queued at the same instant."""
    length: int | None = None
    #: Rows the item adds to a batch (a zero-shot request: one per candidate label).
    rows: int = 1


class BatchQueue(Generic[K, T]):
    """Per-key FIFO queues and the size/time trigger; time is passed in, never read."""

    def __init__(
        self,
        max_batch_size: int,
        max_wait: float,
        size_of: Callable[[K], int] | None = None,
        rank_of: Callable[[K], int | None] | None = None,
        length_of: Callable[[T], int | None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_wait < 0:
            raise ValueError("max_wait must be >= 0")
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait
        self._size_of = size_of
        self._sizes: dict[K, int] = {}
        self._rank_of = rank_of or (lambda key: None)
        self._length_of = length_of or (lambda item: None)
        self._queues: OrderedDict[K, deque[_Queued[T]]] = OrderedDict()
        self._rows: dict[K, int] = {}
        self._count = 0
        self._arrivals = 0
        self._total_rows = 0
        self.arrivals = ArrivalRate()
        """Rows queued per second (``worker.arrivals``)."""

    def __len__(self) -> int:
        return self._count

    def batch_size(self, key: K) -> int:
        """Most rows one batch of bucket ``key`` takes (an item is one row unless ``add`` says more):
        ``max_batch_size``, or less if ``size_of`` says so."""
        size = self._sizes.get(key)
        if size is None:
            size = self.max_batch_size
            if self._size_of is not None:
                size = max(1, min(size, self._size_of(key)))
            self._sizes[key] = size
        return size

    def add(self, key: K, item: T, now: float, rows: int = 1) -> None:
        """Queue ``item`` in bucket ``key``; it takes ``rows`` of a batch's size."""
        queued = _Queued(item, now, self._arrivals, self._length_of(item), max(1, rows))
        self._queues.setdefault(key, deque()).append(queued)
        self._rows[key] = self._rows.get(key, 0) + queued.rows
        self._total_rows += queued.rows
        self.arrivals.add(now, queued.rows)
        self._arrivals += 1
        self._count += 1

    def fill(self, now: float, pending: int = 0) -> int:
        """Rows a free consumer waits for (``get(eager=True)``), within the oldest bucket's batch size: what
        arrives in ``max_wait`` at the current rate, or what is queued plus the ``pending`` items on their
        way (a fetched round still being prepared), whichever is more; 1 (what is there) at low load."""
        if not self._queues:
            return 1
        oldest = min(self._queues, key=lambda key: (self._queues[key][0].since, self._queues[key][0].order))
        due = max(round(self.arrivals.expected(now, self.max_wait)), self._total_rows + pending)
        return max(1, min(self.batch_size(oldest), due))

    def pop_ready(
        self, now: float, *, flush: bool = False, eager: bool = False, pending: int = 0
    ) -> tuple[K, list[T]] | None:
        """The ready batch whose oldest item has waited longest, or None; ``flush`` makes all ready,
        ``eager`` (a consumer is free) too once the queue holds ``fill`` rows.

        Returns the batch's shape key and its items; items of a merged batch keep their own keys.
        """
        flush = flush or (eager and self._total_rows >= self.fill(now, pending))
        best: K | None = None
        best_head = (float("inf"), 0)
        best_full = False
        for key, queue in self._queues.items():
            head = (queue[0].since, queue[0].order)
            full = self._rows[key] >= self.batch_size(key)
            # The same sum as next_deadline: a clock set to that deadline finds the batch ready.
            if (flush or full or now >= head[0] + self.max_wait) and head < best_head:
                best, best_head, best_full = key, head, full
        if best is None:
            return None
        if best_full and self._queues[best][0].length is not None:
            return best, self._alike(best)
        if best_full or self._rank_of(best) is None:
            return best, self._take({best: self._fitting(best)})
        return self._merged(best)

    def _alike(self, key: K) -> list[T]:
        """A full bucket's oldest item and the items nearest its length among the next ones; the rest
        stay queued in arrival order."""
        queue, size = self._queues[key], self.batch_size(key)
        window = [queue.popleft() for _ in range(min(len(queue), ALIKE_WINDOW * size))]
        oldest, later = window[0], window[1:]
        target = oldest.length or 0
        later.sort(key=lambda q: (abs((q.length or 0) - target), q.order))
        taken: list[_Queued[T]] = [oldest]
        kept: list[_Queued[T]] = []
        rows = oldest.rows
        for queued in later:  # nearest lengths first, while the batch's rows allow
            if rows + queued.rows <= size:
                taken.append(queued)
                rows += queued.rows
            else:
                kept.append(queued)
        taken.sort(key=lambda q: q.order)
        kept.sort(key=lambda q: q.order)
        queue.extendleft(reversed(taken + kept))  # the batch becomes the bucket's first items
        return self._take({key: len(taken)})

    def _merged(self, start: K) -> tuple[K, list[T]]:
        """Every ranked bucket's items at the longest shape, if they fit one batch; else ``start`` alone."""
        ranks = {key: rank for key in self._queues if (rank := self._rank_of(key)) is not None}
        widest = max(ranks, key=ranks.__getitem__)
        if sum(self._rows[key] for key in ranks) > self.batch_size(widest):
            return start, self._take({start: self._fitting(start)})
        return widest, self._take({key: len(self._queues[key]) for key in ranks}, in_age_order=True)

    def _fitting(self, key: K) -> int:
        """How many of bucket ``key``'s first items fit one batch's rows (at least one: a request with
        more rows than a batch goes alone, and the engine splits it)."""
        size, rows, count = self.batch_size(key), 0, 0
        for queued in self._queues[key]:
            rows += queued.rows
            if count and rows > size:
                break
            count += 1
        return count

    def _take(self, counts: Mapping[K, int], *, in_age_order: bool = False) -> list[T]:
        """Pop the first ``counts[key]`` items of each bucket."""
        queued: list[_Queued[T]] = []
        for key, count in counts.items():
            queue = self._queues[key]
            popped = [queue.popleft() for _ in range(min(count, len(queue)))]
            rows = sum(q.rows for q in popped)
            self._rows[key] -= rows
            self._total_rows -= rows
            queued += popped
            if not queue:
                del self._queues[key]
                del self._rows[key]
        self._count -= len(queued)
        if in_age_order:
            queued.sort(key=lambda q: (q.since, q.order))
        return [q.item for q in queued]

    def drop(self, dropped: Callable[[T], bool]) -> list[T]:
        """Remove every queued item that ``dropped`` selects (work that became void); returns them."""
        out: list[T] = []
        for key in list(self._queues):
            kept: deque[_Queued[T]] = deque()
            for queued in self._queues[key]:
                if dropped(queued.item):
                    out.append(queued.item)
                    self._rows[key] -= queued.rows
                    self._total_rows -= queued.rows
                else:
                    kept.append(queued)
            if kept:
                self._queues[key] = kept
            else:
                del self._queues[key]
                del self._rows[key]
        self._count -= len(out)
        return out

    def next_deadline(self) -> float | None:
        """When the oldest queued item's wait runs out (None when empty)."""
        heads = [queue[0].since for queue in self._queues.values()]
        return min(heads) + self.max_wait if heads else None


class BatcherClosed(Exception):
    """Raised by ``MicroBatcher.get`` once it is closed and empty."""


class MicroBatcher(Generic[K, T]):
    """Async shell over ``BatchQueue``: ``put`` never blocks, ``get`` waits for a ready batch."""

    def __init__(
        self,
        queue: BatchQueue[K, T],
        *,
        clock: Callable[[], float] | None = None,
        pending: Callable[[], int] | None = None,
    ) -> None:
        """``pending``: how many items are on their way (an eager get waits for them, within max_wait)."""
        self.queue = queue
        self._clock = clock or asyncio.get_running_loop().time
        self._pending = pending or (lambda: 0)
        self._wakeup = asyncio.Event()
        self._closing = False

    def __len__(self) -> int:
        return len(self.queue)

    def put(self, key: K, item: T, rows: int = 1) -> None:
        """Queue one item taking ``rows`` of a batch; wakes the consumer of ``get``."""
        if self._closing:
            raise BatcherClosed("the batcher is closed")
        self.queue.add(key, item, self._clock(), rows)
        self._wakeup.set()

    def drop(self, dropped: Callable[[T], bool]) -> list[T]:
        """Remove the queued items ``dropped`` selects; returns them (see ``BatchQueue.drop``)."""
        return self.queue.drop(dropped)

    def close(self) -> None:
        """Stop accepting items; ``get`` flushes what is queued, then raises BatcherClosed."""
        self._closing = True
        self._wakeup.set()

    async def get(self, *, eager: bool = False) -> tuple[K, list[T]]:
        """The next ready batch (by size, by time, or by flush on close).

        ``eager``: the caller has a batch slot free: what is queued is ready (the oldest bucket's
        items, at most one batch) once it holds what the arrival rate brings in max_wait
        (``BatchQueue.fill``; at low load, at once), or when max_wait runs out.
        """
        while True:
            ready = self.queue.pop_ready(
                self._clock(), flush=self._closing, eager=eager, pending=self._pending()
            )
            if ready is not None:
                return ready
            if self._closing:
                raise BatcherClosed("the batcher is closed and empty")
            deadline = self.queue.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - self._clock())
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)
