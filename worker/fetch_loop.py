"""The fetch loop: rounds of records fetched, admitted by the quarantine, and handed to admission.

No fault here stops the consumer: a failed round counts for readiness and starts its partitions over
from their committed offsets; a loop that dies anyway is restarted by its supervisor.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import ConsumerStoppedError

from worker.admission import Admission
from worker.kafka.broker_wait import BrokerWait
from worker.kafka.clients import KafkaClients
from worker.kafka.commits import Flow
from worker.kafka.fetching import POLL_MS, Fetched, PartitionFetcher
from worker.kafka.offsets import OffsetTracker
from worker.kafka.quarantine import Admitted, Quarantine, open_quarantine
from worker.kafka.rounds import first_offsets, partitions_of, tp_of
from worker.metrics import WorkerMetrics
from worker.run_state import FETCH_LOOP, RunState
from worker.settings import Settings

log = logging.getLogger(__name__)


class FetchLoop:
    """Fetches rounds one partition per call and hands them on; owns the fetcher and the quarantine."""

    def __init__(
        self,
        state: RunState,
        settings: Settings,
        clients: KafkaClients,
        flow: Flow,
        admission: Admission,
        metrics: WorkerMetrics,
    ) -> None:
        self._state = state
        self.settings = settings
        self.clients = clients
        self.flow = flow
        self.tracker: OffsetTracker[Any] = flow.tracker
        self.admission = admission
        self.metrics = metrics
        self.fetcher: PartitionFetcher | None = None
        self.quarantine: Quarantine | None = None

    @property
    def consumer(self) -> AIOKafkaConsumer | None:
        """The consumer of the request topics (None before start and after stop)."""
        return self.clients.consumer

    async def open(self) -> None:
        """Build the fetcher and open the quarantine over the connected consumer."""
        s = self.settings
        assert self.clients.consumer is not None
        self.flow.consumer = self.clients.consumer
        broker_wait = BrokerWait(self.clients.consumer, s.fetch_max_wait_ms, s.idle_fetch_max_wait_ms)
        self.fetcher = PartitionFetcher(
            self.clients.consumer,
            max_attempts=s.max_decode_attempts,
            broker_wait=broker_wait,
            idle_poll=self.flow.keep_membership,
            linger_ms=s.fetch_linger_ms,
        )
        self.flow.on_revoked = self.fetcher.forget
        self.quarantine = await open_quarantine(
            s, self.clients, self.tracker, self.flow.wait_until, lambda: self.flow.generation
        )
        self.flow.on_revoking = self.quarantine.release
        self.flow.kept_paused["quarantine"] = self.quarantine.held_partitions

    async def supervise(self) -> None:
        """Keep the fetch loop running: a loop that dies is logged, reported not-ready, and restarted
        from the committed offsets (its last round's records may be gone from the client)."""
        delay = 1.0
        restarting = False
        while True:
            try:
                if restarting:
                    await self.flow.restart_from_committed()
                    self._state.dead_loops.discard(FETCH_LOOP)
                await self._fetch_loop()
                return
            except Exception:
                log.exception("the fetch loop died; restarting in %.0f s", delay)
                self._state.dead_loops.add(FETCH_LOOP)
                restarting = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _fetch_loop(self) -> None:
        """Fetch, track and prepare records until draining; no fault here stops the consumer."""
        s = self.settings
        assert self.fetcher is not None
        while not self.flow.draining:
            self.flow.apply_seeks()  # rewinds asked for since the last round: before the next fetch
            room = min(s.fetch_max_records, s.max_in_flight - self.tracker.in_flight)
            byte_room = s.max_in_flight_bytes - self.tracker.bytes_in_flight
            if self.flow.paused or room <= 0:
                # Answers free room soon: look again shortly, polling so the group keeps this member.
                await self.flow.keep_membership(POLL_MS)
                continue
            epochs, generation = self.tracker.epochs(), self.flow.generation
            errors = self.fetcher.consecutive_errors
            try:
                assert self.quarantine is not None  # records it held back come before fetching more
                timeout_ms = self.quarantine.fetch_timeout_ms(s.fetch_timeout_ms)
                fetched = await self.quarantine.held_back() or await self.fetcher.fetch(
                    room, timeout_ms, byte_room
                )
            except ConsumerStoppedError:
                return
            except Exception as exc:
                # No fault may end this loop (a dead fetch task left the worker alive and "ready"):
                # counted as a failed round, which readiness reads and the backoff below spaces out.
                # What the round took from the client may be gone with it: start over from the
                # committed offsets (records still in flight are not tracked twice).
                log.exception("a fetch round failed; its partitions start over from their committed offsets")
                self.fetcher.round_failed(exc)
                await self.flow.restart_from_committed()
                generation = self.flow.generation  # its own restart: a failed round, not an overtaken one
                fetched = Fetched([], [])
            # Crash markers armed (acknowledged) before anything of the round is tracked or runs.
            admitted = await self._admit(fetched, epochs, generation)
            if admitted is None:
                # A revoke came during the round: aiokafka's getmany waits out a reassignment and then
                # returns records of the new one, so records in hand may belong to either. None is
                # tracked; the partitions they came from start again from their committed offsets.
                await self.flow.seek_to_committed(partitions_of(fetched))
                continue
            # The records named as poison are tracked too (each the first of its partition in the round).
            poison_of = {(tp_of(r), r.offset): crashes for r, crashes in admitted.poisoned}
            tracked = self.admission.track(
                Fetched(
                    [*(r for r, _ in admitted.poisoned), *admitted.fetched.records],
                    admitted.fetched.undecodable,
                ),
                epochs,
            )
            # A round that raised no broker error, even an empty one, shows fetching works again: an
            # idle worker would otherwise stay fetch_failing until its next record.
            failed = self.fetcher.consecutive_errors > errors
            self._state.failed_rounds = self._state.failed_rounds + 1 if failed else 0
            if tracked.empty:
                if failed:
                    self.metrics.fetch_errors.inc()
                    await asyncio.sleep(min(0.1 * self._state.failed_rounds, 2.0))
                continue
            self._state.fetching_rounds += 1
            try:
                await self.admission.take(tracked, poison_of, epochs)
                log.debug("Processed a fetch of %d records", len(tracked.records) + len(tracked.undecodable))
            except Exception as exc:
                # A fault here costs a redelivery: read this round's partitions again from its first offsets.
                log.exception("internal error taking in %d records", len(tracked.records))
                self.admission.read_again(tracked, epochs, exc)
            finally:
                self._state.fetching_rounds -= 1
                self.flow.progressed()

    async def _admit(
        self, fetched: Fetched, epochs: Mapping[TopicPartition, int], generation: int
    ) -> Admitted | None:
        """The quarantine's view of a fetched round (None: a revoke overtook it). Markers that cannot be
        armed (the broker away) send the round back: its partitions are sought to its first offsets
        (nothing of it was tracked), and the failure counts as a failed fetch round."""
        assert self.quarantine is not None and self.consumer is not None and self.fetcher is not None
        if self.flow.generation != generation:
            return None
        if fetched.empty:
            return Admitted(fetched, [])
        try:
            return await self.quarantine.admit(fetched, epochs, generation)
        except Exception as exc:  # the broker away, mostly; no fault may end the fetch loop
            log.warning("could not arm the crash markers of a round (%r); it is read again", exc)
            self.fetcher.round_failed(exc)
            first = first_offsets(fetched)
            self.quarantine.reread(first)
            for tp, offset in first.items():
                if tp in self.consumer.assignment():
                    self.consumer.seek(tp, offset)
            return Admitted(Fetched([], []), [])

    def seek_failed(self, exc: BaseException) -> None:
        """A try to seek partitions to their committed offsets failed: a failed fetch round for readiness."""
        assert self.fetcher is not None
        self.fetcher.round_failed(exc)
        self._state.failed_rounds += 1
        self.metrics.fetch_errors.inc()
