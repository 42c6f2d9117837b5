"""Real worker processes: start them, read their logs, signal them, reap them (soak, chaos, tests).

Each worker is ``python -m worker run ...`` in a session of its own, so a caller can kill
it together with every process it spawned (``--processes N`` children, multiprocessing's
resource tracker) and can ask whether any of them is still alive. Its stdout and stderr go
to one log file, which is how callers see readiness, partition assignments and batches.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from bench.plan import ROOT

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
        """The log's last ``chars`` without its DEBUG lines (a verbose worker's per-batch lines hide the
        assignments, warnings and errors a failure is read from), then its last raw lines."""
        raw = self.log()
        notable = "\n".join(line for line in raw.splitlines() if " DEBUG " not in line)
        return (
            f"--- {self.name} (pid {self.pid}) log tail, DEBUG lines left out ---\n{notable[-chars:]}\n"
            f"--- {self.name} last lines ---\n{raw[-chars // 4 :]}"
        )

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


async def read_from_start(
    bootstrap: str, topic: str, isolation_level: str = "read_uncommitted"
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topic``: each partition from its start to the first fetch that finds nothing (tansu's
    end_offsets() can be short, docs/kafka-notes.md); none when the topic does not exist. Bounded: 60 s."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, isolation_level=isolation_level
    )
    await consumer.start()
    try:
        if topic not in await consumer.topics():
            return []
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[ConsumerRecord[bytes, bytes]] = []
        async with asyncio.timeout(60):
            while taken := await consumer.getmany(*tps, timeout_ms=2000):
                for part in taken.values():
                    records += part
        return records
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
