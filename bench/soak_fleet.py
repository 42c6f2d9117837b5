"""The soak's worker processes: start, kill, let leave, stop; their RSS and CPU from /proc; /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.procstats import ProcessGone, cpu_seconds, rss_mib
from bench.worker_processes import FAST_GROUP_FLAGS, WorkerLauncher, WorkerProcess, wait_until
from worker.kafka.broker_processes import free_port

WORKER_FLAGS = (*FAST_GROUP_FLAGS, "--intra-op-threads", "1", "--drain-timeout-s", "15")
START_TIMEOUT_S = 120.0  # six models on a busy 2-core machine


@dataclass
class Member:
    """One worker process of the run, with its metrics port and RSS samples."""

    process: WorkerProcess
    metrics_port: int
    started_at: float
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (s since run start, MiB)
    cpu_s: float = 0.0  # user + system, at the last sample
    cpu_at_stream_s: float = 0.0  # ... when the stream began (loading the models is not serving)
    ended: str | None = None  # "sigkill", "sigterm" (left the group), "end"
    exit_code: int | None = None

    @property
    def name(self) -> str:
        """The worker's name (its log file is <name>.log)."""
        return self.process.name


class Fleet:
    """The run's workers: start, kill, let leave, stop; samples their RSS."""

    def __init__(self, launcher: WorkerLauncher, group_id: str, prefix: str, t0: float) -> None:
        self.launcher = launcher
        self.group_id = group_id
        self.prefix = prefix
        self.t0 = t0
        self.members: list[Member] = []
        self._names: Counter[str] = Counter()

    @property
    def live(self) -> list[Member]:
        """Workers not killed, left or stopped."""
        return [m for m in self.members if m.ended is None]

    def start(self, base: str) -> Member:
        """A new worker process; a restarted one gets the next incarnation number (w1, w1.2, ...)."""
        self._names[base] += 1
        n = self._names[base]
        name = base if n == 1 else f"{base}.{n}"
        port = free_port()
        flags = (*WORKER_FLAGS, "--metrics-port", str(port))
        process = self.launcher.start(name, self.group_id, self.prefix, *flags)
        member = Member(process, port, time.monotonic() - self.t0)
        self.members.append(member)
        return member

    async def ready(self, members: Sequence[Member], within: float = START_TIMEOUT_S) -> None:
        """Until each of ``members`` has started and holds partitions."""
        processes = [m.process for m in members]
        await wait_until(
            lambda: all(p.count("worker started") and p.current_assignment() for p in processes),
            within,
            f"{', '.join(m.name for m in members)} started and assigned",
            processes,
        )

    def kill(self, member: Member) -> None:
        """SIGKILL: no drain, no commit, no goodbye to the group."""
        member.process.kill_all()
        member.ended, member.exit_code = "sigkill", member.process.returncode

    async def leave(self, member: Member, within: float = 60.0) -> None:
        """SIGTERM: the worker drains, commits and leaves the group."""
        member.process.send(signal.SIGTERM)
        member.ended = "sigterm"
        member.exit_code = await member.process.wait_exit(within)

    async def stop_all(self) -> None:
        """SIGTERM every live worker together; each drains and exits."""
        live = self.live
        for member in live:
            member.process.send(signal.SIGTERM)
            member.ended = "end"
        codes = await asyncio.gather(*(m.process.wait_exit(60) for m in live), return_exceptions=True)
        for member, code in zip(live, codes, strict=True):
            member.exit_code = code if isinstance(code, int) else None

    def sample(self) -> None:
        """RSS and CPU time of every live worker, from /proc."""
        now = time.monotonic() - self.t0
        for member in self.live:
            pid = member.process.pid
            with contextlib.suppress(ProcessGone):
                member.rss_mb.append((now, rss_mib(pid)))
            with contextlib.suppress(ProcessGone):
                member.cpu_s = cpu_seconds(pid)


def scrape(port: int) -> dict[str, Any]:
    """A worker's /metrics: requests by outcome, and mean batch size per model."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError as exc:
        return {"error": repr(exc)}
    outcomes: Counter[str] = Counter()
    batch_sum: dict[str, float] = {}
    batch_count: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "inference_requests_total":
                outcomes[sample.labels["outcome"]] += int(sample.value)
            elif sample.name == "inference_batch_size_sum":
                batch_sum[sample.labels["model"]] = sample.value
            elif sample.name == "inference_batch_size_count":
                batch_count[sample.labels["model"]] = sample.value
    return {
        "requests_by_outcome": dict(outcomes),
        "mean_batch_size": {m: round(batch_sum[m] / n, 2) for m, n in batch_count.items() if n},
    }
