"""A request that kills its worker, for real: worker processes under a supervisor, the embedded broker.

The killer is a request whose body carries the test-only failpoint's mark
(worker/quarantine.py ``CRASH_FAILPOINT_ENV``): a worker that prepares it SIGKILLs itself, as
the OOM killer would. ``run --processes 2`` restarts each dead child, as an orchestrator would.
Issue 23, measured defect 3: before the quarantine, such a request came back to every worker of
the group for ever and nothing behind it was answered.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.kafka_support import TopicReader, headers_of
from tests.process_support import FAST_GROUP_FLAGS, Stream, WorkerLauncher, wait_until
from tests.references import TINY
from worker.quarantine import CRASH_FAILPOINT_ENV
from worker.topics import dlq_topic

#: Two workers loading bert at once on a 2-core machine, and joining the group.
START_TIMEOUT_S = 90.0
#: Issue 23's bound: the requests behind the killer answered within this.
ANSWERED_WITHIN_S = 150.0


@pytest.fixture
def bert_only(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    models.mkdir()
    (models / "bert").symlink_to(TINY / "bert", target_is_directory=True)
    return models


@pytest.fixture
def workers(kafka_bootstrap: str, bert_only: Path, tmp_path: Path) -> Iterator[WorkerLauncher]:
    launcher = WorkerLauncher(kafka_bootstrap, bert_only, tmp_path)
    yield launcher
    launcher.kill_all()
    print(launcher.log_tails())


@pytest.fixture
async def stream(kafka_bootstrap: str) -> AsyncIterator[Stream]:
    """A one-partition request topic: every request queues behind the killer."""
    s = Stream(kafka_bootstrap, partitions=1)
    await s.start()
    yield s
    await s.stop()


@pytest.mark.kafka
@pytest.mark.slow
async def test_a_request_that_kills_its_worker_costs_three_deaths_then_a_dlq_record(
    workers: WorkerLauncher, stream: Stream, monkeypatch: pytest.MonkeyPatch
) -> None:
    mark = f"kill-me-{uuid.uuid4().hex}"
    monkeypatch.setenv(CRASH_FAILPOINT_ENV, mark)  # the children inherit it; off everywhere else
    parent = workers.start("group", stream.group_id, stream.prefix, *FAST_GROUP_FLAGS, "--processes", "2")
    await parent.wait_for_log("worker started", START_TIMEOUT_S, process="worker-0")
    await parent.wait_for_log("worker started", START_TIMEOUT_S, process="worker-1")
    async with TopicReader(stream.bootstrap, dlq_topic(stream.prefix)) as dlq:
        killer = await stream.send(1, text=mark)
        ordinary = await stream.send(20)
        started = time.monotonic()

        await stream.wait_answered(ordinary, ANSWERED_WITHIN_S, [parent])
        took = time.monotonic() - started
        deaths = parent.count("exited with -9; restarting it", process="MainProcess")
        print(f"20 requests behind the killer answered in {took:.1f} s; {deaths} worker deaths")

        # Default max_crash_attempts=3: one death with the round running, two with the killer alone.
        assert 1 <= deaths <= 3, parent.log_tail()
        records = await dlq.wait_until(
            lambda rs: any(headers_of(r).get("error_code") == b"poison_suspected" for r in rs), 30
        )
    (poison,) = [r for r in records if headers_of(r).get("error_code") == b"poison_suspected"]
    headers = headers_of(poison)
    partition, offset = stream.sent[killer[0]]
    assert (headers["source_topic"], headers["source_partition"], headers["source_offset"]) == (
        stream.requests_topic.encode(),
        str(partition).encode(),
        str(offset).encode(),
    )
    assert poison.value == stream.body(killer[0], mark), "dlq_payload=body: the request as sent"
    # The client is told too: an error reply under its request id, not silence.
    await stream.wait_answered(killer, 30, [parent])
    (reply,) = stream.replies[killer[0]]
    assert reply.body["error"]["code"] == "poison_suspected"
    # Everything behind it was answered and committed past.
    await wait_until(
        lambda: parent.count("exited with", process="MainProcess") == deaths, 1, "no further death"
    )
    assert await stream.committed() == stream.committed_end()
