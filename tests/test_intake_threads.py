"""The intake's threads (worker/intake_threads.py) on a real thread pool: outcomes ready together reach
the loop in one pass, each item's time limit runs from its own start, fetching stays one round ahead."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from worker.intake_threads import IntakeThreads


def _sleeping(item: tuple[str, float]) -> str:
    name, seconds = item
    time.sleep(seconds)
    if name == "raises":
        raise ValueError("a fault of ours")
    return name


def _overdue(item: tuple[str, float]) -> str:
    return f"{item[0]}: overdue"


def _threads(count: int, limit_s: float = 5.0) -> IntakeThreads[tuple[str, float], str]:
    return IntakeThreads(ThreadPoolExecutor(count), count, limit_s, _sleeping, _overdue)


async def test_outcomes_ready_together_reach_the_loop_in_one_pass() -> None:
    """Items that end while the loop is busy are handed on in one pass: a batcher sees them at once
    (one hand-off per request woke the loop once per request and batches formed from a trickle)."""
    threads = _threads(2)
    ticks = 0
    ticking = True

    def tick() -> None:
        nonlocal ticks
        ticks += 1
        if ticking:
            asyncio.get_running_loop().call_soon(tick)

    tick()
    seen: list[tuple[str, int]] = []
    items = [(f"r{i}", 0.0) for i in range(50)]
    taking = asyncio.create_task(threads.take_in(items, lambda out: seen.append((out, ticks)), _fail))
    await asyncio.sleep(0)  # take_in queues the round and waits for it to start
    time.sleep(0.3)  # noqa: ASYNC251 (the loop is busy on purpose: the threads end every item meanwhile)
    await (await taking)
    ticking = False
    assert sorted(name for name, _ in seen) == sorted(f"r{i}" for i in range(50))
    assert len({tick_seen for _, tick_seen in seen}) == 1
    assert threads.pending == 0


async def test_a_slow_item_is_answered_at_its_limit_while_the_others_flow() -> None:
    threads = _threads(2, limit_s=0.3)
    seen: dict[str, float] = {}
    started = time.monotonic()
    done = await threads.take_in(
        [("slow", 1.0), *((f"fast{i}", 0.01) for i in range(10))],
        lambda out: seen.setdefault(out, time.monotonic() - started),
        _fail,
    )
    await done
    assert seen.keys() == {"slow: overdue", *(f"fast{i}" for i in range(10))}
    assert max(seen[f"fast{i}"] for i in range(10)) < 0.25
    assert 0.3 <= seen["slow: overdue"] < 0.6
    await asyncio.sleep(0.9)  # the slow one's thread ends now: its late outcome is dropped
    assert "slow" not in seen
    assert threads.pending == 0


async def test_an_items_time_limit_runs_from_its_own_start() -> None:
    """One thread, two items of 0.2 s and a 0.3 s limit: the second waited 0.2 s for the thread, which
    does not count against it."""
    threads = _threads(1, limit_s=0.3)
    seen: list[str] = []
    await (await threads.take_in([("a", 0.2), ("b", 0.2)], seen.append, _fail))
    assert seen == ["a", "b"]


async def test_taking_a_round_in_returns_once_its_items_have_all_started() -> None:
    """One thread: the round is queued at once, and take_in returns when c started (a and b ended), so
    the next fetch's bytes wait for this round's to be counted."""
    threads = _threads(1)
    seen: list[str] = []
    started = time.monotonic()
    # c runs for a second, so a loaded machine's scheduling cannot blur "c started" into "c ended".
    first = await threads.take_in([("a", 0.1), ("b", 0.1), ("c", 1.0)], seen.append, _fail)
    assert 0.2 <= time.monotonic() - started < 1.0
    assert seen == ["a", "b"]
    await first
    assert seen == ["a", "b", "c"]


async def test_a_fault_of_ours_goes_to_failed_and_the_round_still_ends() -> None:
    threads = _threads(2)
    failures: list[tuple[Any, BaseException]] = []
    seen: list[str] = []
    await (await threads.take_in([("raises", 0.0), ("ok", 0.0)], seen.append, _failed_to(failures)))
    assert seen == ["ok"]
    assert [(item, type(error)) for item, error in failures] == [(("raises", 0.0), ValueError)]
    assert threads.pending == 0


async def test_cancelling_a_round_drops_what_is_not_handed_on() -> None:
    threads = IntakeThreads(ThreadPoolExecutor(1), 3, 5.0, _sleeping, _overdue)  # takes 3 in at once
    seen: list[str] = []
    release = threading.Event()
    threads.prepare = lambda item: (release.wait(5), item[0])[1]
    done = await threads.take_in([("a", 0.0), ("b", 0.0), ("c", 0.0)], seen.append, _fail)
    assert threads.pending == 3
    done.cancel()
    await asyncio.sleep(0)  # the future's callbacks run on the loop
    assert threads.pending == 0
    release.set()
    await asyncio.sleep(0.2)
    assert seen == []  # a's late outcome is dropped; b and c never ran


def _fail(item: object, error: BaseException) -> None:
    pytest.fail(f"{item!r} failed: {error!r}")


def _failed_to(failures: list[tuple[Any, BaseException]]) -> Any:
    return lambda item, error: failures.append((item, error))
