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
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as a script (python bench/soak.py): bench/ and the worker must be importable from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.structs import RecordMetadata
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from bench.plan import ROOT
from bench.procstats import ProcessGone, cpu_seconds, rss_mib
from bench.samples import TINY, TINY_MODELS, b64, request_bytes, stored_inputs, wire_inputs
from bench.stats import percentiles
from bench.worker_processes import (
    FAST_GROUP_FLAGS,
    Reply,
    WorkerLauncher,
    WorkerProcess,
    replies_agree,
    wait_until,
)
from schemas.limits import MAX_TEXT_CHARS
from worker.embedded_broker import EmbeddedBroker, free_port
from worker.topics import create_topics, requests_topic

#: Share of the stream per model (split over its stored samples), and per malformed kind.
#: whisper-encoder is rare: its feature extractor pads every clip to 30 s (~100 ms CPU per request,
#: measured; the other five prepare in 1-2 ms).
MODEL_MIX = {
    "bert": 0.40,
    "vit": 0.15,
    "wav2vec2": 0.12,
    "whisper-encoder": 0.03,
    "videomae": 0.12,
    "clip": 0.13,
}
MALFORMED_SHARE = 0.01  # each of the five kinds: 5% in all
MODALITY = {
    "bert": "text",
    "vit": "vision",
    "wav2vec2": "audio",
    "whisper-encoder": "audio",
    "videomae": "video",
    "clip": "multimodal",
}
PARTITIONS = 4
WORKER_FLAGS = (*FAST_GROUP_FLAGS, "--intra-op-threads", "1", "--drain-timeout-s", "15")
START_TIMEOUT_S = 120.0  # six models on a busy 2-core machine
RSS_WINDOW_S = 15.0
_ID = b"@@ID@@"  # never in base64 or in the samples' text


@dataclass(frozen=True)
class Kind:
    """One kind of request: its topic, its body (with the id left open) and the outcome it must get."""

    name: str
    modality: str
    template: bytes
    expected: str  # "ok" or an error code
    weight: float

    def body(self, request_id: str) -> bytes:
        """The request message for ``request_id``."""
        return self.template.replace(_ID, request_id.encode())


def request_kinds() -> list[Kind]:
    """The mix: each tiny model's stored samples, and five malformed kinds (one error code each)."""
    kinds = []
    for model in TINY_MODELS:
        samples = stored_inputs(model)
        for i, sample in enumerate(samples):
            template = request_bytes(_ID.decode(), model, wire_inputs(sample))
            kinds.append(
                Kind(f"{model}#{i}", MODALITY[model], template, "ok", MODEL_MIX[model] / len(samples))
            )
    id_ = _ID.decode()
    bad_image = {"image": b64(b"not an image" * 8)}
    oversize = {"text": "x" * (MAX_TEXT_CHARS + 1)}
    malformed = {  # name: (topic's modality, body, the error code it must get)
        "bad-json": ("text", b'{"id": "' + _ID + b'", "model": "bert", "inputs": {"text": ', "invalid_json"),
        "no-inputs": ("text", json.dumps({"id": id_, "model": "bert"}).encode(), "invalid_request"),
        "unknown-model": ("text", request_bytes(id_, "no-such-model", {"text": "hi"}), "unknown_model"),
        "bad-image": ("vision", request_bytes(id_, "vit", bad_image), "undecodable_input"),
        "oversize-text": ("text", request_bytes(id_, "bert", oversize), "payload_too_large"),
    }
    kinds += [Kind(name, *spec, weight=MALFORMED_SHARE) for name, spec in malformed.items()]
    return kinds


# --- what was sent and what came back --------------------------------------------------


@dataclass
class Ledger:
    """Requests sent and replies received, by request id (the correlation id of both)."""

    kinds: dict[str, Kind] = field(default_factory=dict)
    sent_at: dict[str, float] = field(default_factory=dict)  # wall clock, s
    first: dict[str, Reply] = field(default_factory=dict)
    outcome: dict[str, str] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    duplicates: Counter[str] = field(default_factory=Counter)
    disagreeing: list[str] = field(default_factory=list)
    strays: int = 0  # replies to no request of this run
    unreadable: int = 0  # replies that are not JSON
    produce_errors: list[str] = field(default_factory=list)
    ends: dict[TopicPartition, int] = field(default_factory=dict)
    last_reply_at: float = 0.0
    sentinels: set[str] = field(default_factory=set)

    def sending(self, request_id: str, kind: Kind) -> None:
        """Called just before a request is produced."""
        self.kinds[request_id] = kind
        self.sent_at[request_id] = time.time()

    def delivered(self, future: asyncio.Future[RecordMetadata]) -> None:
        """Producer callback: the record's offset, for the committed-offset check at the end."""
        if future.cancelled() or future.exception() is not None:
            self.produce_errors.append(repr(future.exception()))
            return
        meta = future.result()
        tp = TopicPartition(meta.topic, meta.partition)
        self.ends[tp] = max(self.ends.get(tp, 0), meta.offset + 1)

    def received(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """One record of the reply topic: a first reply, a duplicate, a sentinel or a stray."""
        headers = {k: bytes(v).decode("utf-8", "replace") for k, v in record.headers or () if v is not None}
        if "sentinel" in headers:
            self.sentinels.add(headers["sentinel"])
            return
        cid = headers.get("correlation_id")
        if cid is None or cid not in self.sent_at:
            self.strays += 1
            return
        try:
            body = json.loads(record.value or b"")
        except ValueError:
            self.unreadable += 1
            return
        key = record.key.decode() if record.key is not None else None
        reply = Reply(body.get("id"), key, cid, body)
        outcome = body["error"]["code"] if body.get("error") else "ok"
        if cid in self.first:
            self.duplicates[cid] += 1
            if not self._agree(self.first[cid], self.outcome[cid], reply, outcome):
                self.disagreeing.append(cid)
            return
        self.first[cid] = reply
        self.outcome[cid] = outcome
        self.latency_ms[cid] = record.timestamp - self.sent_at[cid] * 1000
        self.last_reply_at = time.time()

    @staticmethod
    def _agree(first: Reply, first_outcome: str, reply: Reply, outcome: str) -> bool:
        if outcome != first_outcome:
            return False
        return outcome != "ok" or replies_agree([first, reply])

    @property
    def answered(self) -> int:
        """Requests with at least one reply."""
        return len(self.first)

    def missing(self) -> list[str]:
        """Requests without a reply, in sending order."""
        return [i for i in self.sent_at if i not in self.first]


# --- worker processes --------------------------------------------------------------------


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


# --- the run -------------------------------------------------------------------------------


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
        return f"{self.prefix}.replies"

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


# --- the figures ---------------------------------------------------------------------------


def latency_percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99, max and mean, rounded to 0.1."""
    return percentiles(values, (50, 90, 99), mean=True)


def rss_figures(member: Member, warm_from: float, end_at: float) -> dict[str, Any]:
    """RSS after warm-up and at the end of the stream: medians of the samples of a window of
    RSS_WINDOW_S seconds from ``warm_from`` and up to ``end_at`` (batches make short spikes)."""
    samples = member.rss_mb
    if not samples:
        return {}

    def median_in(lo: float, hi: float) -> float:
        inside = [mb for t, mb in samples if lo <= t <= hi]
        nearest = min(samples, key=lambda s: min(abs(s[0] - lo), abs(s[0] - hi)))[1]
        return float(np.median(inside)) if inside else nearest

    end_at = min(end_at, samples[-1][0])
    warm_from = min(warm_from, end_at - RSS_WINDOW_S)
    warm = median_in(warm_from, warm_from + RSS_WINDOW_S)
    end = median_in(end_at - RSS_WINDOW_S, end_at)
    series, last = [], -5.0
    for t, mb in samples:
        if t - last >= 5.0:
            series.append([round(t, 1), round(mb, 1)])
            last = t
    return {
        "started_s": round(member.started_at, 1),
        "ended": member.ended,
        "exit_code": member.exit_code,
        "cpu_s": round(member.cpu_s, 1),
        "warm_window_s": [round(warm_from, 1), round(warm_from + RSS_WINDOW_S, 1)],
        "end_window_s": [round(end_at - RSS_WINDOW_S, 1), round(end_at, 1)],
        "warm_mb": round(warm, 1),
        "end_mb": round(end, 1),
        "growth_pct": round((end - warm) / warm * 100, 2),
        "max_mb": round(max(mb for _, mb in samples), 1),
        "last_mb": round(samples[-1][1], 1),
        "series_s_mb": series,
    }


def summarise(
    r: Run, fleet: Fleet, metrics: dict[str, Any], committed: dict[str, Any], wall_s: float
) -> dict[str, Any]:
    """Every figure of the run, as one JSON-able dict."""
    args, ledger, marks = r.args, r.ledger, r.marks
    errors = Counter(o for o in ledger.outcome.values() if o != "ok")
    injected = r.injected()
    unexpected = [
        {"id": i, "kind": ledger.kinds[i].name, "expected": ledger.kinds[i].expected, "got": o}
        for i, o in ledger.outcome.items()
        if o != ledger.kinds[i].expected
    ]
    by_model: dict[str, list[float]] = {}
    for i, ms in ledger.latency_ms.items():
        by_model.setdefault(ledger.kinds[i].name.split("#")[0], []).append(ms)
    sent_s = [r.since_start(t) for t in ledger.sent_at.values()]
    # Warm-up: until that share of the stream was sent; a later worker warms up for 30 s.
    warm_at = sent_s[min(int(len(sent_s) * args.warmup), len(sent_s) - 1)] if sent_s else 0.0
    stream_ended = marks.get("stream_ended", 0.0)
    span = max(r.since_start(ledger.last_reply_at) - marks.get("stream_began", 0.0), 1e-9)
    outcomes: Counter[str] = Counter()
    for scraped in metrics.values():
        outcomes.update(scraped.get("requests_by_outcome", {}))
    cpu_s = sum(m.cpu_s - m.cpu_at_stream_s for m in fleet.members)
    result: dict[str, Any] = {
        "mode": "chaos" if args.chaos else "soak",
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "config": {
            "requests": args.requests,
            "rate_per_s": args.rate,
            "workers": args.workers,
            "warmup_share": args.warmup,
            "seed": args.seed,
            "worker_flags": list(WORKER_FLAGS),
            "mix": {k.name: round(k.weight, 4) for k in r.kinds},
            **({"kill_every_s": args.kill_every} if args.chaos else {}),
        },
        "wall_s": round(wall_s, 1),
        "marks_s": {k: round(v, 1) for k, v in marks.items()},
        "requests": {
            "sent": len(ledger.sent_at),
            "answered": ledger.answered,
            "missing": len(ledger.missing()),
            "missing_ids": ledger.missing()[:20],
            "duplicates": sum(ledger.duplicates.values()),
            "duplicated_requests": len(ledger.duplicates),
            "duplicates_disagreeing": len(ledger.disagreeing),
            "stray_replies": ledger.strays,
            "unreadable_replies": ledger.unreadable,
            "produce_errors": len(ledger.produce_errors),
        },
        "errors_by_code": dict(sorted(errors.items())),
        "injected_by_code": dict(sorted(injected.items())),
        "errors_match_injected": errors == injected and not unexpected,
        "unexpected_outcomes": unexpected[:20],
        "throughput_rps": round(ledger.answered / span, 1),
        "worker_cpu_ms_per_request": round(cpu_s * 1000 / max(ledger.answered, 1), 1),
        "latency_ms": latency_percentiles(list(ledger.latency_ms.values())),
        "latency_by_model_ms": {k: latency_percentiles(v) for k, v in sorted(by_model.items())},
        "rss": {m.name: rss_figures(m, max(warm_at, m.started_at + 30), stream_ended) for m in fleet.members},
        "metrics_at_end": {
            "per_worker": metrics,
            "requests_by_outcome": dict(sorted(outcomes.items())),
            # Workers count duplicates too, and a killed worker's counters die with it.
            "match_replies": outcomes == Counter(ledger.outcome.values()),
        },
        "committed": committed,
    }
    if args.chaos:
        result["events"] = r.events
        result["chaos"] = chaos_figures(r)
    return result


def chaos_figures(r: Run) -> dict[str, Any]:
    """Latency during the chaos against the soak's p99 (soak.json in --out), or this run's pre-chaos p99."""
    ledger = r.ledger
    began = r.marks.get("chaos_began", float("inf"))
    # Before: sent and answered before the first event; during: everything else.
    before: list[float] = []
    during: list[float] = []
    for i, ms in ledger.latency_ms.items():
        answered_s = r.since_start(ledger.sent_at[i]) + ms / 1000
        (before if answered_s < began else during).append(ms)
    soak_file = Path(r.args.out) / "soak.json"
    baseline, source = None, "none"
    if soak_file.exists():
        baseline, source = json.loads(soak_file.read_text())["latency_ms"].get("p99"), "soak.json p99"
    elif before:
        baseline, source = latency_percentiles(before)["p99"], "this run's pre-chaos p99"
    worst = max(during, default=None)
    return {
        "latency_before_chaos_ms": latency_percentiles(before),
        "latency_during_chaos_ms": latency_percentiles(during),
        "baseline_p99_ms": baseline,
        "baseline": source,
        "max_added_latency_ms": round(worst - baseline, 1) if worst is not None and baseline else None,
        "leaves_exited_cleanly": all(e.get("exit_code") == 0 for e in r.events if e["event"] == "leave"),
    }


def machine() -> dict[str, Any]:
    """The machine the figures come from (they are noisy on a shared one)."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?"
    )
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    mem_kb = next((int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal:")), 0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_gib": round(mem_kb / 2**20, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "commit": commit.stdout.strip() or None,
    }


# --- the report ------------------------------------------------------------------------------


def write_results(out: Path, result: dict[str, Any]) -> None:
    """<out>/<mode>.json, and RESULTS.md over every result there."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{result['mode']}.json").write_text(json.dumps(result, indent=2) + "\n")
    runs = {
        m: json.loads((out / f"{m}.json").read_text())
        for m in ("soak", "chaos")
        if (out / f"{m}.json").exists()
    }
    (out / "RESULTS.md").write_text(render(runs))


def render(runs: dict[str, dict[str, Any]]) -> str:
    """The markdown summary of the soak and chaos results."""
    lines = [
        "# Soak and chaos results",
        "",
        "Written by `bench/soak.py` (its docstring says what is measured and how); the JSON next to",
        "this file holds every figure, per-model latencies and RSS series included.",
    ]
    for mode, res in runs.items():
        lines += ["", *render_run(mode, res)]
    return "\n".join(lines) + "\n"


def render_run(mode: str, res: dict[str, Any]) -> list[str]:
    """One run's section of RESULTS.md."""
    m, req, lat, cfg = res["machine"], res["requests"], res["latency_ms"], res["config"]
    flag = " --chaos" if mode == "chaos" else ""
    committed = res["committed"]
    metrics_match = res["metrics_at_end"]["match_replies"]
    if mode == "chaos":
        metrics_match = "not comparable: killed workers' counters are gone, duplicates count twice"
    lines = [
        f"## {mode} ({res['finished_at']})",
        "",
        f"Machine: `nproc` {m['nproc']}, {m['cpu_model']}, {m['memory_gib']} GiB RAM; load average at the "
        f"end {m['load_average']} (shared with other work: the figures are noisy). Commit {m['commit']}.",
        "",
        f"`python bench/soak.py{flag} --requests {cfg['requests']} --rate {cfg['rate_per_s']:g} "
        f"--workers {cfg['workers']}`: wall time {res['wall_s']} s, of which "
        f"{res['marks_s']['workers_ready']} s starting the first workers.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| answered / sent | {req['answered']} / {req['sent']} |",
        f"| missing replies | {req['missing']} |",
        f"| duplicate replies | {req['duplicates']} (over {req['duplicated_requests']} requests; "
        f"{req['duplicates_disagreeing']} disagreeing) |",
        f"| errors by code | {fmt_counts(res['errors_by_code'])} |",
        f"| malformed injected | {fmt_counts(res['injected_by_code'])} |",
        f"| errors = injected | {res['errors_match_injected']} |",
        f"| /metrics outcomes = replies | {metrics_match} |",
        f"| committed offsets at the end | {'all' if committed['all_at_end'] else committed['short']} |",
        f"| throughput | {res['throughput_rps']} replies/s |",
        f"| latency p50 / p99 / max | {lat.get('p50')} / {lat.get('p99')} / {lat.get('max')} ms |",
        f"| worker CPU per request | {res['worker_cpu_ms_per_request']} ms |",
    ]
    if mode == "chaos":
        ch = res["chaos"]
        before, during = ch["latency_before_chaos_ms"], ch["latency_during_chaos_ms"]
        lines += [
            f"| chaos events | {fmt_counts(dict(Counter(e['event'] for e in res['events'])))} |",
            f"| latency p99 before / during chaos | {before.get('p99')} / {during.get('p99')} ms |",
            f"| max added latency | {ch['max_added_latency_ms']} ms (max during chaos {during.get('max')} ms "
            f"- {ch['baseline']} {ch['baseline_p99_ms']} ms) |",
            f"| leaving workers exited 0 | {ch['leaves_exited_cleanly']} |",
        ]
    lines += [
        "",
        "| worker | started (s) | ended (exit) | RSS after warm-up | RSS at end | growth (target < 10%) "
        "| peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rss in res["rss"].items():
        if rss:
            lines.append(
                f"| {name} | {rss['started_s']} | {rss['ended']} ({rss['exit_code']}) | {rss['warm_mb']} MiB "
                f"| {rss['end_mb']} MiB | {rss['growth_pct']:+.1f}% | {rss['max_mb']} MiB |"
            )
    lines += [
        "",
        "RSS is sampled every second from the worker's start: the peak includes loading the models.",
    ]
    return lines


def fmt_counts(counts: dict[str, int]) -> str:
    """``a 1, b 2`` (or ``none``)."""
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


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
