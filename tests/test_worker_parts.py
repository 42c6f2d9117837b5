"""The worker's parts alone, without a broker: the reply_to policy, byte accounting and rewinds."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka import ConsumerRecord

from schemas import Modality
from tests.references import TINY
from worker.intake import Intake
from worker.kafka.offsets import OffsetTracker
from worker.kafka.routing import Refusal, ReplyPolicy, TopicDirectory, legal_topic
from worker.metrics import WorkerMetrics
from worker.settings import Settings

POLICY = ReplyPolicy("inference", re.compile(r"team-a\.replies\..+"))


@pytest.mark.parametrize(
    ("reply_to", "expected"),
    [
        ("inference.text.results", None),  # the modality's own results topic is always fine
        ("team-a.replies.svc1", None),
        ("team-b.replies.svc1", Refusal.NOT_ALLOWED),
        ("inference.vision.results", Refusal.RESERVED),
        ("inference.audio.requests", Refusal.RESERVED),
        ("inference.text.requests", Refusal.RESERVED),
        ("inference.dlq", Refusal.RESERVED),
        ("__consumer_offsets", Refusal.RESERVED),
        ("__team-a.replies.x", Refusal.RESERVED),
        ("bad name", Refusal.ILLEGAL),
        ("..", Refusal.ILLEGAL),
        ("x" * 250, Refusal.ILLEGAL),
    ],
)
def test_reply_policy_refuses_reserved_and_unmatched_topics(reply_to: str, expected: Refusal | None) -> None:
    assert POLICY.refusal(reply_to, Modality.TEXT) == expected


def test_reserved_topics_stay_refused_when_the_pattern_allows_everything() -> None:
    anything = ReplyPolicy("inference", re.compile(".*"))
    for modality in Modality:
        assert anything.refusal(f"inference.{modality.value}.requests", Modality.TEXT) is Refusal.RESERVED
    assert anything.refusal("inference.dlq", Modality.VIDEO) is Refusal.RESERVED
    assert anything.refusal("payments.events", Modality.TEXT) is None  # existence is checked on publish


def test_legal_topic_follows_kafkas_rule() -> None:
    assert legal_topic("a.b-c_D9") and legal_topic("x" * 249)
    assert (
        not legal_topic("") and not legal_topic(".") and not legal_topic("x" * 250) and not legal_topic("é")
    )


def test_bytes_in_flight_count_raw_and_prepared_until_answered() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.track("p", 0, 100)
    tracker.track("p", 1, 50)
    tracker.add_bytes("p", 0, 1000)
    assert tracker.bytes_in_flight == 1150
    tracker.done("p", 1)
    assert tracker.bytes_in_flight == 1100 and tracker.take_commits() == {}
    tracker.done("p", 0)
    assert tracker.bytes_in_flight == 0 and tracker.take_commits() == {"p": 2}
    tracker.add_bytes("p", 0, 10)  # answered: nothing to count
    assert tracker.bytes_in_flight == 0


def test_a_rewound_offset_is_never_committed_until_answered_again() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    for offset in range(4):
        tracker.track("p", offset, 10)
    tracker.done("p", 0)
    tracker.done("p", 2)
    assert tracker.rewind("p", 1, 0)  # 1's reply could not be published: 1, 2, 3 are read again
    assert tracker.in_flight == 2 and tracker.bytes_in_flight == 20, "1 and 3 are held until settled"
    assert tracker.take_commits() == {"p": 1}
    tracker.done("p", 3, 0)  # a late answer of the dropped run is counted off, never committed
    tracker.release("p", 1, 0)  # the given-up reply lets go
    assert tracker.in_flight == 0 and tracker.bytes_in_flight == 0
    assert tracker.take_commits() == {}
    epoch = tracker.epoch("p")
    for offset in (1, 2, 3):
        tracker.track("p", offset, 10, epoch)
    for offset in (1, 2, 3):
        tracker.done("p", offset, epoch)
    assert tracker.take_commits() == {"p": 4}


def test_a_record_aiokafka_skips_as_too_large_becomes_a_dlq_record_not_a_silent_loss() -> None:
    from aiokafka import TopicPartition
    from aiokafka.errors import RecordTooLargeError

    from worker.kafka.decode_failures import _skipped_as_too_large

    tp = TopicPartition("inference.text.requests", 3)
    # Built as aiokafka 0.14's Fetcher builds it when a record exceeds max_partition_fetch_bytes.
    error = RecordTooLargeError("There are some messages at [Partition=Offset]: %s=%s ...", tp, 41, 1024)
    [skipped] = _skipped_as_too_large(error)
    assert (skipped.tp, skipped.offset) == (tp, 41)
    assert _skipped_as_too_large(RecordTooLargeError("no coordinates")) == []


def test_by_default_reply_to_may_name_only_the_prefixs_replies_topics() -> None:
    # A default of '.*' would let any client make the worker write into any topic it can reach.
    settings = Settings(topic_prefix="inference")
    policy = ReplyPolicy(settings.topic_prefix, re.compile(settings.reply_to_pattern))
    assert policy.refusal("inference.replies.3f2a", Modality.TEXT) is None
    assert policy.refusal("inference.text.results", Modality.TEXT) is None
    for elsewhere in ("payments.events", "_schemas", "connect-offsets", "app-changelog", "inference.replies"):
        assert policy.refusal(elsewhere, Modality.TEXT) is Refusal.NOT_ALLOWED, elsewhere
    assert policy.refusal("inferenceXreplies.a", Modality.TEXT) is Refusal.NOT_ALLOWED, (
        "the prefix is literal"
    )
    opened = Settings(topic_prefix="inference", reply_to_pattern=r"team-a\.replies\..+")
    assert opened.reply_to_pattern == r"team-a\.replies\..+", "an operator's pattern replaces the default"


def _record(key: bytes | None, headers: list[tuple[str, bytes]]) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord("inference.text.requests", 0, 7, 1, 0, key, b"{}", None, 0, 2, headers)


def test_the_record_key_is_held_to_max_header_bytes_like_the_correlation_id_header() -> None:
    settings = Settings(topic_prefix="inference", max_header_bytes=64)
    intake = Intake(
        settings, {}, {"inference.text.requests": Modality.TEXT}, ReplyPolicy("inference", re.compile("")),
        WorkerMetrics(),
    )  # fmt: skip
    long_key = intake.origin(_record(b"k" * 65, []))
    assert long_key.rejected is not None and "record key" in long_key.rejected
    assert long_key.correlation_id == "inference.text.requests:0:7", "the long key is not echoed"
    fits = intake.origin(_record(b"k" * 64, []))
    assert fits.rejected is None and fits.correlation_id == "k" * 64
    # A correlation_id header that fits stands in for the key, which is then never echoed.
    header = intake.origin(_record(b"k" * 65, [("correlation_id", b"c-1")]))
    assert header.rejected is None and header.correlation_id == "c-1"
    long_header = intake.origin(_record(b"key", [("correlation_id", b"c" * 65)]))
    assert long_header.rejected is not None and "correlation_id header" in long_header.rejected
    assert long_header.correlation_id == "key"


def test_the_worker_process_fixes_glibc_mmap_threshold() -> None:
    # Without it a flood of large audio grew a worker 406 MiB over idle instead of 168 (worker/serving/allocator.py).
    from worker.serving.allocator import fix_mmap_threshold

    assert fix_mmap_threshold(), "this Linux/glibc machine has mallopt: the threshold must be set"


def test_the_worker_process_freezes_what_it_loaded_and_still_collects_later_cycles(tmp_path: Path) -> None:
    """A worker process freezes all it loaded (worker/cli.py ``prepare_process``, worker/serving/collector.py):
    a full collection then walks only what was made since, not the ~10^5 objects of transformers and
    the model. In a process of its own: a freeze lasts for the process."""
    code = """
import gc, json
from worker.cli import prepare_process
from worker.settings import Settings
gc.collect()
imported = len(gc.get_objects())
prepare_process({models!r}, Settings())
after = len(gc.get_objects())
cycle = []
cycle.append(cycle)
del cycle
print(json.dumps({{"imported": imported, "frozen": gc.get_freeze_count(), "after": after, "collected": gc.collect()}}))
"""
    (tmp_path / "bert").symlink_to(TINY / "bert", target_is_directory=True)
    run = subprocess.run(
        [sys.executable, "-c", code.format(models=str(tmp_path))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    counts = json.loads(run.stdout.strip().splitlines()[-1])
    # all it had before loading, and transformers, tokenizers and ONNX Runtime on top; nothing left over
    assert counts["frozen"] > counts["imported"] and counts["after"] < 1_000, counts
    assert counts["collected"] >= 1, counts  # a cycle made after the freeze is still collected


async def test_a_topic_created_just_after_the_directorys_last_listing_is_found() -> None:
    """The directory lists the cluster at most once per min_refresh_s. A topic created just after a listing, and
    asked about within that time (an InferenceClient creates its reply topic and sends at once), was taken as
    missing: the reply went to the results topic and the client waited for it in vain. A miss is now answered
    from a listing that began after the question, waited for where the rate asks it."""
    cluster = {"a"}
    listings: list[set[str]] = []

    async def list_topics() -> set[str]:
        listings.append(set(cluster))
        return set(cluster)

    directory = TopicDirectory(list_topics, min_refresh_s=0.2)
    assert await directory.exists("a")
    cluster.add("b")  # created after that listing, asked about at once
    assert await directory.exists("b")
    assert len(listings) == 2
    assert await directory.exists("a") and len(listings) == 2  # known: no listing
    # Missing for good: one listing later than the question, then no; asked together, they share it.
    assert await asyncio.gather(directory.exists("c"), directory.exists("d")) == [False, False]
    assert len(listings) == 3
