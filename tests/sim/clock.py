"""Virtual time for the simulation: an event loop whose clock jumps to the next timer, an executor
that runs work on that loop, and the worker modules' ``time`` read from the same clock.

Why not ``looptime`` (PyPI): it fast-forwards only when no executor future is pending and otherwise
waits in real time for threads, so a model run that "hangs" for 300 virtual seconds would cost real
seconds; it also leaves ``time.monotonic()`` (read by delivery, readiness and the liveness tick) on
the wall clock. Here the executor itself is virtual, so the whole run is one thread and replays exactly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import sys
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

#: Worker modules read ``time.monotonic()``, ``time.perf_counter()`` and ``time.time()`` through the
#: ``time`` module (app, answers, delivery, intake, metrics, routing): every loaded
#: ``worker.*`` module whose ``time`` is the module gets the virtual clock instead.
#: (A ``from time import monotonic`` would escape this: keep reading time through the module.)
#: The wall clock the virtual clock starts at (Kafka timestamps and request deadlines are wall time).
EPOCH_S = 1_800_000_000.0


class Stuck(RuntimeError):
    """Every task waits on something that no timer will ever bring: the simulated world is deadlocked."""


class _Clock:
    """Stands in for the loop's selector: 'waiting' for I/O moves virtual time by the timeout."""

    def __init__(self, loop: SimLoop) -> None:
        self.loop = loop

    def select(self, timeout: float | None) -> list[Any]:
        if timeout is None:
            raise Stuck("no ready task and no timer left")
        self.loop.now += timeout
        return []

    def close(self) -> None:
        return None


class SimLoop(asyncio.BaseEventLoop):
    """A single-threaded event loop with no I/O whose ``time()`` is virtual: idle means jump ahead."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self._selector = _Clock(self)
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self.now

    def _process_events(self, event_list: list[Any]) -> None:
        return None

    def _write_to_self(self) -> None:
        return None  # nothing to wake: the loop never blocks in a real select


class SimExecutor(concurrent.futures.Executor):
    """Runs each submitted call on the loop after a delay the scheduler picks (virtual time)."""

    def __init__(self, loop: SimLoop, delay_of: Callable[[Callable[..., Any]], float | None]) -> None:
        self.loop = loop
        self.delay_of = delay_of
        self.dead = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        delay = self.delay_of(fn)
        if delay is None:
            return future  # hangs for good

        def run() -> None:
            if self.dead:
                future.cancel()  # the process is gone: whoever awaits this is cancelled with it
                return
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)

        self.loop.call_later(delay, run)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.dead = True


class VirtualTime(types.SimpleNamespace):
    """The subset of the ``time`` module the worker reads, on the loop's clock."""

    def __init__(self, loop: SimLoop) -> None:
        super().__init__()
        self._loop = loop

    def monotonic(self) -> float:
        return self._loop.now

    def perf_counter(self) -> float:
        return self._loop.now

    def time(self) -> float:
        return EPOCH_S + self._loop.now

    def time_ns(self) -> int:
        return int(self.time() * 1e9)

    def monotonic_ns(self) -> int:
        return int(self._loop.now * 1e9)

    def perf_counter_ns(self) -> int:
        return int(self._loop.now * 1e9)


@contextlib.contextmanager
def virtual_time(loop: SimLoop) -> Iterator[None]:
    """Point the worker modules' ``time`` at ``loop``'s clock for the duration."""
    clock = VirtualTime(loop)
    patched = [
        module
        for name, module in list(sys.modules.items())
        if (name == "worker" or name.startswith("worker.")) and getattr(module, "time", None) is time
    ]
    for module in patched:
        module.time = clock  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module in patched:
            module.time = time  # type: ignore[attr-defined]
