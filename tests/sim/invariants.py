"""The invariants of the Kafka path, checked as the run goes (each commit, each acknowledged record,
each quarter second) and at its end. A violation names its invariant and the known defect it shows.

I1  no committed offset passes a record whose reply or DLQ record the broker has not acknowledged;
I2  once faults stop, every record gets its answer within a bound (a good record its reply where it
    asked, an undecodable one a DLQ record), every partition is fetched again and committed to its
    end, nothing stays paused; the member keeps its membership while paused; a revoke ends in bounded
    time; an idle worker's fetching settles;
I3  bytes (and requests) held stay under max_in_flight_bytes (max_in_flight) plus one fetch;
I4  /readyz false within a bound while the broker stays away, true again after recovery; /healthz
    false while the fetch loop is dead;
I5  a duplicate reply only after a crash, a rebalance or a rewind (give-up), counted per cause; under
    exactly-once none at all (the checker sees what a read_committed reader sees: committed transactions).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiokafka import TopicPartition

from tests.sim.faults import BLOCKED, REPLIES
from worker.kafka.offsets import _ANSWERED
from worker.run_state import FETCH_LOOP

if TYPE_CHECKING:
    from tests.sim.cluster import Cluster, Published, SimBatch, SimRecord
    from worker.app import Worker
    from worker.settings import Settings

#: The known defects a violation can show (its report lists seeds per defect).
DEFECTS = {
    "D1": "give-ups: the last seek wins, lower offsets committed unanswered",
    "D2": "a mid-batch undecodable record costs its neighbours",
    "D3": "a batch that does not inflate kills the fetch loop, health stays true",
    "D4": "paused beyond max_poll_interval: the member leaves the group",
    "D5": "UnknownTopicOrPartitionError during an outage taken as a refusal",
    "D6": "a model-loop exception outside run_batch: batch never answered",
    "D7": "forget/rewind stop counting queued jobs: held beyond the bound",
    "D8": "readiness does not turn false / true again",
    "D9": "a failure mark never cleared: an idle worker polls ~50/s for ever",
    "D10": "the revoke callback's commit has no time bound",
    "D11": "a poison request kills its worker over max_crash_attempts times, or is not answered as poison",
    "D12": "exactly-once: a request answered more than once to a read_committed reader",
    "other": "not one of the known defects",
}
#: After the broker has been away this long, /readyz must say no.
NOT_READY_WITHIN_S = 30.0
#: After recovery, with everything answered, /readyz must say yes again within this.
READY_AGAIN_WITHIN_S = 60.0
#: A dead fetch loop must show in /healthz within this.
DEAD_SEEN_WITHIN_S = 10.0
#: Fetches a second an idle worker may send once it settled.
IDLE_FETCHES_PER_S = 10.0


@dataclass(frozen=True)
class Violation:
    invariant: str
    defect: str
    at: float
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant} [{self.defect}] t={self.at:.3f}: {self.detail}"


@dataclass
class Answers:
    replies: list[Published] = field(default_factory=list)
    dlq: list[Published] = field(default_factory=list)


class Checker:
    """Watches the cluster and the live worker; collects violations (one per invariant and subject)."""

    def __init__(self, cluster: Cluster, settings: Settings, prefix_results: str, dlq: str) -> None:
        self.cluster = cluster
        self.settings = settings
        self.results_topic = prefix_results
        self.dlq_topic = dlq
        self.violations: list[Violation] = []
        self._seen: set[tuple[str, str]] = set()
        self.by_id: dict[str, tuple[TopicPartition, SimRecord]] = {}
        self.by_coord: dict[tuple[int, int], SimRecord] = {}
        self.answers: dict[tuple[int, int], Answers] = {}
        self.quiet_since: float | None = None
        self.max_job_bytes = 1
        self._fetch_dead_since: float | None = None
        self._loop_dead_since: float | None = None
        self.duplicates: Counter[str] = Counter()

    def index(self, batches: list[tuple[float, TopicPartition, SimBatch]]) -> None:
        for _, tp, batch in batches:
            for record in batch.records:
                self._index(tp, record)

    def _index(self, tp: TopicPartition, record: SimRecord) -> None:
        if record.request_id is not None:
            self.by_id[record.request_id] = (tp, record)
        self.by_coord[(tp.partition, record.offset)] = record

    def flag(self, invariant: str, defect: str, subject: str, detail: str) -> None:
        if (invariant, subject) in self._seen:
            return
        self._seen.add((invariant, subject))
        self.violations.append(Violation(invariant, defect, self.cluster.loop.now, detail))
        self.cluster.note(f"VIOLATION {invariant} [{defect}] {detail}")

    # --- events from the fakes -----------------------------------------------------------

    def on_output(self, pub: Published) -> None:
        if pub.topic == self.dlq_topic:
            for coord in _dlq_coordinates(pub.headers):
                self.answers.setdefault(coord, Answers()).dlq.append(pub)
                record = self.by_coord.get(coord)
                undelivered = pub.headers.get("reply_undelivered", "")
                if "UnknownTopicOrPartitionError" in undelivered and record is not None:
                    self.flag("I2", "D5", f"undelivered {coord}",
                              f"partition {coord[0]} offset {coord[1]}: reply given up as refused ({undelivered})")  # fmt: skip
                if (
                    record is not None
                    and record.kind in ("good", "invalid")
                    and pub.headers.get("error_code") == "undecodable_input"
                ):
                    self.flag("I2", "D2", f"charged {coord}",
                              f"partition {coord[0]} offset {coord[1]} (decodable) sent to the DLQ as undecodable")  # fmt: skip
            return
        try:
            rid = json.loads(pub.value).get("id")
        except ValueError:
            rid = None
        found = self.by_id.get(rid) if isinstance(rid, str) else None
        if found is None:  # an unparsable request: its reply carries the record's key as correlation id
            found = self.by_id.get(pub.correlation_id)
        if found is None:
            self.flag("I2", "other", f"stray {pub.topic}", f"a reply on {pub.topic} names no request")
            return
        tp, record = found
        self.answers.setdefault((tp.partition, record.offset), Answers()).replies.append(pub)
        if (
            record.reply_to == REPLIES
            and pub.topic != REPLIES
            and pub.headers.get("reply_to_refused") == "refused_by_broker"
        ):
            self.flag("I2", "D5", f"rerouted {record.request_id}",
                      f"{record.request_id}'s reply_to {REPLIES} (it exists, never refused) re-routed as refused_by_broker")  # fmt: skip

    def on_commit(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, committed in offsets.items():
            for offset in range(committed):
                if (tp.partition, offset) not in self.answers:
                    record = self.by_coord.get((tp.partition, offset))
                    self.flag("I1", self._unacked_cause(tp, offset, record), f"{tp.partition}:{offset}",
                              f"commit {committed} on partition {tp.partition} passes offset {offset} "
                              f"({record.kind if record else '?'}) with nothing acknowledged")  # fmt: skip

    def _unacked_cause(self, tp: TopicPartition, offset: int, record: SimRecord | None) -> str:
        """D5 when the producer refused this record's answer for want of metadata, else D1 (given up)."""
        mine = {f"{tp.topic}:{tp.partition}:{offset}"} | (
            {record.request_id} if record and record.request_id else set()
        )
        if any(correlation in mine for _, _, correlation in self.cluster.unknown_topic):
            return "D5"
        return "D1"

    def on_member_dropped(self, why: str) -> None:
        if "max_poll_interval" in why:
            self.flag("I2", "D4", "left the group", f"the member left the group: {why}")

    def on_revoke_done(self, began: float, revoked: set[TopicPartition]) -> None:
        took = self.cluster.loop.now - began
        bound = self.settings.session_timeout_ms / 1000 + 5.0
        if revoked and took > bound:
            self.flag(
                "I2", "D10", "revoke held", f"the revoke callback took {took:.1f} s (bound {bound:.0f} s)"
            )

    # --- every quarter second ------------------------------------------------------------

    def tick(self, worker: Worker | None) -> None:
        now = self.cluster.loop.now
        if worker is None or worker.consumer is None:
            return
        self._held(worker)
        ready = worker.metrics.live and worker.ready
        cluster = self.cluster
        if not cluster.connected and now - cluster.outage_began >= NOT_READY_WITHIN_S and ready:
            self.flag("I4", "D8", f"ready in outage {cluster.outage_began:.0f}",
                      f"/readyz true with the broker away for {now - cluster.outage_began:.0f} s")  # fmt: skip
        if (
            self.quiet_since is not None
            and now - self.quiet_since >= READY_AGAIN_WITHIN_S
            and self.all_answered()
            and not ready
        ):
            why = ",".join(sorted(worker.not_ready_reasons())) or "no partitions"
            self.flag("I4", "D8", "not ready after recovery",
                      f"/readyz still false {now - self.quiet_since:.0f} s after the faults stopped ({why})")  # fmt: skip
        fetching = worker._fetching
        if FETCH_LOOP in worker._state.dead_loops:
            # Restarted by its supervisor, but every partition starts over from its committed offset:
            # No exception may end the fetch loop.
            self.flag("I2", "D3", "fetch loop restarted", "the fetch loop died (its supervisor restarts it)")
        # A drain ends the fetch loop on purpose (the run's own stop, at its end).
        if fetching is not None and fetching.done() and not (worker._state.stopping or worker.flow.draining):
            if self._fetch_dead_since is None:
                self._fetch_dead_since = now
                error = None if fetching.cancelled() else fetching.exception()
                self.flag("I2", "D3", "fetch loop died", f"the fetch loop ended: {error!r}")
            if now - self._fetch_dead_since >= DEAD_SEEN_WITHIN_S and worker.metrics.live:
                self.flag("I4", "D3", "healthz with dead fetch loop",
                          "/healthz true with the fetch loop dead for 10 s")  # fmt: skip
        else:
            self._fetch_dead_since = None
        # A drain ends the model loops on purpose too (its batchers closed): /healthz stays true meanwhile.
        ending = worker._state.stopping or worker.flow.draining
        dead_loops = [t for t in worker._loops if t.done()] if not ending else []
        if dead_loops and self._loop_dead_since is None:
            self._loop_dead_since = now
        elif not dead_loops:
            self._loop_dead_since = None
        if (
            self._loop_dead_since is not None
            and now - self._loop_dead_since >= DEAD_SEEN_WITHIN_S
            and worker.metrics.live
        ):
            self.flag("I4", "other", "healthz with dead model loop",
                      "/healthz true with a model loop dead (not restarted) for 10 s")  # fmt: skip

    def _held(self, worker: Worker) -> None:
        """I3. Held = the larger of what the tracker counts and what waits in the batchers: a lower bound
        of their union that stays right whichever of the two a fix makes count the queued jobs."""
        s = self.settings
        queued = [
            q.item for b in worker.batchers.values() for bucket in b.queue._queues.values() for q in bucket
        ]
        queued_bytes = sum(len(j.origin.raw) + j.prepared_bytes for j in queued)
        for job in queued:
            self.max_job_bytes = max(self.max_job_bytes, len(job.origin.raw) + job.prepared_bytes)
        held = max(worker.tracker.bytes_in_flight, queued_bytes)
        bound = s.max_in_flight_bytes + s.fetch_max_records * self.max_job_bytes
        if held > bound:
            self.flag("I3", "D7", "bytes", f"{held} bytes held ({len(queued)} queued jobs), bound {bound}")
        # The request count's bound is for records that decoded: a round takes up to fetch_max_records
        # of them, plus whatever of one batch per partition could not be decoded (worker/kafka/fetching.py:
        # a batch read past a failure may go past the round's room). Those hold no bytes and leave
        # with their DLQ record; they are bounded apart, by the batches one round can read.
        undecodable = self._undecodable_held(worker)
        count = max(worker.tracker.in_flight - undecodable, len(queued))
        if count > s.max_in_flight + s.fetch_max_records:
            self.flag("I3", "D7", "count",
                      f"{count} decoded requests held, bound {s.max_in_flight} + {s.fetch_max_records}")  # fmt: skip
        one_round = sum(
            max((len(b.records) for b in self.cluster.logs[tp]), default=0) for tp in self.cluster.partitions
        )
        if undecodable > s.max_in_flight + one_round:
            self.flag("I3", "other", "undecodable count",
                      f"{undecodable} undecodable records held, bound {s.max_in_flight} + {one_round}")  # fmt: skip

    def _undecodable_held(self, worker: Worker) -> int:
        """Records the tracker counts (unanswered, or dropped while their DLQ record is still out) that
        the client cannot decode."""
        tracker = worker.tracker
        coords = [
            (tp.partition, offset)
            for tp, pending in tracker._pending.items()
            for offset, (_, held) in pending.items()
            if held != _ANSWERED
        ]
        coords += [(tp.partition, offset) for tp, _, offset in tracker._held]
        kinds = ("bad_header", "corrupt")
        return sum(1 for c in coords if (r := self.by_coord.get(c)) is not None and r.kind in kinds)

    # --- the end -------------------------------------------------------------------------

    def answered(self, tp: TopicPartition, record: SimRecord) -> bool:
        got = self.answers.get((tp.partition, record.offset))
        if got is None:
            return False
        if record.kind in ("bad_header", "corrupt"):
            return bool(got.dlq)
        if record.kind == "poison":
            return any(p.headers.get("error_code") == "poison_suspected" for p in got.dlq)
        return bool(got.replies) or (record.reply_to == BLOCKED and bool(got.dlq))

    def all_answered(self) -> bool:
        return all(self.answered(tp, r) for tp, r in self.cluster.records())

    def final(self, worker: Worker | None, wrong_outputs: list[float]) -> None:
        """I2 and I5 once the faults stopped and the bound passed."""
        cluster = self.cluster
        missing = [(tp, r) for tp, r in cluster.records() if not self.answered(tp, r)]
        by_defect: dict[str, list[tuple[TopicPartition, SimRecord]]] = {}
        for tp, record in missing:
            by_defect.setdefault(self._unanswered_cause(tp, record, wrong_outputs), []).append((tp, record))
        for defect, records in sorted(by_defect.items()):
            shown = ", ".join(f"{tp.partition}:{r.offset}({r.kind})" for tp, r in records[:8])
            self.flag("I2", defect, f"unanswered {defect}", f"{len(records)} records never answered: {shown}")
        for tp in cluster.partitions:
            if cluster.committed.get(tp, 0) < cluster.end(tp):
                first = next((r for t, r in missing if t == tp), None)
                if first is not None:
                    defect = self._unanswered_cause(tp, first, wrong_outputs)
                elif self._fetch_dead_since is not None:
                    defect = "D3"
                else:  # answered (by an earlier copy) but held: a batch lost with its counts
                    defect = "D6" if wrong_outputs else "other"
                self.flag("I2", defect, f"uncommitted {tp.partition}",
                          f"partition {tp.partition} committed to {cluster.committed.get(tp, 0)}, "
                          f"its end is {cluster.end(tp)}")  # fmt: skip
        consumer = worker.consumer if worker is not None else None
        if consumer is None:
            self.flag("I2", "other", "no consumer", "no worker is consuming at the end")
        elif consumer.paused() or consumer.assignment() != set(cluster.partitions):
            # A batch lost with its counts holds backpressure for good (D6).
            self.flag("I2", "D6" if wrong_outputs else "other", "paused", f"at the end: paused {sorted(consumer.paused())}, "
                      f"assigned {sorted(consumer.assignment())}")  # fmt: skip
        # Each record keeps its own count of crashes while it ran alone: crashes with other causes do not
        # cost the poison deaths (seed 39: they did, when the quarantine named one record per partition).
        # A death after its process let the partition go alive counts as a hand-over, not a crash
        # (HANDOVERS_PER_CRASH of them in a row count one): each may cost one death more (seed 6110).
        if cluster.poison_kills > self.settings.max_crash_attempts + cluster.handover_kills:
            self.flag("I2", "D11", "poison kills",
                      f"the poison request killed its worker {cluster.poison_kills} times (max_crash_attempts "
                      f"{self.settings.max_crash_attempts}, {cluster.handover_kills} after a hand-over, "
                      f"{cluster.other_crashes} crashes with other causes)")  # fmt: skip
        self._duplicates()

    def _unanswered_cause(self, tp: TopicPartition, record: SimRecord, wrong_outputs: list[float]) -> str:
        if record.kind == "poison":
            return "D11"
        got = self.answers.get((tp.partition, record.offset))
        if got is not None and any(p.headers.get("error_code") == "undecodable_input" for p in got.dlq):
            return "D2"
        if got is not None and any(
            "UnknownTopicOrPartition" in p.headers.get("reply_undelivered", "") for p in got.dlq
        ):
            return "D5"
        if self._fetch_dead_since is not None:
            return "D3"
        lost = [v for v in self.violations if v.invariant == "I1" and f"offset {record.offset} " in v.detail
                and f"partition {tp.partition} " in v.detail]  # fmt: skip
        if lost:
            return lost[0].defect
        if wrong_outputs:
            return "D6"
        return "other"

    def idle_rate(self, since: float) -> None:
        calls = [t for t in self.cluster.getmany_calls if t >= since]
        span = self.cluster.loop.now - since
        rate = len(calls) / span if span > 0 else 0.0
        if rate > IDLE_FETCHES_PER_S:
            self.flag("I2", "D9", "idle polling",
                      f"an idle worker sent {rate:.0f} fetches a second ({len(calls)} in {span:.0f} s)")  # fmt: skip

    def _duplicates(self) -> None:
        fetched: dict[tuple[int, int], list[float]] = {}
        for at, tp, offset in self.cluster.fetches:
            fetched.setdefault((tp.partition, offset), []).append(at)
        for coord, got in self.answers.items():
            copies = got.replies or got.dlq
            if len(copies) < 2:
                continue
            if self.settings.delivery == "exactly-once":
                self.flag("I5", "D12", f"dup {coord}",
                          f"partition {coord[0]} offset {coord[1]} answered {len(copies)} times in committed "
                          f"transactions, at {', '.join(f'{c.at:.3f}' for c in copies)}")  # fmt: skip
            times = fetched.get(coord, [])
            lo, hi = (times[0], times[-1]) if len(times) >= 2 else (copies[0].at - 60.0, copies[-1].at)
            causes = [
                c
                for at, c, tp in self.cluster.causes
                if lo <= at <= hi and (tp is None or tp.partition == coord[0])
            ]
            if causes:  # the first cause after the first fetch: a crash's rejoin is not its cause
                self.duplicates[causes[0]] += len(copies) - 1
            else:
                self.duplicates["unexplained"] += len(copies) - 1
                self.flag("I5", "other", f"dup {coord}",
                          f"partition {coord[0]} offset {coord[1]} answered {len(copies)} times, "
                          f"fetched {len(times)} times, no crash, rebalance or rewind between")  # fmt: skip


def _dlq_coordinates(headers: dict[str, str]) -> list[tuple[int, int]]:
    """The request coordinates a DLQ record names: source_offset, or a list/range where a fix adds one."""
    try:
        partition = int(headers["source_partition"])
    except (KeyError, ValueError):
        return []
    offsets: set[int] = set()
    if "source_offset" in headers:
        offsets.add(int(headers["source_offset"]))
    if "source_offsets" in headers:
        offsets.update(int(o) for o in headers["source_offsets"].replace(" ", "").split(",") if o)
    if "source_last_offset" in headers and "source_offset" in headers:
        offsets.update(range(int(headers["source_offset"]), int(headers["source_last_offset"]) + 1))
    return [(partition, o) for o in sorted(offsets)]
