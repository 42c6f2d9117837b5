"""Exactly-once against at-least-once on Apache Kafka: the chaos run, and the cost.

    python -m bench.exactly_once --bootstrap-servers HOST:PORT [--requests 8000] [--rate 500]

Needs a broker with transactions (Apache Kafka; the embedded broker refuses them). For each
delivery mode, on topics and a group of its own:

- chaos: ``--requests`` text requests (tiny bert) at ``--rate`` per second while worker w1 is
  killed (SIGKILL), restarted, a second worker w2 joins and the restarted w1 is killed again;
  then w2 alone answers the rest and drains. Two group-less readers of the reply topic count
  missing and duplicate replies: read_committed and read_uncommitted.
- cost (``--cost``): one worker; the requests all at once (throughput to the last reply, worker CPU
  per request), then paced at each of ``--paced-rates`` (reply latency percentiles, from the
  request's send time to the reply's arrival at the read_committed reader).

Prints one JSON object per run and a summary table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.procstats import ProcessGone, cpu_seconds
from bench.samples import TINY
from bench.stats import percentiles
from bench.worker_processes import FAST_GROUP_FLAGS, WorkerLauncher, WorkerProcess, wait_until
from schemas.topics import requests_topic
from worker.kafka.topics import create_topics

PARTITIONS = 4
MODES = ("at-least-once", "exactly-once")
START_TIMEOUT_S = 120.0


@dataclass
class Reader:
    """A group-less reader of the reply topic at one isolation level: request id -> replies seen."""

    bootstrap: str
    topic: str
    isolation_level: str
    seen: Counter[str] = field(default_factory=Counter)
    #: request id -> when its first reply was read here (ms; a read_committed reader reads it once committed)
    first_ms: dict[str, float] = field(default_factory=dict)
    sentinels: set[str] = field(default_factory=set)

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            isolation_level=self.isolation_level,
        )
        await consumer.start()
        try:
            async for record in consumer:
                headers = dict(record.headers or ())
                if "sentinel" in headers:
                    self.sentinels.add(bytes(headers["sentinel"]).decode())
                    continue
                request_id = json.loads(record.value)["id"]
                self.seen[request_id] += 1
                self.first_ms.setdefault(request_id, time.time() * 1000)
        finally:
            await consumer.stop()


@dataclass
class Run:
    """One mode's topics, producer, readers and the requests sent (id -> send time, ms)."""

    bootstrap: str
    mode: str
    launcher: WorkerLauncher
    prefix: str = field(default_factory=lambda: f"eos{uuid.uuid4().hex[:10]}")
    sent_ms: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.group = f"{self.prefix}-group"
        self.requests = requests_topic("text", self.prefix)
        self.replies = f"{self.prefix}.replies.eos"  # the default reply_to_pattern: <prefix>.replies.*
        self.committed = Reader(self.bootstrap, self.replies, "read_committed")
        self.uncommitted = Reader(self.bootstrap, self.replies, "read_uncommitted")
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5)
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Run:
        await create_topics(self.bootstrap, [self.requests], PARTITIONS)
        await create_topics(self.bootstrap, [self.replies], 1)
        await self.producer.start()
        self._tasks = [asyncio.create_task(r.run()) for r in (self.committed, self.uncommitted)]
        return self

    async def __aexit__(self, *_: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.producer.stop()

    def worker(self, name: str) -> WorkerProcess:
        flags = (*FAST_GROUP_FLAGS, "--delivery", self.mode)
        return self.launcher.start(f"{self.prefix}-{name}", self.group, self.prefix, *flags)

    async def send(self, count: int, rate: float | None) -> None:
        """``count`` requests round-robin over the partitions, at ``rate`` per second (None: at once)."""
        started, first = time.monotonic(), len(self.sent_ms)
        pending = []
        for n in range(count):
            if rate is not None:
                await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
            request_id = f"{self.prefix}-{first + n:06d}"
            body = {
                "id": request_id,
                "model": "bert",
                "inputs": {"text": f"request {n}: the weather is fine"},
            }
            self.sent_ms[request_id] = time.time() * 1000
            pending.append(
                await self.producer.send(
                    self.requests,
                    json.dumps(body).encode(),
                    key=request_id.encode(),
                    partition=n % PARTITIONS,
                    headers=[("reply_to", self.replies.encode())],
                )
            )
        await asyncio.gather(*pending)

    async def settle(self, within: float = 120.0) -> None:
        """Until both readers have read every reply written before now (a sentinel went round)."""
        token = uuid.uuid4().hex
        await self.producer.send_and_wait(self.replies, b"{}", headers=[("sentinel", token.encode())])
        await wait_until(
            lambda: token in self.committed.sentinels and token in self.uncommitted.sentinels,
            within,
            "the sentinel in both readers",
        )

    def answered(self) -> int:
        return sum(1 for i in self.sent_ms if i in self.committed.seen)

    def counts(self) -> dict[str, int]:
        """Missing and duplicate replies as each reader saw them."""
        figures = {"sent": len(self.sent_ms)}
        for name, reader in (("read_committed", self.committed), ("read_uncommitted", self.uncommitted)):
            figures[f"{name}_missing"] = sum(1 for i in self.sent_ms if i not in reader.seen)
            figures[f"{name}_duplicates"] = sum(n - 1 for i, n in reader.seen.items() if i in self.sent_ms)
        return figures


async def ready(worker: WorkerProcess, within: float = START_TIMEOUT_S) -> None:
    await wait_until(
        lambda: worker.count("worker started") > 0 and bool(worker.current_assignment()),
        within,
        f"{worker.name} started and assigned",
        [worker],
    )


async def sigterm(worker: WorkerProcess) -> int:
    worker.send(signal.SIGTERM)
    return await worker.wait_exit(60)


async def chaos(run: Run, count: int, rate: float) -> dict[str, Any]:
    """kill -9, restart, a second worker joining, kill -9 again, all while requests arrive at ``rate``."""
    events: list[str] = []

    def note(what: str) -> None:
        events.append(f"{what} at {len(run.sent_ms)} sent, {run.answered()} answered")

    def sent(share: float) -> bool:
        return len(run.sent_ms) >= count * share

    w1 = run.worker("w1")
    await ready(w1)
    sending = asyncio.create_task(run.send(count, rate))
    await wait_until(lambda: sent(0.2), START_TIMEOUT_S, "20% sent", [w1])
    w1.kill_all()
    note("SIGKILL w1")
    w1b = run.worker("w1.2")
    note("w1.2 started")
    await wait_until(lambda: sent(0.4), START_TIMEOUT_S, "40% sent", [w1b])
    w2 = run.worker("w2")
    note("w2 started")
    await ready(w2)
    await wait_until(
        lambda: bool(w1b.current_assignment()) and sent(0.7), START_TIMEOUT_S, "w1.2 sharing", [w1b, w2]
    )
    note("w2 joined")
    w1b.kill_all()
    note("SIGKILL w1.2")
    await sending
    note("all sent")
    await wait_until(lambda: run.answered() == count, START_TIMEOUT_S * 2, "every request answered", [w2])
    events.append(f"w2 exited with {await sigterm(w2)}")
    await run.settle()
    return {"mode": run.mode, "run": "chaos", "rate": rate, **run.counts(), "events": events}


async def cost(run: Run, count: int, paced_rates: Sequence[float], paced_count: int) -> dict[str, Any]:
    """One worker: throughput and CPU per request on a flood, then reply latency at each paced rate."""
    worker = run.worker("w")
    await ready(worker)
    cpu_before = cpu_seconds(worker.pid)
    began = time.monotonic()
    await run.send(count, None)
    await wait_until(lambda: run.answered() == count, START_TIMEOUT_S * 2, "the flood answered", [worker])
    flood_s = time.monotonic() - began
    try:
        cpu = cpu_seconds(worker.pid) - cpu_before
    except ProcessGone:
        cpu = float("nan")
    curve = {}
    for rate in paced_rates:
        before = set(run.sent_ms)
        await run.send(paced_count, rate)
        await wait_until(
            lambda: run.answered() == len(run.sent_ms),
            START_TIMEOUT_S,
            f"the run at {rate}/s answered",
            [worker],
        )
        latencies = [run.committed.first_ms[i] - t for i, t in run.sent_ms.items() if i not in before]
        curve[f"{rate:g}/s"] = percentiles(latencies, (50, 90, 99))
    code = await sigterm(worker)
    return {
        "mode": run.mode,
        "run": "cost",
        "flood_requests": count,
        "throughput_per_s": round(count / flood_s, 1),
        "cpu_ms_per_request": round(cpu * 1000 / count, 2),
        "latency_ms": curve,
        "exit_code": code,
    }


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="eos-bench-") as tmp:
        models = Path(tmp) / "models"
        models.mkdir()
        (models / "bert").symlink_to(TINY / "bert", target_is_directory=True)
        launcher = WorkerLauncher(args.bootstrap_servers, models, Path(args.logs or tmp))
        try:
            for mode in args.modes:
                if not args.cost_only:
                    async with Run(args.bootstrap_servers, mode, launcher) as run:
                        results.append(await chaos(run, args.requests, args.rate))
                        print(json.dumps(results[-1]), flush=True)
                if args.cost or args.cost_only:
                    async with Run(args.bootstrap_servers, mode, launcher) as run:
                        results.append(await cost(run, args.requests, args.paced_rates, args.paced_requests))
                        print(json.dumps(results[-1]), flush=True)
        except BaseException:
            print(launcher.log_tails(), file=sys.stderr)
            raise
        finally:
            launcher.kill_all()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.exactly_once", description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap-servers", required=True, help="an Apache Kafka (with transactions)")
    parser.add_argument("--requests", type=int, default=8000)
    parser.add_argument("--rate", type=float, default=500.0, help="requests per second in the chaos run")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--cost", action="store_true", help="also the cost run (flood, then paced)")
    parser.add_argument("--cost-only", action="store_true", help="only the cost run")
    parser.add_argument("--paced-rates", type=float, nargs="+", default=[100.0, 300.0, 600.0])
    parser.add_argument("--paced-requests", type=int, default=1500, help="requests at each paced rate")
    parser.add_argument("--logs", help="keep the workers' logs in this folder")
    args = parser.parse_args(argv)
    results = asyncio.run(main_async(args))
    print("\n| mode | run | figures |\n|---|---|---|")
    for result in results:
        figures = {k: v for k, v in result.items() if k not in ("mode", "run", "events")}
        print(f"| {result['mode']} | {result['run']} | {figures} |")
    chaos_runs = [r for r in results if r["run"] == "chaos" and r["mode"] == "exactly-once"]
    failed = any(r["read_committed_missing"] or r["read_committed_duplicates"] for r in chaos_runs)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
