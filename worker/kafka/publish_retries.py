"""Publishing retried within a bound: a retriable failure (the broker away or busy) backs off for ``retry_s``,
then ``GiveUp``; ``failing_since`` tells readiness how long publishing has failed."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka.errors import (
    InvalidTopicError,
    KafkaTimeoutError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)

from worker.kafka.routing import TopicDirectory, TopicsUnknown
from worker.metrics import WorkerMetrics

# Delivery's logger: its records keep the name operators and tests filter by.
log = logging.getLogger("worker.kafka.delivery")

#: Failures that mean "this topic will not take it", as opposed to "the broker is not there now".
_TOPIC_REFUSED = (UnknownTopicOrPartitionError, InvalidTopicError, TopicAuthorizationFailedError)


class GiveUp(Exception):
    """A retriable failure outlasted the retry bound: leave the offset uncommitted, redeliver."""


def _retriable(exc: BaseException) -> bool:
    """Worth another try: the broker is away or busy. A topic refused by name is not (it is re-routed)."""
    if isinstance(exc, _TOPIC_REFUSED):
        return False
    transient = TimeoutError | KafkaTimeoutError | TopicsUnknown | OSError
    return isinstance(exc, transient) or bool(getattr(exc, "retriable", False))


class PublishRetries:
    """Delivery's retries: ``_retrying`` runs one publish until it succeeds, fails for good, or gives up."""

    directory: TopicDirectory
    metrics: WorkerMetrics
    retry_s: float
    bound_attempts: bool
    failing_since: float | None
    _failing: int
    _last_ok: float | None
    stopping: bool

    @property
    def failing_calls(self) -> int:
        """Publishes retrying after a failure, now."""
        return self._failing

    async def _retrying(
        self, kind: str, attempt: Callable[[], Awaitable[Any]], topic: str | None = None
    ) -> Any:
        """Run ``attempt`` until it succeeds or fails for good; retriable failures back off up to retry_s.

        ``failing_since`` is set by the first failure and cleared only by a success while no other
        call is still failing, so one reply that gets through does not hide the others.
        """
        started = time.monotonic()
        delay = 0.2
        failing = False
        try:
            while True:
                try:
                    # Each attempt is bounded by what is left of retry_s: aiokafka's producer holds
                    # a send for its own request_timeout_ms (40 s) while the broker is away, which
                    # would stretch the bound. A record abandoned here may still go out later (a
                    # duplicate reply, as after any give-up).
                    left = max(self.retry_s - (time.monotonic() - started), 0.1)
                    async with asyncio.timeout(left if self.bound_attempts else None):
                        result = await attempt()
                except Exception as exc:
                    if not _retriable(exc) and not await self._metadata_missing(exc):
                        raise
                    waited = time.monotonic() - started
                    if not failing:
                        failing = True
                        self._failing += 1
                    if self.failing_since is None:
                        self.failing_since = time.monotonic()
                    self.metrics.publish_retries.labels(kind).inc()
                    if self.stopping or waited + delay > self.retry_s:
                        self.metrics.publish_failures.labels(kind, "gave_up").inc()
                        raise GiveUp(f"{kind}: {exc!r} for {waited:.1f} s") from exc
                    log.warning("publishing a %s failed (%r); retrying in %.1f s", kind, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                else:
                    self._last_ok = time.monotonic()
                    if self._failing == (1 if failing else 0):
                        self.failing_since = None
                    return result
        finally:
            if failing:
                self._failing -= 1
                # The last failing call ended (given up) after a publish got through since the failures
                # began: publishing works. An idle worker would otherwise stay publish_failing for good.
                since, ok = self.failing_since, self._last_ok
                if self._failing == 0 and since is not None and ok is not None and ok > since:
                    self.failing_since = None

    async def _metadata_missing(self, exc: BaseException) -> bool:
        """An unknown-topic refusal while the cluster cannot be asked: the broker is away, not the topic.

        aiokafka's producer raises UnknownTopicOrPartitionError for a topic it has no metadata
        for after its metadata wait, also when the broker is simply away. Only a cluster that
        answers can say the topic is refused (missing, or not writable): then it is re-routed
        or reported as before. A broker that comes back between the two looks like a refusal
        (one request's reply re-routed or sent to the DLQ), which a retry of every refusal would
        turn into endless redeliveries of a topic that really refuses.
        """
        if not isinstance(exc, UnknownTopicOrPartitionError):
            return False
        return not await self.directory.reachable()
