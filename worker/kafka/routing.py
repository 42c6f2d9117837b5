"""Where a reply may go: the ``reply_to`` policy, and which topics exist (without creating any).

A client that can produce a request must not be able to make the worker write, with the
worker's own credentials, into topics the client chose (a confused deputy). A ``reply_to``
is honoured only when it is a legal topic name, matches the operator's pattern, is none of
the topics that are never allowed (request topics, the DLQ, another modality's results,
internal ``__*`` topics), and already exists. Everything else is answered on the
modality's results topic with a ``reply_to_refused`` header saying why.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum

from aiokafka.errors import KafkaError

from schemas import Modality
from schemas.topics import dlq_topic, requests_topic, results_topic

log = logging.getLogger(__name__)

_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


class Refusal(StrEnum):
    """Why a ``reply_to`` was not honoured (the value of the ``reply_to_refused`` header)."""

    ILLEGAL = "illegal_name"
    RESERVED = "reserved_topic"
    NOT_ALLOWED = "not_allowed"
    MISSING = "missing_topic"
    REFUSED_BY_BROKER = "refused_by_broker"


def legal_topic(name: str) -> bool:
    """Kafka's own rule for topic names: 1-249 of [a-zA-Z0-9._-], and not '.' or '..'."""
    return name not in (".", "..") and _TOPIC_NAME.fullmatch(name) is not None


@dataclass(frozen=True)
class ReplyPolicy:
    """The operator's ``reply_to`` rule plus the topics no rule can allow."""

    prefix: str
    allowed: re.Pattern[str]

    def refusal(self, reply_to: str, modality: Modality) -> Refusal | None:
        """Why ``reply_to`` may not carry a reply of ``modality`` (None: allowed, if it exists)."""
        if not legal_topic(reply_to):
            return Refusal.ILLEGAL
        own_results = results_topic(modality, self.prefix)
        if reply_to == own_results:
            return None
        reserved = {dlq_topic(self.prefix)}
        for other in Modality:
            reserved.add(requests_topic(other, self.prefix))
            reserved.add(results_topic(other, self.prefix))
        if reply_to.startswith("__") or reply_to in reserved:
            return Refusal.RESERVED
        if self.allowed.fullmatch(reply_to) is None:
            return Refusal.NOT_ALLOWED
        return None


class TopicDirectory:
    """Which topics exist, from cluster metadata listed in full (naming no topic, so creating none).

    Kafka auto-creates a topic that a metadata or produce request names when the broker allows
    it; listing every topic creates nothing. The list is cached for ``ttl_s`` and refreshed on a
    miss at most once per ``min_refresh_s``, each refresh bounded by ``timeout_s``. A topic is
    called missing only by a listing that began after the question: one created just after the
    last listing (a client's new reply topic, its first request at once) is found, at the cost of
    waiting up to ``min_refresh_s`` for that listing when the rate asks it.
    """

    def __init__(
        self,
        list_topics: Callable[[], Awaitable[set[str]]],
        *,
        ttl_s: float = 30.0,
        min_refresh_s: float = 2.0,
        timeout_s: float = 5.0,
    ) -> None:
        self._list_topics = list_topics
        self.ttl_s = ttl_s
        self.min_refresh_s = min_refresh_s
        self.timeout_s = timeout_s
        self._topics: set[str] = set()
        self._listed_at = -float("inf")
        #: when the listing the list comes from began
        self._began_at = -float("inf")
        self._tried_at = -float("inf")
        self._failed = False
        self._lock = asyncio.Lock()

    async def exists(self, topic: str) -> bool:
        """True when ``topic`` exists, as far as a bounded, cached look can tell.

        Raises ``TopicsUnknown`` when the topic is not known and the cluster could not be asked:
        a broker that is away is waited for, not taken as an answer. A topic seen before is
        believed to exist while the cluster cannot be asked.
        """
        asked = time.monotonic()
        if topic in self._topics and asked - self._listed_at < self.ttl_s:
            return True
        if asked - self._tried_at >= self.min_refresh_s:
            await self.refresh()
        if topic not in self._topics and not self._failed and self._began_at < asked:
            # The list may predate the topic: list again, once the rate allows, before calling it missing.
            wait = self._tried_at + self.min_refresh_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            async with self._lock:
                if self._began_at < asked:  # else a listing begun since answers (waiters share one)
                    await self._list()
        if topic in self._topics:
            return True
        if self._failed:
            raise TopicsUnknown(f"cannot list the cluster's topics to look for {topic!r}")
        return False

    async def reachable(self) -> bool:
        """Whether the cluster answered the latest listing (refreshed first, at most once per min_refresh_s)."""
        await self.refresh()
        return not self._failed

    async def refresh(self) -> None:
        """List the cluster's topics again, bounded by timeout_s; a failure keeps the previous list."""
        async with self._lock:
            if time.monotonic() - self._tried_at < self.min_refresh_s:
                return  # someone else tried while we waited for the lock
            await self._list()

    async def _list(self) -> None:
        """One listing (the lock held): the topics and when the listing began, or the failure."""
        began = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout_s):
                self._topics = await self._list_topics()
        except (TimeoutError, KafkaError, OSError) as exc:
            log.warning("listing the cluster's topics failed: %r", exc)
            self._failed = True
        else:
            self._failed = False
            self._began_at = began
            self._listed_at = time.monotonic()
        finally:
            self._tried_at = time.monotonic()


class TopicsUnknown(Exception):
    """The cluster's topics could not be listed (the broker is away); retry later."""
