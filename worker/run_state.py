"""The worker's run state, shared by its stages: what is running, what died, and the tasks it owns."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

#: The name under which a dead fetch loop is kept with the dead model loops.
FETCH_LOOP = "(fetch loop)"


@dataclass
class RunState:
    """Mutable run state, kept in one place; the background tasks it spawns are owned and awaited."""

    stopping: bool = False
    fetching_rounds: int = 0
    #: fetch rounds in a row that ended in an error of the broker or the client
    failed_rounds: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    #: models whose loop died and is waiting to be restarted (FETCH_LOOP for the fetch loop)
    dead_loops: set[str] = field(default_factory=set)
    #: monotonic start of the first of the broker checks failing in a row (None: the last one worked)
    unreachable_since: float | None = None
    #: monotonic time of the last broker check that was answered (None: none yet)
    broker_answered_at: float | None = None
    not_ready: frozenset[str] = frozenset()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task of the worker's own (drain waits for it; a failure is logged)."""
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())
