"""Soak and chaos runs: real worker processes, an embedded broker, a steady mixed stream of requests.

    python bench/soak.py [--requests 16000] [--rate 80] [--workers 2] [--out bench/results]
    python bench/soak.py --chaos [...]

Soak: the stream (the six tiny models' stored samples, every modality, plus ~5% malformed
requests of five kinds) runs against one or two workers; reported are replies, errors by code
against the malformed ones injected, each worker's RSS after warm-up and at the end of the
stream (medians of 15-s windows of 1-s samples), throughput and latency. Chaos: the same
stream while the oldest worker is SIGKILLed and restarted, a third joins and the oldest leaves
(SIGTERM), in turn; reported are missing replies (must be 0), duplicates and the latency
added. Results go to <out>/soak.json or <out>/chaos.json; <out>/RESULTS.md summarises both.

Latency is request produced -> reply produced (the reply record's timestamp, set by the
worker's producer), so a slow bench consumer does not count. Workers run with
--intra-op-threads 1 and the tests' fast group flags (docs/kafka-notes.md).

Sizing (2 cores, shared): two workers keep up with ~100 requests/s of this mix at best, and
starting one takes 20-50 s (the tiny wav2vec2's warm-up alone ~18 s). 20,000 requests at a
sustainable 80/s stream for 250 s per run: soak + chaos would take 10-11 minutes. The
defaults (16,000 at 80/s) take about 8.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as a script (python bench/soak.py): bench/ and the worker must be importable from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from tqdm import tqdm

from bench.plan import ROOT
from bench.samples import TINY, TINY_MODELS
from bench.soak_figures import fmt_counts, summarise, write_results
from bench.soak_fleet import START_TIMEOUT_S, Fleet, Member, scrape
from bench.soak_stream import Kind, Ledger, request_kinds
from bench.worker_processes import WorkerLauncher, wait_until
from schemas.topics import requests_topic
from worker.kafka.embedded_broker import EmbeddedBroker
from worker.kafka.topics import create_topics

PARTITIONS = 4


@dataclass
class Run:
    """Everything one soak or chaos run needs and measures."""

    args: argparse.Namespace
    bootstrap: str
    kinds: list[Kind]
    prefix: str = field(default_factory=lambda: f"soak{uuid.uuid4().hex[:8]}")
    ledger: Ledger = field(default_factory=Ledger)
    events: list[dict[str, Any]] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)
    t0_wall: float = field(default_factory=time.time)
    produced: asyncio.Event = field(default_factory=asyncio.Event)
    #: Seconds since the run began: workers ready, first and last request sent, first chaos event.
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        """Note when something first happened, in seconds since the run began."""
        self.marks.setdefault(name, time.monotonic() - self.t0)

    def since_start(self, wall: float) -> float:
        """A wall-clock time as seconds since the run began."""
        return wall - self.t0_wall

    @property
    def reply_topic(self) -> str:
        """Where every request asks for its reply (reply_to)."""
        return f"{self.prefix}.replies.soak"

    @property
    def topics(self) -> list[str]:
        """The request topics of the mix's modalities."""
        return [requests_topic(m, self.prefix) for m in sorted({k.modality for k in self.kinds})]

    def schedule(self) -> Iterator[tuple[str, Kind]]:
        """The request ids and kinds, in sending order (seeded: a rerun sends the same mix)."""
        rng = random.Random(self.args.seed)
        chosen = rng.choices(self.kinds, weights=[k.weight for k in self.kinds], k=self.args.requests)
        for i, kind in enumerate(chosen):
            yield f"{self.prefix}-{i:06d}", kind

    def injected(self) -> Counter[str]:
        """Malformed requests sent, by the error code each must get."""
        return Counter(k.expected for k in self.ledger.kinds.values() if k.expected != "ok")

    async def produce(self, producer: AIOKafkaProducer) -> None:
        """The stream at a steady rate; behind schedule it catches up at full speed."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        deliveries = []
        self.mark("stream_began")
        for i, (request_id, kind) in enumerate(self.schedule()):
            delay = start + i / self.args.rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self.ledger.sending(request_id, kind)
            future = await producer.send(
                requests_topic(kind.modality, self.prefix),
                kind.body(request_id),
                key=request_id.encode(),
                headers=[
                    ("correlation_id", request_id.encode()),
                    ("reply_to", self.reply_topic.encode()),
                    ("content-type", b"application/json"),
                ],
            )
            future.add_done_callback(self.ledger.delivered)
            deliveries.append(future)
        self.mark("stream_ended")
        await asyncio.gather(*deliveries, return_exceptions=True)
        self.produced.set()

    async def collect(self, consumer: AIOKafkaConsumer) -> None:
        """Every reply on the reply topic, into the ledger."""
        while True:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    self.ledger.received(record)

    async def settle(self, producer: AIOKafkaProducer, within: float = 60.0) -> None:
        """Until every reply written before now has been read (a sentinel went round)."""
        token = uuid.uuid4().hex
        await producer.send_and_wait(self.reply_topic, b"{}", headers=[("sentinel", token.encode())])
        await wait_until(lambda: token in self.ledger.sentinels, within, "the reply-topic sentinel")

    async def watch(self, fleet: Fleet, bar: tqdm[Any]) -> None:
        """Once a second: RSS of every live worker, and the progress bar."""
        while True:
            fleet.sample()
            bar.n = self.ledger.answered
            bar.set_postfix(
                sent=len(self.ledger.sent_at),
                workers=len(fleet.live),
                events=len(self.events),
                rss=",".join(f"{m.rss_mb[-1][1]:.0f}" for m in fleet.live if m.rss_mb),
                refresh=False,
            )
            bar.refresh()
            await asyncio.sleep(1.0)

    def event(self, kind: str, member: Member, **extra: Any) -> None:
        """Record a chaos event (the first one starts the chaos period)."""
        self.mark("chaos_began")
        self.events.append(
            {"t_s": round(time.monotonic() - self.t0, 1), "event": kind, "worker": member.name, **extra}
        )

    async def chaos(self, fleet: Fleet) -> None:
        """After warm-up, in turn: the oldest is SIGKILLed and restarted, a third joins, the oldest leaves.

        Each event waits for the worker it started to be ready, then --kill-every / 3 seconds pass.
        """
        args = self.args
        await wait_until(
            lambda: self.ledger.answered >= args.requests * args.warmup or self.produced.is_set(),
            START_TIMEOUT_S + args.requests / args.rate,
            "warm-up replies",
        )
        cycle = ("kill", "join", "leave")
        step = 0
        while not self.produced.is_set():
            action = cycle[step % len(cycle)]
            step += 1
            oldest = min(fleet.live, key=lambda m: m.started_at)  # it holds partitions and has work in flight
            if action == "kill":
                victim = oldest
                fleet.kill(victim)
                self.event("sigkill", victim, answered=self.ledger.answered)
                successor = fleet.start(victim.name.split(".")[0])
                self.event("restart", successor)
                await fleet.ready([successor])
            elif action == "join":
                joiner = fleet.start("joiner")
                self.event("join", joiner)
                await fleet.ready([joiner])
            else:
                leaver = oldest
                await fleet.leave(leaver)
                self.event("leave", leaver, exit_code=leaver.exit_code)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.produced.wait(), args.kill_every / len(cycle))

    async def committed_at_end(self) -> dict[str, Any]:
        """The group's committed offsets against the end of every partition the stream wrote to."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=f"{self.prefix}.workers", enable_auto_commit=False
        )
        await consumer.start()
        try:
            short = {}
            for tp, end in sorted(self.ledger.ends.items()):
                committed = await consumer.committed(tp)
                if committed != end:
                    short[f"{tp.topic}:{tp.partition}"] = {"committed": committed, "end": end}
        finally:
            await consumer.stop()
        return {"all_at_end": not short, "short": short}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """One soak or chaos run, from an empty broker to a summary."""
    began = time.monotonic()
    main_task = asyncio.current_task()
    assert main_task is not None
    # SIGTERM unwinds like Ctrl+C: the finally blocks kill the workers and stop the broker.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    kinds = request_kinds()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        models = Path(tmp) / "models"
        models.mkdir()
        for name in TINY_MODELS:
            (models / name).symlink_to(TINY / name, target_is_directory=True)
        logs = Path(args.logs) if args.logs else Path(tmp) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        async with EmbeddedBroker() as broker:
            r = Run(args, broker.bootstrap_servers, kinds)
            await create_topics(r.bootstrap, r.topics, PARTITIONS)
            await create_topics(r.bootstrap, [r.reply_topic], 1)
            launcher = WorkerLauncher(r.bootstrap, models, logs)
            try:
                return await measure(r, Fleet(launcher, f"{r.prefix}.workers", r.prefix, r.t0), began)
            except BaseException:
                print(launcher.log_tails(), file=sys.stderr)
                raise
            finally:
                launcher.kill_all()


async def measure(r: Run, fleet: Fleet, began: float) -> dict[str, Any]:
    """Start the workers, run the stream (and the chaos), collect, stop, and summarise."""
    args = r.args
    producer = AIOKafkaProducer(
        bootstrap_servers=r.bootstrap,
        acks="all",
        enable_idempotence=False,
        linger_ms=5,
        max_request_size=2**21,
    )
    consumer = AIOKafkaConsumer(
        r.reply_topic, bootstrap_servers=r.bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await producer.start()
    await consumer.start()
    bar = tqdm(total=args.requests, unit="req", desc="starting workers", dynamic_ncols=True)
    tasks = [asyncio.create_task(r.collect(consumer)), asyncio.create_task(r.watch(fleet, bar))]
    try:
        first = [fleet.start(f"w{i + 1}") for i in range(args.workers)]
        await fleet.ready(first)  # sampled meanwhile: loading the models is the RSS peak
        r.mark("workers_ready")
        for member in first:
            member.cpu_at_stream_s = member.cpu_s
        bar.set_description("chaos" if args.chaos else "soak")
        bar.reset()
        producing = asyncio.create_task(r.produce(producer))
        chaos = asyncio.create_task(r.chaos(fleet)) if args.chaos else None
        tasks += [producing, *([chaos] if chaos else [])]
        await producing
        if chaos is not None:
            await chaos
        with contextlib.suppress(TimeoutError):
            await wait_until(
                lambda: r.ledger.answered == args.requests,
                args.tail_timeout,
                "every reply",
                [m.process for m in fleet.live],
            )
        metrics = {m.name: await asyncio.to_thread(scrape, m.metrics_port) for m in fleet.live}
        fleet.sample()
        await fleet.stop_all()
        await r.settle(producer)
        committed = await r.committed_at_end()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        bar.close()
        await consumer.stop()
        await producer.stop()
    return summarise(r, fleet, metrics, committed, time.monotonic() - began)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one soak or chaos run, write its results; exit status 1 when it did not pass."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=16_000, help="requests in the stream")
    parser.add_argument("--rate", type=float, default=80.0, help="requests per second")
    parser.add_argument("--workers", type=int, default=2, choices=(1, 2), help="workers at the start")
    parser.add_argument("--chaos", action="store_true", help="kill/restart, join and leave workers meanwhile")
    parser.add_argument(
        "--kill-every", type=float, default=30.0, help="chaos: seconds between SIGKILLs, restarts not counted"
    )
    parser.add_argument("--warmup", type=float, default=0.2, help="share of the stream that is warm-up")
    parser.add_argument(
        "--tail-timeout", type=float, default=120.0, help="wait this long for the last replies"
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of the request mix")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results folder")
    parser.add_argument("--logs", default=None, help="keep the worker logs in this folder")
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        result = asyncio.run(run(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: the workers and the broker are stopped, nothing written", file=sys.stderr)
        return 130
    write_results(Path(args.out), result)
    req = result["requests"]
    print(
        f"{result['mode']}: {req['answered']}/{req['sent']} answered, {req['missing']} missing, "
        f"{req['duplicates']} duplicates, errors {fmt_counts(result['errors_by_code'])} "
        f"(match injected: {result['errors_match_injected']}), {result['throughput_rps']}/s, "
        f"latency {result['latency_ms']}, wall {result['wall_s']} s -> {args.out}"
    )
    return 0 if passed(result) else 1


def passed(result: dict[str, Any]) -> bool:
    """Nothing missing, errors exactly the injected ones, duplicates agree, offsets committed to the end."""
    req = result["requests"]
    return bool(
        req["missing"] == 0
        and req["duplicates_disagreeing"] == 0
        and result["errors_match_injected"]
        and result["committed"]["all_at_end"]
        and result.get("chaos", {}).get("leaves_exited_cleanly", True)
    )


if __name__ == "__main__":
    sys.exit(main())
