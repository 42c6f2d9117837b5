"""One seed end to end: the real Worker on the fake cluster, the faults of its plan, the invariants.

The worker is built by worker.app.Worker itself; only the two things it constructs that cannot run
in a simulation are replaced while a seed runs: ``KafkaClients`` (the seam, worker/kafka/clients.py) by
``FakeClients`` and ``ThreadPoolExecutor`` by ``SimExecutor``. The models are the committed tiny
bert (real tokenizer, real ONNX Runtime run inline: deterministic on CPU), its engine behind
``FaultyEngine``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import logging
import multiprocessing
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import worker.app
import worker.intake
import worker.kafka.fetching
import worker.kafka.transactions
from schemas.topics import dlq_topic, requests_topic, results_topic
from tests.sim.clock import SimExecutor, SimLoop, Stuck, virtual_time
from tests.sim.cluster import Cluster, FakeBatches, FakeClients
from tests.sim.faults import (
    BLOCKED,
    REPLIES,
    FaultyEngine,
    FaultyPreprocessor,
    Scheduler,
    Window,
    draw_exactly_once,
)
from tests.sim.invariants import Checker, Violation
from tests.sim.transactions import FakeTxnProducer, TxnCoordinator
from worker.app import Worker
from worker.kafka.crash_markers import Marker
from worker.serving.registry import ServedModel
from worker.settings import Settings

#: After the last fault, how long (virtual) every record has to get its answer: the longest honest
#: path is a publish given up at publish_retry_s, the 40 s producer timeouts, a session timeout, backoffs.
ANSWER_BOUND_S = 150.0
#: After everything is answered: how long the idle worker is watched (fetch rate, readiness).
IDLE_WATCH_S = 70.0
REPLAY = "python -m tests.sim --seed {seed} --trace"
#: The delivery modes a seed runs in (``--delivery``): each draws the same world from a seed.
DELIVERIES = ("at-least-once", "exactly-once")


def replay(seed: int, delivery: str = "at-least-once") -> str:
    """The command that replays ``seed`` (in ``delivery``)."""
    command = REPLAY.format(seed=seed)
    return command if delivery == "at-least-once" else f"{command} --delivery {delivery}"


_MODELS: dict[str, ServedModel] = {}


def tiny_bert() -> dict[str, ServedModel]:
    """The committed tiny bert, loaded once per process (its engine is reused by every seed)."""
    if not _MODELS:
        from tests.kafka_support import tiny_models

        _MODELS.update(tiny_models(Path(tempfile.mkdtemp(prefix="sim-models-")), "bert"))
    return _MODELS


#: How long a process killed by the poison request takes to come back.
POISON_RESTART_S = 5.0


def sim_settings(delivery: str = "at-least-once") -> Settings:
    """Small bounds so that backpressure, give-ups and decode skips happen within a few records."""
    settings = Settings(
        bootstrap_servers="sim:9092",
        delivery=delivery,
        group_id="sim",
        max_batch_size=4,
        max_wait_ms=10,
        max_in_flight=12,
        fetch_max_records=4,
        publish_retry_s=4.0,
        session_timeout_ms=10_000,
        max_decode_attempts=3,
        metrics_port=None,
        executor_threads=2,
        # The reply topics a request may name (faults.REPLIES, faults.BLOCKED): allowed by the policy, so
        # the broker's answer decides (the default pattern, <prefix>.replies.*, refused both unasked).
        reply_to_pattern=r"team\..+",
    )
    # Below the validated minimum (1 MiB): the simulated requests are ~1 KiB each.
    return settings.model_copy(update={"max_in_flight_bytes": 12 * 1024})


@dataclass
class SeedResult:
    """What one seed did: its violations, duplicate counts per cause, and a digest of its trace."""

    seed: int
    violations: list[Violation]
    duplicates: dict[str, int]
    digest: str
    virtual_s: float
    plan: str
    trace: list[str] = field(default_factory=list)
    delivery: str = "at-least-once"

    @property
    def defects(self) -> set[str]:
        return {v.defect for v in self.violations}


@contextlib.contextmanager
def _worker_seams(cluster: Cluster, loop: SimLoop, sched: Scheduler) -> Iterator[None]:
    saved = (
        worker.app.KafkaClients,
        worker.app.ThreadPoolExecutor,
        worker.intake.ThreadPoolExecutor,
        worker.kafka.fetching.LeaderBatches,
        worker.kafka.transactions.Transactions._producer,
    )
    worker.app.KafkaClients = lambda settings: FakeClients(cluster, settings)  # type: ignore[assignment,misc]
    worker.app.ThreadPoolExecutor = lambda *a, **k: SimExecutor(loop, sched.delay_of)  # type: ignore[assignment,misc]
    worker.intake.ThreadPoolExecutor = lambda *a, **k: SimExecutor(loop, sched.delay_of)  # type: ignore[assignment,misc]
    worker.kafka.fetching.LeaderBatches = FakeBatches  # type: ignore[assignment,misc]
    # Each worker's transactional producers belong to its process (``_Run._boot`` says which clients).
    worker.kafka.transactions.Transactions._producer = (  # type: ignore[method-assign]
        lambda self, transactional: FakeTxnProducer(  # type: ignore[attr-defined]
            self.sim_clients, transactional, self.settings.transaction_timeout_ms
        )
    )
    try:
        yield
    finally:
        (
            worker.app.KafkaClients,
            worker.app.ThreadPoolExecutor,
            worker.intake.ThreadPoolExecutor,
            worker.kafka.fetching.LeaderBatches,
            worker.kafka.transactions.Transactions._producer,
        ) = saved  # type: ignore[misc]


class _Run:
    """The driver of one seed: starts, crashes and restarts workers and plays the fault timeline."""

    def __init__(
        self, seed: int, models: Mapping[str, ServedModel], settings: Settings, loop: SimLoop, *, faults: bool
    ) -> None:
        self.loop = loop
        topic = requests_topic("text", settings.topic_prefix)
        self.sched = Scheduler(seed, topic, faults=faults)
        self.sched.now = loop.time
        self.plan = self.sched.plan
        settings = settings.model_copy(update={"session_timeout_ms": self.plan.session_timeout_ms})
        self.settings = settings
        self.cluster = Cluster(loop, self.sched, self.plan.partitions)
        self.cluster.session_timeout_s = self.plan.session_timeout_ms / 1000
        if settings.delivery == "exactly-once":
            if faults:
                draw_exactly_once(self.plan, seed)
            settings = settings.model_copy(
                update={"transaction_timeout_ms": self.plan.transaction_timeout_ms}
            )
            self.settings = settings
            self.cluster.transactions = TxnCoordinator(self.cluster)
            # A reply_to topic the broker refuses fails the whole transaction: its request is read again and
            # again (README, exactly-once's limits), so no seed of this mode has one.
            self.plan.blocked_for_good = False
        self.models = {
            name: dataclasses.replace(
                m,
                engine=FaultyEngine(m.engine, self.sched),
                preprocessor=FaultyPreprocessor(m.preprocessor, self.sched),
            )
            for name, m in models.items()
        }
        self.checker = Checker(
            self.cluster,
            settings,
            results_topic("text", settings.topic_prefix),
            dlq_topic(settings.topic_prefix),
        )
        self.cluster.checker = self.checker
        self.cluster.topics = {topic, REPLIES, BLOCKED}
        if self.plan.blocked_for_good:
            self.cluster.refused_for_good.add(BLOCKED)
        else:
            self.cluster.topics.discard(BLOCKED)  # a reply_to topic that does not exist
        self.worker: Worker | None = None
        #: the second worker while it runs (``Plan.peer``): it shares the models, the settings and the scheduler
        self.peer: Worker | None = None
        self.sched.kill = self._killed
        self._starting: asyncio.Task[None] | None = None
        self.tasks: list[asyncio.Task[Any]] = []

    async def main(self) -> None:
        self.tasks = [asyncio.create_task(self._produce()), asyncio.create_task(self._monitor())]
        self.tasks += [asyncio.create_task(self._outage(w)) for w in self.plan.outages]
        self.tasks += [asyncio.create_task(self._rebalance(w)) for w in self.plan.rebalances]
        self.tasks += [asyncio.create_task(self._crash(w)) for w in self.plan.crashes]
        self.tasks += [asyncio.create_task(self._terminate(w)) for w in self.plan.terminations]
        self.tasks += [asyncio.create_task(self._refuse(w)) for w in self.plan.refusals]
        if self.plan.peer is not None:
            self.tasks.append(asyncio.create_task(self._second_worker(self.plan.peer)))
        self._boot()
        await asyncio.sleep(self.plan.faults_end)
        self.sched.faulty = False
        self.cluster.note("faults stop")
        if not self.cluster.connected:
            self.cluster.restore()
        if self.cluster.share != set(self.cluster.partitions):
            self.cluster.rebalance(set(self.cluster.partitions))
        self.checker.quiet_since = self.loop.now
        deadline = self.loop.now + ANSWER_BOUND_S
        # Virtual time: a poll costs no wall time, and "settled" spans the checker and the cluster.
        while self.loop.now < deadline and not self._settled():  # noqa: ASYNC110
            await asyncio.sleep(0.5)
        if self._settled():
            idle_from = self.loop.now + 20.0
            await asyncio.sleep(IDLE_WATCH_S)
            self.checker.idle_rate(idle_from)
        else:
            await asyncio.sleep(max(0.0, deadline - self.loop.now))
        self.checker.final(self.worker, self.sched.wrong_outputs)
        await self._stop()

    def _settled(self) -> bool:
        c = self.cluster
        produced = sum(len(b) for b in c.logs.values()) == len(self.plan.batches)
        return (
            produced
            and self.checker.all_answered()
            and all(c.committed.get(tp, 0) >= c.end(tp) for tp in c.partitions)
        )

    def _boot(self) -> None:
        if self.worker is not None:
            return  # up already (restarted after a poison request, during a crash window)
        self.worker = Worker(self.settings, self.models)
        if self.worker.transactions is not None:
            self.worker.transactions.sim_clients = self.worker.clients  # type: ignore[attr-defined]
        self._starting = asyncio.create_task(self.worker.start())

    async def _stop(self) -> None:
        for w in (self.worker, self.peer):
            if w is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(w.drain(), 30)
                    await asyncio.wait_for(w.stop(), 30)
        for task in self.tasks:
            task.cancel()

    def _crash_now(self) -> None:
        w = self.worker
        if w is None:
            return
        self.cluster.note("crash")
        self.cluster.causes.append((self.loop.now, "crash", None))
        assert isinstance(w.clients, FakeClients)
        w.clients.crash()
        w.executor.shutdown()
        w.intake.executor.shutdown()
        doomed = [self._starting, w._fetching, w._observer, *w._loops, *w._state.tasks]
        for task in doomed:
            if task is not None:
                task.cancel()
        self.worker = None

    def _killed(self) -> None:
        """A poison request killed the process (from inside its preparation): restart it later."""
        self.cluster.note("killed by the poison request")
        self.cluster.poison_kills += 1
        if self._let_go_alive():
            self.cluster.handover_kills += 1
        self._crash_now()
        self.tasks.append(asyncio.ensure_future(self._restart(POISON_RESTART_S)))

    def _let_go_alive(self) -> bool:
        """Whether the dying process's last marker of the poison's partition is its own, revoked: it let the
        partition go with the poison running (its revoke's wait ran out), and the kill came after."""
        w = self.worker
        quarantine = w.fetch_loop.quarantine if w is not None else None
        tp = next(tp for _, tp, batch in self.plan.batches for r in batch.records if r.kind == "poison")
        key = f"{self.settings.group_id}/{tp.topic}/{tp.partition}".encode()
        last = next((Marker.from_json(v) for k, v in reversed(self.cluster.markers) if k == key), None)
        return quarantine is not None and last is not None and last.revoked and last.writer == quarantine.me

    async def _restart(self, after_s: float) -> None:
        await asyncio.sleep(after_s)
        self._boot()

    async def _produce(self) -> None:
        for at, tp, batch in self.plan.batches:
            await asyncio.sleep(max(0.0, at - self.loop.now))
            self.cluster.append(tp, batch)

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            self.checker.tick(self.worker)

    async def _outage(self, w: Window) -> None:
        await asyncio.sleep(w.at)
        if self.cluster.connected:
            self.cluster.cut()
            await asyncio.sleep(w.length)
            if self.sched.faulty:
                self.cluster.restore()

    async def _rebalance(self, w: Window) -> None:
        await asyncio.sleep(w.at)
        self.cluster.rebalance(w.arg)
        await asyncio.sleep(w.length)
        if self.sched.faulty:
            self.cluster.rebalance(set(self.cluster.partitions))

    async def _crash(self, w: Window) -> None:
        await asyncio.sleep(w.at)
        if self.worker is not None:
            self.cluster.other_crashes += 1
        self._crash_now()
        await asyncio.sleep(w.length)
        self._boot()

    async def _terminate(self, w: Window) -> None:
        """SIGTERM: as ``Worker.serve`` does, the worker drains what it holds (or, still starting, is stopped
        without one) and exits; a successor starts ``w.length`` s later. A crash or a poison kill during the
        drain ends it there, as it would end the process."""
        await asyncio.sleep(w.at)
        worker, starting = self.worker, self._starting
        if worker is None:
            return  # down already (a crash window, a poison kill): its restart brings the successor
        self.cluster.note("SIGTERM")
        await self._sigterm(worker, starting)
        if self.worker is worker:
            self.worker = None
            self.cluster.note("exited after its drain")
        await asyncio.sleep(w.length)
        self._boot()

    async def _sigterm(self, worker: Worker, starting: asyncio.Task[None] | None) -> None:
        """What ``Worker.serve`` does on SIGTERM: drain what ``worker`` holds (or, still starting, stop it
        without a drain), then stop it."""
        self.cluster.causes.append((self.loop.now, "termination", None))
        if starting is not None and not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
        else:
            with contextlib.suppress(Exception):
                await worker.drain()
        with contextlib.suppress(Exception):
            await worker.stop()

    async def _second_worker(self, w: Window) -> None:
        """A second worker joins the group at ``w.at`` (the first keeps ``w.arg``), answers its share through
        every fault of the plan, and is sent SIGTERM at ``w.end``: it drains (or, still starting, stops) and
        leaves, and the first is given every partition again."""
        await asyncio.sleep(w.at)
        self.cluster.peer_keep = set(w.arg)
        peer = Worker(self.settings, self.models)
        assert isinstance(peer.clients, FakeClients)
        peer.clients.peer = True
        if peer.transactions is not None:
            peer.transactions.sim_clients = peer.clients  # type: ignore[attr-defined]
        self.peer = peer
        self.cluster.note("a second worker starts")
        starting = asyncio.create_task(peer.start())
        await asyncio.sleep(w.length)
        self.cluster.note("the second worker is sent SIGTERM")
        await self._sigterm(peer, starting)
        self.peer = None
        self.cluster.note("the second worker exited")

    async def _refuse(self, w: Window) -> None:
        await asyncio.sleep(w.at)
        topic = (
            results_topic("text", self.settings.topic_prefix)
            if w.arg == "results"
            else dlq_topic(self.settings.topic_prefix)
        )
        self.cluster.refused_until[topic] = w.end
        self.cluster.note(f"acks of {topic} fail until {w.end:.1f}")


def run_seed(
    seed: int, *, keep_trace: bool = False, faults: bool = True, delivery: str = "at-least-once"
) -> SeedResult:
    """Run one seed to its end; the same seed gives the same trace (digest) every time.

    ``faults=False``: the seed's records only (all decodable), no fault: the control run. ``delivery``: the
    worker's delivery mode (exactly-once: its transactions over tests/sim/transactions.py).
    """
    models = tiny_bert()
    loop = SimLoop()
    run = _Run(seed, models, sim_settings(delivery), loop, faults=faults)
    run.checker.index(run.plan.batches)
    quiet = logging.getLogger("worker")
    level = quiet.level
    if not keep_trace:
        quiet.setLevel(logging.CRITICAL)
    try:
        with virtual_time(loop), _worker_seams(run.cluster, loop, run.sched):
            try:
                loop.run_until_complete(run.main())
            except Stuck as exc:
                run.checker.flag("I2", "other", "stuck", f"the simulated world deadlocked: {exc}")
            finally:
                _cancel_all(loop)
                loop.close()
    finally:
        quiet.setLevel(level)
    digest = hashlib.sha256("\n".join(run.cluster.trace).encode()).hexdigest()[:16]
    return SeedResult(
        seed,
        run.checker.violations,
        dict(run.checker.duplicates),
        digest,
        loop.now,
        run.plan.describe(),
        run.cluster.trace if keep_trace else [],
        delivery,
    )


def _cancel_all(loop: SimLoop) -> None:
    """Cancel what is left (a crashed worker's frozen tasks too), until cancelling starts nothing new."""
    for _ in range(10):
        tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
        if not tasks:
            return
        for task in tasks:
            task.cancel()
        with contextlib.suppress(BaseException):
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


def timed(
    seeds: Iterable[int], workers: int = 1, delivery: str = "at-least-once"
) -> tuple[list[SeedResult], float]:
    """Run ``seeds`` (over ``workers`` processes); returns their results and the wall seconds taken."""
    began = time.perf_counter()
    one = functools.partial(run_seed, delivery=delivery)
    if workers <= 1:
        return [one(s) for s in seeds], time.perf_counter() - began
    # spawn: a fork would copy ONNX Runtime's threads' state; each child loads the tiny model once.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        results = list(pool.map(one, seeds, chunksize=25))
    return results, time.perf_counter() - began
