"""The deterministic simulation of the Kafka path (tests/sim): the real Worker over fake aiokafka
surfaces, a virtual clock and a seeded fault scheduler, checked against the Kafka path's invariants.

The invariants test runs ``SIM_SEEDS`` seeds (default 1000) at-least-once and ``SIM_EOS_SEEDS`` (default 500)
exactly-once over ``SIM_WORKERS`` processes (default 2): about 40 s of wall time per 1000 seeds on the 2-core
project machine (more beside other jobs). The long run is ``python -m tests.sim --minutes 30 --workers 2``
(``--delivery exactly-once`` for the worker's transactions); a failing seed replays, trace and all, with
``python -m tests.sim --seed N --trace`` (plus its ``--delivery``).

FIXED_DEFECTS are the defects the simulation found, each with the seed that showed it before its
fix: that seed now violates nothing.
OPEN_DEFECTS are defects found and not yet fixed, each with a seed that shows it: their violations
are reported, not failed on; any other violation fails. When a fix lands,
``test_open_defect_is_still_found`` fails for its entry: move it to FIXED_DEFECTS.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sim.__main__ import summary
from tests.sim.faults import Scheduler
from tests.sim.invariants import DEFECTS
from tests.sim.run import DELIVERIES, REPLAY, replay, run_seed, timed

ROOT = Path(__file__).resolve().parent.parent

#: defect -> a seed that shows it on the code under test, not yet fixed (its fix lands with a test, then
#: the entry moves to FIXED_DEFECTS).
OPEN_DEFECTS: dict[str, int] = {}

#: defect -> the seed that showed it before its fix.
FIXED_DEFECTS = {
    "D1": 104,  # several give-ups in a partition: the last seek must not win, losing lower offsets
    "D2": 3,  # a mid-batch undecodable record costs only itself, not the good records after it
    "D3": 1,  # a batch that does not inflate does not end the fetch loop
    "D4": 93,  # paused beyond max_poll_interval_ms, the member stays in the group
    "D5": 1015,  # UnknownTopicOrPartitionError during an outage is retried, not taken as a refusal
    "D6": 37,  # an exception in a model loop outside run_batch: the batch is still answered
    "D7": 576,  # forget()/rewind() keep counting queued jobs: no more held than the bound
    "D8": 2,  # /readyz false with the broker away, true again after recovery
    "D9": 45,  # a failure mark clears: an idle worker does not fetch ~50 times a second
    "D10": 156,  # the commit in the revoke callback is bounded in time
    "D3b": 1662,  # a record failing to decode in the paused poll (keep_membership) ended the fetch loop
    # a revoke during a fetch round while the coordinator is away: the seek to the committed offsets
    # timed out and ended the fetch loop (its supervisor rewound every partition, backing off to 30 s)
    "D3c": 705532524,
    # every partition held paused by the quarantine (a record run alone after a crash) during a 330 s
    # model hang: the fetcher did not poll, and the member left the group
    "D4b": 1828,
    # /readyz stayed false (publish_failing) for good once idle: re-fetched copies succeeded while the
    # first calls still retried, and once those gave up no publish came to clear it
    "D8b": 2545546687,
    # the revoke callback took 15.0 s, its bound, in an outage: the quarantine's marker release (5 s of its
    # own) after the 5 s wait for answers and the 5 s commit; they now share the commit's budget
    "D10b": 7420,
    # a round whose records went back to the broker behind a held partition's backlog, with an undecodable
    # record after them: the deferral sought past them, and the commit after the held ones passed them
    # unanswered; the partition, never paused again, then re-read the batch every 45 ms for 70 s
    "D1b": 12934,
    # /readyz stayed false (publish_failing) for good: the last reply gave up during an outage with no
    # success after its first failure, and an idle worker had nothing left to publish
    "D8c": 16282,
    # a poison request answered as poison_suspected, then the commit past it failed (a rebalance): the next
    # owner ran it again, three more deaths (its markers now carry the verdict)
    "D11": 117,
    # the poison request's named crash count was not in the markers of the innocent records read alone
    # before it, nor through a hand-over (a hung run, a revoke): five deaths instead of three
    "D11b": 106,
    # a round fetched while a give-up rewound its partition (in the epoch before) ended the one-at-a-time
    # reading; the poison request then ran in a whole round, its count lost: five deaths
    "D11c": 10227,
    # a crash with another cause while an innocent record ran alone named that record instead of the
    # poison request (one named record per partition): the poison's count went, four deaths
    "D11d": 39,
}

#: The same, found with the worker's exactly-once delivery (``--delivery exactly-once``): defect -> seed.
FIXED_EXACTLY_ONCE_DEFECTS = {
    # answers committed by a transaction its replaced producer began before the partition was read from its
    # committed offset, which then sent them to be read again: two answers in committed transactions (D12)
    "E1": 3,
    # a late commit's outcome (CommitUnanswered) came in its own task: nothing re-evaluated backpressure after
    # it, and the partitions stayed paused with nothing in flight
    "E2": 31,
    # a transaction begun by the task that brought a producer back failed to abort: no replacement was started
    # (that task was still the partition's), and the partition had no producer for good
    "E3": 2814,
    # held answers let go when a new producer read the partition from its committed offset: backpressure was
    # not re-evaluated, every partition stayed paused
    "E4": 410,
    # the revoke cancelled a task opening a producer as its wait ended (Python 3.11's wait_for kept the result):
    # the task ran on and the revoke waited for it for good
    "E5": 1476,
    # the revoke waited for the revoked partitions' producers to close in an outage: over its bound (D10)
    "E6": 814,
    # a fenced transaction of a revoked partition took the producer of its new assignment out of service
    "E7": 332,
    # an outage during the start-up probe (InitProducerId) was taken for a broker refusing transactions: the
    # worker never started
    "E8": 4584,
    # a transaction the broker aborted, open past transaction_timeout_ms, fenced its producer while the group
    # still gave the partition here: taken for a new owner's fence, it was not replaced (paused for good)
    "E9": 566,
}


def test_a_seed_replays_exactly() -> None:
    """The same seed gives the same trace, line for line, and the same violations."""
    first, again = run_seed(155, keep_trace=True), run_seed(155, keep_trace=True)
    assert first.trace == again.trace
    assert first.digest == again.digest
    assert [str(v) for v in first.violations] == [str(v) for v in again.violations]
    assert len(first.trace) > 100  # the run did something: records fetched, answered, committed


# 557: rich (a stalled model, rebalances, undecodable records); 65: its worker seeks a set of partitions
# to their committed offsets, whose order follows the interpreter's hash seed; exactly-once 12 and 2814: the
# worker opened, flushed and closed partitions' producers in a set's order (replayed differently before).
REPLAYED = [(557, "at-least-once"), (65, "at-least-once"), (12, "exactly-once"), (2814, "exactly-once")]


@pytest.mark.parametrize(("seed", "delivery"), REPLAYED)
def test_a_seed_replays_in_another_process(seed: int, delivery: str) -> None:
    """The printed replay command gives the same trace in a fresh interpreter, whatever its hash seed."""
    replay = subprocess.run(
        [sys.executable, "-m", "tests.sim", "--seed", str(seed), "--delivery", delivery],
        cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": "12345", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    digest = re.search(r"trace digest ([0-9a-f]+)", replay.stdout)
    assert digest is not None, replay.stdout[-2000:] + replay.stderr[-2000:]
    assert digest.group(1) == run_seed(seed, delivery=delivery).digest


def test_seeds_differ() -> None:
    """Different seeds draw different worlds (the scheduler is not stuck on one plan)."""
    assert len({run_seed(seed).digest for seed in range(5)}) == 5


def test_without_faults_no_invariant_is_violated() -> None:
    """The control: the same seeds' records with no fault at all break nothing (the checks do not cry
    wolf), and each answer comes once."""
    for seed in range(40):
        result = run_seed(seed, faults=False)
        assert not result.violations, f"seed {seed}: {[str(v) for v in result.violations]}"
        assert not result.duplicates, f"seed {seed}: {result.duplicates}"


@pytest.mark.parametrize("defect", sorted(OPEN_DEFECTS))
def test_open_defect_is_still_found(defect: str) -> None:
    """Each open defect shows in its seed; once fixed this fails: drop its entry."""
    seed = OPEN_DEFECTS[defect]
    result = run_seed(seed)
    assert defect in result.defects, (
        f"{defect} ({DEFECTS[defect]}) no longer shows in seed {seed}: if it was fixed, delete it from "
        f"OPEN_DEFECTS; replay: {REPLAY.format(seed=seed)}"
    )


@pytest.mark.parametrize(
    ("delivery", "defect"),
    [("at-least-once", d) for d in sorted(FIXED_DEFECTS)]
    + [("exactly-once", d) for d in sorted(FIXED_EXACTLY_ONCE_DEFECTS)],
)
def test_a_seed_that_found_a_fixed_defect_now_holds(delivery: str, defect: str) -> None:
    """The seed that showed a defect before its fix violates no invariant now (in the delivery mode it
    was found in)."""
    seed = (FIXED_DEFECTS if delivery == "at-least-once" else FIXED_EXACTLY_ONCE_DEFECTS)[defect]
    result = run_seed(seed, delivery=delivery)
    assert not result.violations, (
        f"seed {seed} (it found {defect}): {[str(v) for v in result.violations]}; "
        f"replay: {replay(seed, delivery)}"
    )


def test_the_pinned_seeds_keep_the_worlds_they_were_pinned_for() -> None:
    """Faults added to the simulation since (a SIGTERM mid-stream, a second worker) are drawn from streams of their
    own, salted so that no seed named in this file draws one: each still runs the world it showed its defect or
    property in."""
    # 155: test_a_seed_replays_exactly's (3 and 566, of the tests below, are in the defect tables)
    pinned = {*FIXED_DEFECTS.values(), *FIXED_EXACTLY_ONCE_DEFECTS.values(), *(s for s, _ in REPLAYED), 155}
    drawn = {seed for seed in pinned if Scheduler(seed, "t").plan.terminations}
    assert not drawn, f"seeds {sorted(drawn)} now draw a SIGTERM: pick another TERMINATION_SALT"
    assert Scheduler(9, "t").plan.terminations, "seed 9 is the SIGTERM example below"
    joined = {seed for seed in pinned | {9} if Scheduler(seed, "t").plan.peer is not None}
    assert not joined, f"seeds {sorted(joined)} now draw a second worker: pick another PEER_SALT"
    assert Scheduler(SECOND_WORKER_SEED, "t").plan.peer is not None, "the second-worker example below"


def test_a_worker_sent_sigterm_mid_stream_drains_and_its_successor_repeats_nothing() -> None:
    """Seed 9: SIGTERM 20 s in, with records still arriving; the worker drains and exits, a successor starts
    3 s later and answers the rest: nothing lost, no invariant broken, and no answer twice (the drain
    committed all it answered)."""
    result = run_seed(9, keep_trace=True)
    trace = result.trace
    sigterm = next(i for i, line in enumerate(trace) if line.endswith(" SIGTERM"))
    exited = next(i for i, line in enumerate(trace) if "exited after its drain" in line)
    assert sigterm < exited
    assert any(" fetched " in line for line in trace[:sigterm]), "nothing was read before the SIGTERM"
    assert any(" assigned " in line for line in trace[exited:]), "no successor joined"
    assert any(" fetched " in line for line in trace[exited:]), "the successor read nothing"
    assert not result.violations, [str(v) for v in result.violations]
    assert not result.duplicates, result.duplicates


#: 4 partitions; a second worker joins 1 s in (the first keeps partition 0), answers 1-3 and leaves by SIGTERM 32 s
#: later; an outage after it left
SECOND_WORKER_SEED = 315


@pytest.mark.parametrize("delivery", DELIVERIES)
def test_a_second_worker_answers_its_share_and_hands_it_back(delivery: str) -> None:
    """Seed 315: while the second worker is in the group, each answers only the partitions the group gave it
    (no partition is assigned before every member's revoke returned); after its SIGTERM the first gets every
    partition back and answers the rest. Nothing is lost, no invariant breaks; exactly-once answers each request
    once, the second's producers fencing the first's on the partitions that moved."""
    result = run_seed(SECOND_WORKER_SEED, keep_trace=True, delivery=delivery)
    trace = result.trace
    joined = next(i for i, line in enumerate(trace) if "a second worker joins" in line)
    left = next(i for i, line in enumerate(trace) if "the second worker leaves" in line)
    window = [line for line in trace[joined:left] if " fetched " in line]
    second = {line.split(" fetched ")[1].split()[0] for line in window if "[second]" in line}
    first = {line.split(" fetched ")[1].split()[0] for line in window if "[second]" not in line}
    assert second and first, f"both should answer while both are in the group: first {first}, second {second}"
    assert "0" not in second and first == {"0"}, f"the split was not kept: first {first}, second {second}"
    back = [line for line in trace[left:] if " fetched " in line and "[second]" not in line]
    assert back, "the first answered nothing after the second left"
    assert not result.violations, [str(v) for v in result.violations]
    if delivery == "exactly-once":
        assert not result.duplicates, result.duplicates


def test_exactly_once_seeds_run_transactions() -> None:
    """An exactly-once seed answers through the fake transaction coordinator (a publish outside a transaction
    is a violation there), and the same seed without faults violates nothing and answers each request once."""
    result = run_seed(3, keep_trace=True, delivery="exactly-once")
    commits = [line for line in result.trace if " commits " in line]
    assert len(commits) >= 5, "the seed's answers were not committed in transactions"
    control = run_seed(3, faults=False, delivery="exactly-once")
    assert not control.violations and not control.duplicates


def test_exactly_once_seeds_time_transactions_out_and_give_partitions_to_other_members() -> None:
    """The fake coordinator's transaction timeout and the other members' fencing are exercised: seed 566 (E9)
    has a transaction timed out, a producer opened again after it, and partitions another member opened."""
    trace = run_seed(566, keep_trace=True, delivery="exactly-once").trace
    timed_out = next((i for i, line in enumerate(trace) if " timed out " in line), None)
    assert timed_out is not None, "no transaction timed out"
    assert any(" init epoch " in line for line in trace[timed_out:]), "no producer opened after the timeout"
    assert any("another member opens" in line for line in trace), "no partition was fenced by another member"


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize(("delivery", "variable", "default"), [
    ("at-least-once", "SIM_SEEDS", "1000"), ("exactly-once", "SIM_EOS_SEEDS", "500"),
])  # fmt: skip
def test_invariants_hold_over_many_seeds(delivery: str, variable: str, default: str) -> None:
    """I1-I5 over SIM_SEEDS (SIM_EOS_SEEDS) seeds; a violation outside OPEN_DEFECTS fails with its replay command."""
    seeds = range(int(os.environ.get(variable, default)))
    results, wall_s = timed(seeds, workers=int(os.environ.get("SIM_WORKERS", "2")), delivery=delivery)
    print(summary(results, wall_s))
    unexpected = [
        f"seed {r.seed}: {v}\n    replay: {replay(r.seed, delivery)}"
        for r in results
        for v in r.violations
        if v.defect not in OPEN_DEFECTS
    ]
    assert not unexpected, "\n".join(unexpected[:20])
