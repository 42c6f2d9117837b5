"""The seeded scheduler: one seed draws the workload and the fault timeline, and answers every
per-call question (raise here? how long does this take?) from its own stream.

Everything random in a run comes from here, and the loop is single-threaded and virtual, so a seed
replays exactly (the same trace, line for line).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError, TopicAuthorizationFailedError

from bench.samples import request_bytes
from tests.sim.cluster import SimBatch, SimRecord
from worker.answers import run_batch

#: Reply topics a request may name: one that exists and takes records, one the broker refuses for good.
REPLIES, BLOCKED = "team.replies", "team.blocked"
#: The text of the poison request: preparing it kills the process, every time (``FaultyPreprocessor``).
POISON = "this request kills whoever prepares it"
#: Seeds with one poison request among their good ones.
POISON_P = 0.15
#: Seeds in which the worker is sent SIGTERM mid-stream: it drains and exits, and a successor starts later.
TERMINATION_P = 0.2
#: The salt of the termination's own stream: one under which no seed pinned in tests/test_simulation.py
#: draws a termination, so the worlds those seeds were pinned for stay as they were found (checked there).
TERMINATION_SALT = 880
#: Seeds in which a second worker joins the group mid-stream, answers its share of the partitions, and leaves
#: by SIGTERM (its drain) later; seeds with a poison request have none (the kill would have to pick a process).
PEER_P = 0.25
#: The salt of the second worker's own stream, chosen as TERMINATION_SALT was (checked in tests/test_simulation.py).
PEER_SALT = 3322
#: Outage lengths (s): within publish_retry_s, past it, past the 10 s session, past the 40 s producer timeouts.
OUTAGE_LENGTHS = (2.0, 6.0, 15.0, 30.0, 45.0, 70.0)
_WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "models", "answer")


@dataclass
class Window:
    """A fault active from ``at`` for ``length`` seconds (what it does depends on the list it is in)."""

    at: float
    length: float
    arg: Any = None

    @property
    def end(self) -> float:
        return self.at + self.length


@dataclass
class Plan:
    """One seed's world: partitions, the records and when they arrive, and every timed fault."""

    partitions: list[TopicPartition]
    batches: list[tuple[float, TopicPartition, SimBatch]]
    outages: list[Window] = field(default_factory=list)
    rebalances: list[Window] = field(default_factory=list)  # arg: the partitions this worker keeps
    crashes: list[Window] = field(default_factory=list)  # length: until the restart
    #: SIGTERM: the worker drains what it holds and exits (Worker.serve's path); length: until a successor starts
    terminations: list[Window] = field(default_factory=list)
    #: a second worker in the group from ``at`` until its SIGTERM at ``end``; arg: the partitions the first keeps
    peer: Window | None = None
    refusals: list[Window] = field(default_factory=list)  # arg: the topic whose acks fail meanwhile
    hang: Window | None = None  # one model run takes ``length`` seconds
    blocked_for_good: bool = False
    engine_fault_p: float = 0.0
    getmany_fault_p: float = 0.0
    commit_fault_p: float = 0.0
    slow_ack_p: float = 0.0
    #: per commit or publish: the connection drops right then (for one of OUTAGE_LENGTHS)
    cut_p: float = 0.0
    faults_end: float = 0.0
    #: the worker's session_timeout_ms: the default, or one longer than most outages
    session_timeout_ms: int = 10_000
    #: exactly-once: the worker's transaction_timeout_ms (the broker aborts a transaction open longer and
    #: fences its producer): the default, or one shorter than most outages
    transaction_timeout_ms: int = 60_000
    #: exactly-once: another member takes over this worker's partitions when it is dropped (its session
    #: expiring in an outage), fencing their producers
    taken_over_when_dropped: bool = False

    def without_faults(self) -> Plan:
        """The same records and arrivals, every record decodable, and no fault at all (a control run)."""
        for _, _, batch in self.batches:
            batch.codec = None
            for record in batch.records:
                if record.kind in ("bad_header", "corrupt"):
                    record.kind = "good"
        last = max(at for at, _, _ in self.batches)
        return Plan(
            self.partitions, self.batches, session_timeout_ms=self.session_timeout_ms, faults_end=last
        )

    def describe(self) -> str:
        parts = [
            f"{len(self.partitions)} partitions",
            f"{sum(len(b.records) for _, _, b in self.batches)} records",
        ]
        kinds: dict[str, int] = {}
        for _, _, batch in self.batches:
            for r in batch.records:
                kinds[r.kind] = kinds.get(r.kind, 0) + 1
        parts.append(str(kinds))
        for name in ("outages", "rebalances", "crashes", "terminations", "refusals"):
            windows = getattr(self, name)
            if windows:
                parts.append(f"{name} " + ", ".join(f"{w.at:.0f}+{w.length:.0f}s" for w in windows))
        parts.append(f"session {self.session_timeout_ms // 1000}s")
        if self.transaction_timeout_ms != Plan.transaction_timeout_ms:
            parts.append(f"transaction timeout {self.transaction_timeout_ms // 1000}s")
        if self.taken_over_when_dropped:
            parts.append("taken over when dropped")
        if self.peer is not None:
            kept = sorted(tp.partition for tp in self.peer.arg)
            parts.append(f"second worker {self.peer.at:.0f}+{self.peer.length:.0f}s (the first keeps {kept})")
        if self.hang is not None:
            parts.append(f"hang {self.hang.at:.0f}+{self.hang.length:.0f}s")
        return "; ".join(parts)


def draw_plan(rng: random.Random, topic: str) -> Plan:
    """The workload and the fault timeline of one seed (the first draws of its stream)."""
    partitions = [TopicPartition(topic, p) for p in range(rng.randint(1, 4))]
    horizon = 120.0
    batches: list[tuple[float, TopicPartition, SimBatch]] = []
    next_offset = dict.fromkeys(partitions, 0)
    n = 0
    for _ in range(rng.randint(3, 14)):
        tp = rng.choice(partitions)
        at = round(rng.uniform(0.0, horizon * 0.75), 3)
        size = rng.randint(1, 8)
        bad_at = rng.randrange(size) if rng.random() < 0.15 else None
        codec = rng.choice(["gzip", "zstd", "lz4"]) if rng.random() < 0.04 else None
        records = []
        for i in range(size):
            n += 1
            rid = f"r{n}"
            kind = "corrupt" if codec else "bad_header" if i == bad_at else "good"
            if kind == "good" and rng.random() < 0.06:
                kind = "invalid"
            reply_to = None
            headers: list[tuple[str, bytes]] = []
            roll = rng.random()
            if roll < 0.12:
                reply_to = REPLIES
            elif roll < 0.16:
                reply_to = BLOCKED
            if reply_to:
                headers.append(("reply_to", reply_to.encode()))
            text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
            value = b"{not json" if kind == "invalid" else request_bytes(rid, "bert", {"text": text})
            records.append(SimRecord(0, value, rid.encode(), headers, kind, rid, reply_to))
        batches.append((at, tp, SimBatch(records, codec)))
    batches.sort(key=lambda b: (b[0], b[1].partition))
    for _, tp, batch in batches:  # offsets in arrival order per partition
        for record in batch.records:
            record.offset = next_offset[tp]
            next_offset[tp] += 1
    plan = Plan(partitions, batches)
    arrivals = [at for at, _, _ in batches]
    for _ in range(rng.choice([0, 0, 1, 2])):
        keep = {tp for tp in partitions if rng.random() < 0.5}
        plan.rebalances.append(Window(_when(rng, arrivals, horizon), rng.uniform(2, 30), keep))
    for _ in range(rng.choice([0, 0, 1, 1, 2])):
        length = rng.choice(OUTAGE_LENGTHS)
        if plan.rebalances and rng.random() < 0.2:
            # The coordinator goes away while a rebalance's revoke callback runs (it commits).
            at = rng.choice(plan.rebalances).at + rng.uniform(0.0, 2.0)
        else:
            at = _when(rng, arrivals, horizon - 20)
        plan.outages.append(Window(at, length))
    if rng.random() < 0.3:
        plan.crashes.append(Window(_when(rng, arrivals, horizon), rng.uniform(0.5, 15)))
    for _ in range(rng.choice([0, 0, 1])):
        plan.refusals.append(
            Window(rng.uniform(1, horizon), rng.uniform(1, 10), rng.choice(["results", "dlq"]))
        )
    if rng.random() < 0.15:
        plan.hang = Window(rng.uniform(1, horizon / 2), rng.choice([20.0, 90.0, 200.0, 330.0, 360.0]))
    if plan.hang is not None and rng.random() < 0.5:
        # A rebalance while the stalled model's requests wait in the batcher (they stay held).
        plan.rebalances.append(Window(plan.hang.at + rng.uniform(1, 10), rng.uniform(2, 30), set(partitions)))
    plan.blocked_for_good = rng.random() < 0.5
    plan.session_timeout_ms = rng.choice([10_000, 60_000])
    plan.engine_fault_p = rng.choice([0.0, 0.0, 0.03, 0.1])
    plan.getmany_fault_p = rng.choice([0.0, 0.0, 0.01, 0.05])
    plan.commit_fault_p = rng.choice([0.0, 0.02])
    plan.slow_ack_p = rng.choice([0.0, 0.05])
    plan.cut_p = rng.choice([0.0, 0.0, 0.0, 0.01, 0.03])
    ends = [horizon]
    ends += [w.end for w in plan.outages + plan.rebalances + plan.crashes + plan.refusals]
    ends += [plan.hang.end] if plan.hang else []
    plan.faults_end = max(ends)
    return plan


def _when(rng: random.Random, arrivals: list[float], horizon: float) -> float:
    """When a fault begins: half the time just after records arrive (while their answers are in flight,
    where a fault costs most), else anywhere."""
    if arrivals and rng.random() < 0.5:
        return rng.choice(arrivals) + rng.uniform(0.001, 0.05)
    return rng.uniform(1, horizon)


class Scheduler:
    """Answers the fakes' per-call questions from the seed; silent once the faults stop."""

    def __init__(self, seed: int, topic: str, *, faults: bool = True) -> None:
        self.seed = seed
        self.plan = draw_plan(random.Random(seed), topic)
        if not faults:
            self.plan = self.plan.without_faults()
        if faults:
            # Its own stream: drawing the poison leaves every other draw of the seed as it was.
            _poison_one(self.plan, random.Random(seed * 7919 + 5))
            draw_termination(self.plan, seed)
            draw_peer(self.plan, seed)
        self.rng = random.Random(seed * 1_000_003 + 17)
        #: kills the worker process at once and restarts it later (the run sets it)
        self.kill: Callable[[], None] | None = None
        self.faulty = True
        #: times at which a model run returned the wrong number of outputs
        self.wrong_outputs: list[float] = []
        self.now: Callable[[], float] = lambda: 0.0
        self._hung = False

    def getmany_fault(self) -> BaseException | None:
        if not self.faulty or self.rng.random() >= self.plan.getmany_fault_p:
            return None
        if self.rng.random() < 0.5:
            return KafkaError("Unexpected error during data retrieval")
        return TopicAuthorizationFailedError("simulated")

    def commit_fault(self) -> bool:
        return self.faulty and self.rng.random() < self.plan.commit_fault_p

    def cut_now(self) -> float | None:
        """Whether the connection drops during this call, and for how long."""
        if self.faulty and self.plan.cut_p and self.rng.random() < self.plan.cut_p:
            return self.rng.choice(OUTAGE_LENGTHS)
        return None

    def ack_latency(self) -> float:
        if self.faulty and self.rng.random() < self.plan.slow_ack_p:
            return self.rng.uniform(0.5, 3.0)
        return self.rng.uniform(0.001, 0.01)

    def delay_of(self, fn: Callable[..., Any]) -> float | None:
        """How long an executor call takes: a model run (maybe the one that hangs), or intake's preparing."""
        if getattr(fn, "func", None) is run_batch:
            hang = self.plan.hang
            if hang is not None and not self._hung and self.now() >= hang.at:
                self._hung = True
                return hang.length
            return self.rng.uniform(0.002, 0.02)
        return self.rng.uniform(0.0005, 0.005)

    def engine_fault(self) -> str | None:
        if not self.faulty or self.rng.random() >= self.plan.engine_fault_p:
            return None
        return self.rng.choice(["raise", "wrong_outputs"])


def draw_exactly_once(plan: Plan, seed: int) -> None:
    """Exactly-once seeds: the worker's transaction timeout and whether another member takes over a dropped
    member's partitions, each from a stream of its own (every other draw of the seed stays as it was). The
    timeout is the default, above the simulated worker's own bound on a transaction (publish_retry_s 4 s + 15 s),
    or one below it, as the defaults are in production (60 s against 75 s); half the seeds have the other member.
    """
    plan.transaction_timeout_ms = random.Random(seed * 104_729 + 11).choice([60_000, 60_000, 10_000])
    plan.taken_over_when_dropped = random.Random(seed * 7_727 + 1).random() < 0.5


def draw_termination(plan: Plan, seed: int) -> None:
    """In TERMINATION_P of the seeds, a SIGTERM mid-stream (half the time just after records arrive, while
    their answers are in flight), from a stream of its own: every other draw of the seed stays as it was."""
    rng = random.Random(seed * 15_485_863 + TERMINATION_SALT)
    if rng.random() >= TERMINATION_P:
        return
    arrivals = [at for at, _, _ in plan.batches]
    window = Window(_when(rng, arrivals, max(arrivals, default=60.0) + 5.0), rng.uniform(0.5, 15.0))
    plan.terminations.append(window)
    plan.faults_end = max(plan.faults_end, window.end)


def draw_peer(plan: Plan, seed: int) -> None:
    """In PEER_P of the seeds without a poison request, a second worker joins the group mid-stream (half the time
    just after records arrive) and leaves by SIGTERM 5-90 s later, from a stream of its own: every other draw of
    the seed stays as it was. Meanwhile the first keeps a drawn part of the partitions (maybe none), the second
    the rest."""
    rng = random.Random(seed * 32_452_843 + PEER_SALT)
    if rng.random() >= PEER_P or any(r.kind == "poison" for _, _, b in plan.batches for r in b.records):
        return
    arrivals = [at for at, _, _ in plan.batches]
    keep = {tp for tp in plan.partitions if rng.random() < 0.5}
    keep.discard(rng.choice(plan.partitions))  # the second worker gets one partition at least
    plan.peer = Window(_when(rng, arrivals, max(arrivals, default=60.0)), rng.uniform(5.0, 90.0), keep)
    plan.faults_end = max(plan.faults_end, plan.peer.end)


def _poison_one(plan: Plan, rng: random.Random) -> None:
    """In POISON_P of the seeds, one good request becomes poison: its preparation kills the process."""
    good = [
        r for _, _, batch in plan.batches for r in batch.records if r.kind == "good" and batch.codec is None
    ]
    if not good or rng.random() >= POISON_P:
        return
    record = rng.choice(good)
    record.kind = "poison"
    assert record.request_id is not None
    record.value = request_bytes(record.request_id, "bert", {"text": POISON})


class FaultyPreprocessor:
    """The real preprocessor behind a seam: preparing the poison request kills the process, as a crash in
    native decoder code (or an OOM kill) would; faults stopping does not stop it (it is the request's)."""

    def __init__(self, preprocessor: Any, sched: Scheduler) -> None:
        self._preprocessor = preprocessor
        self._sched = sched

    def __getattr__(self, name: str) -> Any:
        return getattr(self._preprocessor, name)

    def prepare(self, item: Any) -> Any:
        if getattr(item, "text", None) == POISON and self._sched.kill is not None:
            self._sched.kill()
            raise RuntimeError("simulated: the process died preparing this request")
        return self._preprocessor.prepare(item)


class FaultyEngine:
    """The real engine behind a seam that can fail a run or return the wrong number of outputs."""

    def __init__(self, engine: Any, sched: Scheduler) -> None:
        self._engine = engine
        self._sched = sched

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def run(self, batch: Any, key: Any = None, pad_values: Any = None) -> list[Any]:
        fault = self._sched.engine_fault()
        if fault == "raise":
            raise RuntimeError("simulated: the engine failed")
        outputs: list[Any] = self._engine.run(batch, key, pad_values)
        if fault == "wrong_outputs":
            self._sched.wrong_outputs.append(self._sched.now())
            return [*outputs, outputs[-1]]
        return outputs
