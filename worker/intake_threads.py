"""The intake's threads: requests prepared concurrently, each with its own time limit, outcomes handed
on together.

A fetched round's requests are queued to the intake's executor at once, so a thread that ends one
takes the next without waiting for the event loop. Each outcome is handed on the moment it is ready;
the outcomes ready at the same moment are handed on in one pass of the loop, so a batcher sees them
together (one wake-up, fuller batches) instead of one at a time. A request's time limit runs from
the moment a thread begins it: one timer watches them all, and a request past its limit is answered
(``overdue``) while its thread stays taken until the work really ends (a thread cannot be stopped).
Fetching runs at most one round ahead: ``take_in`` returns once the round's requests have all started.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Outcome = TypeVar("Outcome")


@dataclass(eq=False)
class _Round(Generic[Item, Outcome]):
    """One fetched round being prepared: its future is done once every request was handed on."""

    future: asyncio.Future[None]
    ready: Callable[[Outcome], None]
    failed: Callable[[Item, BaseException], None]
    left: int


@dataclass(eq=False)
class _Preparing(Generic[Item, Outcome]):
    """One request: queued for a thread, preparing, or handed on (``settled``)."""

    item: Item
    round: _Round[Item, Outcome]
    future: Future[Outcome] | None = None
    #: when a thread began it (time.monotonic(), set by that thread): its time limit runs from here
    started: float | None = None
    settled: bool = False


class IntakeThreads(Generic[Item, Outcome]):
    """``prepare`` run on ``executor``'s threads for each item, ``overdue`` answering one past ``limit_s``."""

    def __init__(
        self,
        executor: Executor,
        concurrency: int,
        limit_s: float,
        prepare: Callable[[Item], Outcome],
        overdue: Callable[[Item], Outcome],
    ) -> None:
        self.executor = executor
        self.concurrency = concurrency
        self.limit_s = limit_s
        self.prepare = prepare
        self.overdue = overdue
        self._outstanding = 0  # items queued whose work has not ended (those past their limit included)
        self._progressed: asyncio.Event | None = None
        self._done: deque[_Preparing[Item, Outcome]] = deque()  # ended, for the loop to hand on
        self._delivering = False  # a call of _deliver is scheduled
        #: taken in and not yet handed on (being prepared, or waiting for a thread): what the limit watches
        self._unsettled: set[_Preparing[Item, Outcome]] = set()
        self._watchdog: asyncio.TimerHandle | None = None

    @property
    def pending(self) -> int:
        """Items taken in and not yet handed on (being prepared, or waiting for a thread)."""
        return len(self._unsettled)

    async def take_in(
        self,
        items: list[Item],
        ready: Callable[[Outcome], None],
        failed: Callable[[Item, BaseException], None],
    ) -> asyncio.Future[None]:
        """Queue each item, in order, for the threads; returns once they have all started (so fetching
        runs at most one round ahead of the intake), with a future that is done once every outcome went
        to ``ready``. A fault of ours, not of the item (``prepare`` raised), goes to ``failed``;
        cancelling the future drops what is not handed on yet."""
        loop = asyncio.get_running_loop()
        round_: _Round[Item, Outcome] = _Round(loop.create_future(), ready, failed, len(items))
        queued = [_Preparing(item, round_) for item in items]
        round_.future.add_done_callback(lambda future: self._dropped(queued) if future.cancelled() else None)
        self._unsettled.update(queued)
        for preparing in queued:
            try:
                preparing.future = self.executor.submit(self._timed, preparing)
            except RuntimeError:  # shut down: stopping
                round_.future.cancel()
                raise
            self._outstanding += 1
            preparing.future.add_done_callback(functools.partial(self._ended, loop, preparing))
        self._watch(loop)
        if not queued:
            round_.future.set_result(None)
        # Returns once they have all started: the next fetch's bytes wait for this round's to be counted.
        while self._outstanding > self.concurrency:
            progress = self._progress()
            progress.clear()
            await progress.wait()
        return round_.future

    def _progress(self) -> asyncio.Event:
        if self._progressed is None:  # made on first use, inside the event loop
            self._progressed = asyncio.Event()
        return self._progressed

    def _timed(self, preparing: _Preparing[Item, Outcome]) -> Outcome:
        """Thread side: the item's time limit runs from here."""
        preparing.started = time.monotonic()
        return self.prepare(preparing.item)

    def _ended(
        self, loop: asyncio.AbstractEventLoop, preparing: _Preparing[Item, Outcome], _: object
    ) -> None:
        """Thread side: queue the ended item; one call of the loop hands on all that are queued."""
        self._done.append(preparing)
        if not self._delivering:
            self._delivering = True
            with contextlib.suppress(RuntimeError):  # the loop closed first: nobody waits any more
                loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        """Loop side: hand on every outcome ready now, in the order they ended."""
        self._delivering = False  # before reading: an item queued from here on schedules another call
        while self._done:
            preparing = self._done.popleft()
            self._outstanding -= 1  # its thread is free: the work really ended
            if preparing.settled:
                continue  # answered at its time limit, or dropped
            future, round_ = preparing.future, preparing.round
            assert future is not None
            try:
                if future.cancelled():
                    round_.failed(preparing.item, RuntimeError("the intake stopped"))
                elif (error := future.exception()) is not None:
                    round_.failed(preparing.item, error)
                else:
                    round_.ready(future.result())
            except Exception:
                log.exception("handing on a prepared request failed")
            finally:
                self._settle(preparing)
        self._progress().set()

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Answer every item preparing for longer than the limit, and look again when the next one's
        limit runs out; no timer while nothing is queued."""
        if self._watchdog is not None:
            return
        now = time.monotonic()
        for preparing in list(self._unsettled):
            if preparing.started is not None and now - preparing.started >= self.limit_s:
                # Answered now; its result is dropped when the thread ends.
                try:
                    preparing.round.ready(self.overdue(preparing.item))
                except Exception:
                    log.exception("answering a request past its time limit failed")
                finally:
                    self._settle(preparing)
        starts = [p.started if p.started is not None else now for p in self._unsettled]
        if starts:

            def again() -> None:
                self._watchdog = None
                self._watch(loop)

            self._watchdog = loop.call_later(max(min(starts) + self.limit_s - now, 0.001), again)

    def _settle(self, preparing: _Preparing[Item, Outcome]) -> None:
        """Handed on (or answered at its limit): forgotten, and its round one closer to done."""
        self._forget(preparing)
        round_ = preparing.round
        round_.left -= 1
        if round_.left == 0 and not round_.future.done():
            round_.future.set_result(None)

    def _dropped(self, queued: list[_Preparing[Item, Outcome]]) -> None:
        """A round's future was cancelled: what is not yet handed on is dropped (and not started)."""
        for preparing in queued:
            if not preparing.settled:
                if preparing.future is not None:
                    preparing.future.cancel()
                self._forget(preparing)

    def _forget(self, preparing: _Preparing[Item, Outcome]) -> None:
        preparing.settled = True
        preparing.future = None  # nothing keeps its outcome (a prepared request's arrays) alive past here
        self._unsettled.discard(preparing)
