"""Real worker processes for tests: start them, read their logs, signal them, reap them.

Each worker is ``python -m worker run ...`` in a session of its own, so a test can kill
it together with every process it spawned (``--processes N`` children, multiprocessing's
resource tracker) and can ask whether any of them is still alive. Its stdout and stderr go
to one log file, which is how the tests see readiness, partition assignments and batches.

Requests go out through a raw aiokafka producer and replies come back through a
group-less consumer: the tests see the wire, not the project's client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tests.references import ROOT
from worker.topics import create_topics, requests_topic

_POLL_S = 0.05
_LOG_TAIL_CHARS = 4_000

#: The worker's log format (worker/cli.py configure_logging):
#: "<date> <time>,<ms> LEVEL processName logger: message".
_LOG_LINE = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) (?P<process>\S+) (?P<logger>\S+): (?P<message>.*)$")
_ASSIGNED = re.compile(r"assigned to partitions: \((?P<partitions>.*)\)$")
_PARTITION = re.compile(r"partition=(\d+)")
_BATCH = re.compile(r": batch of (\d+) in ")

#: Tests pace the broker's group joins with these (docs/kafka-notes.md: a join takes
#: about session_timeout_ms / 2 on tansu).
FAST_GROUP_FLAGS = ("--session-timeout-ms", "3000", "--heartbeat-interval-ms", "500")


class WorkerDied(AssertionError):
    """A worker process exited while a test was still waiting on it."""


async def wait_until(
    condition: Callable[[], bool],
    within: float,
    what: str,
    watch: Iterable[WorkerProcess] = (),
) -> None:
    """Poll ``condition`` until it holds; fail after ``within`` s or as soon as a watched worker exits."""
    watched = list(watch)
    deadline = time.monotonic() + within
    while not condition():
        for worker in watched:
            if worker.returncode is not None:
                raise WorkerDied(
                    f"{worker.name} exited with {worker.returncode} while waiting for {what}\n"
                    f"{worker.log_tail()}"
                )
        if time.monotonic() > deadline:
            tails = "\n".join(worker.log_tail() for worker in watched)
            raise TimeoutError(f"no {what} after {within:.0f} s\n{tails}")
        await asyncio.sleep(_POLL_S)


@dataclass(frozen=True)
class LogLine:
    """One parsed line of a worker's log."""

    level: str
    process: str
    logger: str
    message: str


@dataclass
class WorkerProcess:
    """One ``python -m worker run`` process (a session leader) and its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, chars: int = _LOG_TAIL_CHARS) -> str:
        return f"--- {self.name} (pid {self.pid}) log tail ---\n{self.log()[-chars:]}"

    def lines(self, process: str | None = None) -> list[LogLine]:
        """Parsed log lines, optionally only those of one process name (``MainProcess``, ``worker-0``)."""
        parsed = []
        for raw in self.log().splitlines():
            match = _LOG_LINE.match(raw)
            if match and (process is None or match["process"] == process):
                parsed.append(LogLine(match["level"], match["process"], match["logger"], match["message"]))
        return parsed

    def count(self, text: str, process: str | None = None) -> int:
        """Log lines (of ``process``) whose message contains ``text``."""
        return sum(text in line.message for line in self.lines(process))

    def assignments(self, process: str | None = None) -> list[set[int]]:
        """Every partition set this worker was assigned, in order (rebalances log one each)."""
        found = []
        for line in self.lines(process):
            match = _ASSIGNED.search(line.message)
            if match:
                found.append({int(p) for p in _PARTITION.findall(match["partitions"])})
        return found

    def current_assignment(self, process: str | None = None) -> set[int]:
        """The latest assigned partition set (empty before the first)."""
        assignments = self.assignments(process)
        return assignments[-1] if assignments else set()

    def answered(self, process: str | None = None) -> int:
        """Requests this worker ran through its model, from the debug "batch of N" lines."""
        return sum(int(n) for line in self.lines(process) for n in _BATCH.findall(line.message))

    async def wait_for_log(
        self, text: str, within: float = 60.0, count: int = 1, process: str | None = None
    ) -> None:
        """Until ``count`` log lines (of ``process``) contain ``text``."""
        await wait_until(
            lambda: self.count(text, process) >= count, within, f"{text!r} in {self.name}'s log", [self]
        )

    def send(self, sig: signal.Signals) -> None:
        self.popen.send_signal(sig)

    async def wait_exit(self, within: float) -> int:
        """The exit status, waiting at most ``within`` s (TimeoutError if it is still running)."""
        deadline = time.monotonic() + within
        while (code := self.popen.poll()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} still running {within:.0f} s later\n{self.log_tail()}")
            await asyncio.sleep(_POLL_S)
        return code

    def session_pids(self) -> list[int]:
        """Live processes of this worker's session: itself and everything it started."""
        return session_members(self.pid)

    def worker_children(self) -> list[int]:
        """Pids of the ``--processes`` children (multiprocessing spawn), not its resource tracker."""
        return [pid for pid in self.session_pids() if "--multiprocessing-fork" in _cmdline(pid)]

    def kill_all(self) -> None:
        """SIGKILL the whole session (the worker and its children) and reap the worker."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the group is gone already
        except PermissionError:
            pass  # a pid reused by someone else's process group: not ours to kill
        self.popen.wait(timeout=10)


def session_members(session_id: int) -> list[int]:
    """Pids of live (not zombie) processes whose session id is ``session_id`` (from /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        # Fields after the command name, which may itself hold spaces and parentheses.
        state, _ppid, _pgrp, session, *_ = stat.rsplit(")", 1)[1].split()
        if int(session) == session_id and state != "Z":
            members.append(int(entry.name))
    return members


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


class WorkerLauncher:
    """Starts worker processes against one broker and kills every one of them at the end."""

    def __init__(self, bootstrap: str, models_dir: Path, log_dir: Path) -> None:
        self.bootstrap = bootstrap
        self.models_dir = models_dir
        self.log_dir = log_dir
        self.started: list[WorkerProcess] = []

    def start(
        self,
        name: str,
        group_id: str,
        topic_prefix: str,
        *flags: str,
        verbose: bool = False,
    ) -> WorkerProcess:
        """``python -m worker [-v] run MODELS_DIR --bootstrap-servers ... --group-id ... <flags>``."""
        log_path = self.log_dir / f"{name}.log"
        command = [sys.executable, "-m", "worker", *(["-v"] if verbose else []), "run", str(self.models_dir)]
        command += ["--bootstrap-servers", self.bootstrap, "--group-id", group_id]
        command += ["--topic-prefix", topic_prefix, *flags]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "KAFKA_BOOTSTRAP"))}
        env["HF_HUB_OFFLINE"] = "1"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        worker = WorkerProcess(name, popen, log_path)
        self.started.append(worker)
        return worker

    def kill_all(self) -> None:
        """Teardown: SIGKILL every worker session this launcher started."""
        for worker in self.started:
            worker.kill_all()

    def log_tails(self) -> str:
        return "\n".join(worker.log_tail() for worker in self.started)


@dataclass(frozen=True)
class Reply:
    """One reply record as it arrived on the reply topic."""

    id: str
    key: str | None
    correlation_id: str | None
    body: dict[str, Any]


@dataclass
class Stream:
    """A test's own topics: text requests (N partitions) and one single-partition reply topic.

    Requests go out with a raw producer, round-robin over the partitions; a group-less
    consumer collects every reply by request id. A sentinel record on the reply topic
    (``settle()``) marks the point up to which every earlier reply has been collected.
    """

    bootstrap: str
    prefix: str = field(default_factory=lambda: f"p{uuid.uuid4().hex[:12]}")
    partitions: int = 4
    sent: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (partition, offset)
    replies: dict[str, list[Reply]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.group_id = f"{self.prefix}-group"
        self.requests_topic = requests_topic("text", self.prefix)
        self.reply_topic = f"{self.prefix}.replies"
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._sentinels: set[str] = set()
        self._next = 0

    async def start(self) -> None:
        await create_topics(self.bootstrap, [self.requests_topic], self.partitions)
        await create_topics(self.bootstrap, [self.reply_topic], 1)
        # Idempotence off: the embedded broker refuses InitProducerId (docs/kafka-notes.md).
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=False, linger_ms=5
        )
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            self.reply_topic,
            bootstrap_servers=self.bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await self._consumer.start()
        self._reader = asyncio.create_task(self._read(self._consumer), name="reply-collector")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        async for record in consumer:
            headers = {k: bytes(v).decode() for k, v in record.headers or () if v is not None}
            if "sentinel" in headers:
                self._sentinels.add(headers["sentinel"])
                continue
            body = json.loads(record.value)
            key = record.key.decode() if record.key is not None else None
            reply = Reply(body["id"], key, headers.get("correlation_id"), body)
            self.replies.setdefault(reply.id, []).append(reply)

    def body(self, request_id: str) -> bytes:
        return json.dumps(
            {
                "id": request_id,
                "model": "bert",
                "inputs": {"text": f"request {request_id}: the weather is fine"},
            }
        ).encode()

    async def send(self, count: int, partition: int | None = None, reply_to: str | None = None) -> list[str]:
        """Produce ``count`` requests (round-robin over partitions, or all to ``partition``); acked on return."""
        assert self._producer is not None, "Stream.start() first"
        ids, deliveries = [], []
        for _ in range(count):
            request_id = f"{self.prefix}-{self._next:06d}"
            target = self._next % self.partitions if partition is None else partition
            self._next += 1
            deliveries.append(
                await self._producer.send(
                    self.requests_topic,
                    self.body(request_id),
                    key=request_id.encode(),
                    partition=target,
                    headers=[
                        ("correlation_id", request_id.encode()),
                        ("reply_to", (reply_to or self.reply_topic).encode()),
                        ("content-type", b"application/json"),
                    ],
                )
            )
            ids.append(request_id)
        for request_id, metadata in zip(ids, await asyncio.gather(*deliveries), strict=True):
            self.sent[request_id] = (metadata.partition, metadata.offset)
        return ids

    @contextlib.asynccontextmanager
    async def steadily(self, per_tick: int, tick_s: float = 0.05) -> AsyncIterator[list[str]]:
        """Send ``per_tick`` requests every ``tick_s`` while the block runs; yields the growing list of ids."""
        sent: list[str] = []
        producing = asyncio.Event()
        producing.set()

        async def produce() -> None:
            while producing.is_set():
                sent.extend(await self.send(per_tick))
                await asyncio.sleep(tick_s)

        producer = asyncio.create_task(produce())
        try:
            yield sent
        finally:
            producing.clear()
            await producer

    def answered(self, ids: Iterable[str] | None = None) -> int:
        """How many of ``ids`` (all sent when None) have at least one reply."""
        return sum(1 for request_id in (self.sent if ids is None else ids) if request_id in self.replies)

    def missing(self, ids: Iterable[str] | None = None) -> list[str]:
        return [i for i in (self.sent if ids is None else ids) if i not in self.replies]

    async def wait_answered(
        self, ids: Sequence[str] | None, within: float, watch: Iterable[WorkerProcess] = ()
    ) -> None:
        """Until every one of ``ids`` (all sent when None) has a reply."""
        wanted = list(self.sent if ids is None else ids)
        await wait_until(
            lambda: self.answered(wanted) == len(wanted),
            within,
            f"replies to all {len(wanted)} requests (missing {len(self.missing(wanted))})",
            watch,
        )

    async def settle(self, within: float = 30.0) -> None:
        """Until every reply written before now has been collected (a sentinel went round)."""
        assert self._producer is not None
        token = uuid.uuid4().hex
        await self._producer.send_and_wait(self.reply_topic, b"{}", headers=[("sentinel", token.encode())])
        await wait_until(lambda: token in self._sentinels, within, "the reply-topic sentinel")

    def duplicates(self) -> int:
        """Replies beyond the first, over all requests."""
        return sum(len(replies) - 1 for replies in self.replies.values())

    def committed_end(self) -> dict[int, int]:
        """Per partition, the offset after the last request sent to it (what a full commit reaches)."""
        ends: dict[int, int] = {}
        for partition, offset in self.sent.values():
            ends[partition] = max(ends.get(partition, 0), offset + 1)
        return ends

    async def committed(self) -> dict[int, int | None]:
        """The group's committed offset of each request partition (no join: committed() only)."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=self.group_id, enable_auto_commit=False
        )
        await consumer.start()
        try:
            return {
                p: await consumer.committed(TopicPartition(self.requests_topic, p))
                for p in range(self.partitions)
            }
        finally:
            await consumer.stop()


def replies_agree(replies: Sequence[Reply], rel: float = 1e-5) -> bool:
    """Duplicates of one request: same id everywhere (body, key, correlation id), equal outputs."""
    first = replies[0]
    for reply in replies:
        if {reply.id, reply.key, reply.correlation_id} != {first.id}:
            return False
        for name in ("model", "task", "truncated"):
            if reply.body.get(name) != first.body.get(name):
                return False
        if not _close(reply.body.get("outputs"), first.body.get("outputs"), rel):
            return False
    return True


def _close(a: Any, b: Any, rel: float) -> bool:
    """Structural equality with relative tolerance on floats (invariant 3: batching may jitter scores)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12) or abs(a - b) <= 1e-7
    return bool(a == b)
