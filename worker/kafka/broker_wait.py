"""The fetch wait the broker may hold the consumer's requests for: short while busy, longer while idle."""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaConsumer

log = logging.getLogger(__name__)


class BrokerWait:
    """How long the broker may hold the consumer's fetches: short while records flow, longer the longer
    the worker has been idle.

    Apache Kafka answers a fetch as soon as records arrive, so there the wait costs only the
    empty fetches of an idle consumer (1000 / wait_ms a second). tansu answers only when the wait
    runs out, so there it is also latency. Short while busy keeps that latency low under load;
    doubled after each fetch round that found nothing, up to ``idle_ms``, it keeps a worker idle for
    long (and the broker answering it) near zero CPU, while a stream that pauses for a second or two
    resumes with a short wait: on tansu the first request after an idle spell pays up to the wait
    reached, on Kafka nothing. aiokafka reads ``Fetcher._fetch_max_wait_ms`` each time it builds a
    fetch request (aiokafka 0.14, ``Fetcher._get_actions_per_node``); there is no public setter.
    """

    def __init__(self, consumer: AIOKafkaConsumer, busy_ms: int, idle_ms: int) -> None:
        self._fetcher = getattr(consumer, "_fetcher", None)
        self.busy_ms = busy_ms
        self.idle_ms = max(idle_ms, busy_ms)
        self.wait_ms = busy_ms
        """The wait the next fetch request will carry."""
        if self._fetcher is not None and not hasattr(self._fetcher, "_fetch_max_wait_ms"):
            log.warning("this aiokafka keeps no _fetch_max_wait_ms: the fetch wait stays %d ms", busy_ms)
            self._fetcher = None

    def round_ended(self, found: bool) -> None:
        """A fetch round found records (back to the busy wait) or none (the wait doubles, up to idle_ms)."""
        wait = self.busy_ms if found else min(self.idle_ms, max(2 * self.wait_ms, 1))
        if wait != self.wait_ms:
            self.wait_ms = wait
            if self._fetcher is not None:
                self._fetcher._fetch_max_wait_ms = wait
