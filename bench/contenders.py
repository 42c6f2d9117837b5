"""The main measurement: the chosen worker configuration head to head with the naive consumers."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.corpus import cycled, spaced_sample
from bench.hosts import Child, Host, alone, served, unique_name, warm_up
from bench.load import LoadClient, Run
from bench.plan import EXPORT_PYTHON, Context, Inputs, SweepPoint
from bench.procstats import peak_rss_mib, rss_mib, watched
from bench.raw import RawPass, in_flight_label
from bench.report import PROFILES


def torch_python() -> tuple[str | None, str]:
    """An interpreter that can import torch: this one, else the export venv's; with a note."""
    if importlib.util.find_spec("torch") is not None:
        return sys.executable, "subprocess, this interpreter"
    if EXPORT_PYTHON.exists():
        probe = subprocess.run(
            [str(EXPORT_PYTHON), "-c", "import torch, transformers"], capture_output=True, check=False
        )
        if probe.returncode == 0:
            return str(EXPORT_PYTHON), f"subprocess in {EXPORT_PYTHON.parent.parent.name}"
    return None, "skipped: no interpreter with torch (make the export venv: make models)"


async def start_naive(
    ctx: Context,
    client: LoadClient,
    backend: str,
    inputs: Inputs,
    stack: contextlib.AsyncExitStack,
    python: str,
) -> tuple[int, str]:
    """A naive consumer (torch or onnx) in its own process, warmed up: its pid and request topic."""
    from worker.kafka.topics import create_topics

    topic = f"{unique_name('naive')}.text.requests"
    await create_topics(ctx.bootstrap, [topic], partitions=4)
    spec = {
        "backend": backend,
        "model_dir": str(ctx.model_dir),
        "max_tokens": ctx.max_tokens,
        "topic": topic,
        "group": topic,
        "bootstrap": ctx.bootstrap,
    }
    ctx.say(f"naive {backend}: loading")
    child = await Child.spawn(python, "naive", spec, ctx.out / "logs" / f"{unique_name(backend)}.log")
    stack.push_async_callback(child.close)
    await child.event("ready", limit_s=600)
    await warm_up(client, topic, ctx, inputs, count=8)
    return child.pid, topic


async def measured(ctx: Context, name: str, pid: int, run: Coroutine[Any, Any, Run]) -> dict[str, Any]:
    """One run's summary, the CPU of every process involved, and the peak RSS of ``pid``."""
    pids = {name: pid, "load generator (bench)": os.getpid()}
    if ctx.broker_pid is not None:
        pids["broker (tansu)"] = ctx.broker_pid
    async with watched(pids, pid) as seen:
        done = await run
    ctx.tick()
    return done.summary() | seen


async def measure_main(ctx: Context, point: SweepPoint, inputs: Inputs, raw_batch: int) -> dict[str, Any]:
    """The head-to-head in rounds, then the worker's and the naive ONNX consumer's paced runs.

    Each round times, one after the other and each alone with a fresh broker: the worker on the
    whole mix, raw ONNX Runtime at its best batch size (``raw_batch``) on the same sentences, and
    each naive consumer in a fresh process. Ratios are taken within a round and their median
    reported: this machine's speed drifts by up to a third within minutes (raw ORT 314 to 433/s in
    one quarter hour), far more than the differences being judged, so a contender timed minutes
    apart from another would compare the machine's moods, not the code.
    """
    lengths = [len(ids) for ids in inputs.encodings]
    raws = {
        in_flight_label(n): RawPass(ctx.model_dir, inputs.mix, lengths, raw_batch, in_flight=n)
        for n in (1, 2)
    }
    naive = {backend: Naive.of(ctx, backend, inputs) for backend in ("onnx", "torch")}
    rounds: list[dict[str, Any]] = []

    async def rivals() -> None:
        ctx.say("saturation: raw ONNX Runtime")
        found: dict[str, Any] = {"raw_ort": best_of({label: raw.measure() for label, raw in raws.items()})}
        ctx.tick()
        for backend, consumer in naive.items():
            ctx.say(f"saturation: naive {backend}")
            found[f"naive_{backend}"] = await consumer.saturation()
        rounds.append(found)

    worker = await measure_worker(ctx, point, inputs, rivals)
    capacity = float(np.median([r["throughput_per_s"] for r in worker["saturation_mix"]]))
    head_to_head = {
        "order": "per round: worker, raw ORT (one batch at a time, then two at once: the faster counts), "
        "naive ONNX, naive PyTorch; each alone, a fresh broker per run",
        "raw_ort_batch_size": raw_batch,
        "raw_ort": [r["raw_ort"] for r in rounds],
    }
    found: dict[str, Any] = {"head_to_head": head_to_head, "worker": worker}
    for backend, consumer in naive.items():
        found[f"naive_{backend}"] = await consumer.summary([r[f"naive_{backend}"] for r in rounds], capacity)
    return found


async def measure_worker(
    ctx: Context, point: SweepPoint, inputs: Inputs, rivals: Callable[[], Awaitable[None]]
) -> dict[str, Any]:
    """The chosen configuration with the extra models loaded: idle cost, saturation on the mix (after
    each run, ``rivals`` time the other contenders while this process idles, attached to nothing) and
    on 128-token inputs, latency against offered load, profiles at saturation, at half and at 75% load, RSS."""
    plan = ctx.plan
    async with contextlib.AsyncExitStack() as stack:
        host = await Host.start(ctx, point, with_extras=True)
        stack.push_async_callback(host.child.close)
        pid = host.child.pid
        hwm = {"loaded": peak_rss_mib(pid)}
        worker: dict[str, Any] = {
            "label": point.label,
            "settings": dict(point.settings),
            "overrides": dict(point.overrides),
            "process": "subprocess (python -m bench.children host): the registry's load_model + Worker",
            "load_s": host.load_s,
            "ort_sessions": len(host.buckets),
            "buckets": {"total": sum(host.buckets.values()), **host.buckets},
            "rss_loaded_mib": round(rss_mib(pid), 1),
        }
        async with alone(ctx):
            worker["idle"] = await idle_cost(ctx, host)

        async def one_run(
            texts: Sequence[str], rate: float | None = None, profile: str | None = None
        ) -> dict[str, Any]:
            async with served(ctx, host, point, inputs) as (client, topic):
                await asyncio.sleep(1.0)
                worker.setdefault("rss_idle_mib", round(rss_mib(pid), 1))
                limit = None if rate is None else plan.load_seconds + 120
                if profile:  # sampled while this Worker's threads live (they end with it)
                    await host.child.ask({"cmd": "profile_start"}, "profiling")
                run = await measured(ctx, "worker", pid, client.run(topic, texts, rate=rate, limit_s=limit))
                if profile:
                    worker[profile] = (await host.child.ask({"cmd": "profile_stop"}, "profile"))["profile"]
                    worker[profile]["run"] = run
                return run

        runs = []
        for _ in range(plan.rounds):
            ctx.say("saturation: worker")
            runs.append(await one_run(inputs.mix))
            await rivals()
        worker["saturation_mix"] = runs
        hwm["saturation, mix"] = peak_rss_mib(pid)
        ctx.say("worker: 128-token texts")
        worker["saturation_fixed_128"] = [await one_run(inputs.fixed) for _ in range(plan.repeats)]
        hwm["saturation, 128 tokens"] = peak_rss_mib(pid)
        capacity = float(np.median([r["throughput_per_s"] for r in worker["saturation_mix"]]))
        worker["latency_vs_load"] = await latency_sweep(ctx, "worker", inputs, capacity, one_run)
        hwm["paced runs"] = peak_rss_mib(pid)
        for label, fraction, _ in PROFILES:
            rate = None if fraction is None else fraction * capacity
            ctx.say(f"worker: profiled run ({label})")
            await one_run(
                inputs.mix if rate is None else cycled(inputs.mix, rate, ctx.plan.load_seconds), rate, label
            )
        hwm["profiled runs"] = peak_rss_mib(pid)
        ctx.say("stage costs")
        command = {
            "cmd": "stages",
            "model": ctx.model_name,
            "texts": spaced_sample(inputs.mix, min(len(inputs.mix), 512)),
            "max_batch_size": int(point.settings.get("max_batch_size", 32)),
        }
        worker["stage_costs"] = (await host.child.ask(command, "stages"))["stages"]
        # The same shapes as raw ORT padded to 128 at batch 32: what the engine alone costs on top.
        # Last: it holds every output of 512 + 256 texts at once, which would raise the RSS figures.
        command["texts"] = inputs.fixed
        worker["stage_costs_128_tokens"] = (await host.child.ask(command, "stages"))["stages"]
        hwm["stage costs"] = peak_rss_mib(pid)
        ctx.tick()
        watched_runs = worker["saturation_mix"] + worker["saturation_fixed_128"] + worker["latency_vs_load"]
        profiled_runs = [worker[label]["run"] for label, _, _ in PROFILES]
        worker["rss_peak_mib"] = round(max(r["peak_rss_mib"] for r in [*watched_runs, *profiled_runs]), 1)
        worker["vm_hwm_mib_after"] = {phase: round(mib, 1) for phase, mib in hwm.items()}
    return worker


#: Worker settings of the idle comparison: the defaults, and the fetch settings before this issue.
IDLE_POINTS = (
    SweepPoint("defaults"),
    SweepPoint(
        "before: fetch_timeout_ms 20, fetch_max_wait_ms 20 busy and idle",
        {"fetch_timeout_ms": 20, "fetch_max_wait_ms": 20, "idle_fetch_max_wait_ms": 20},
    ),
)


async def idle_cost(ctx: Context, host: Host) -> dict[str, Any]:
    """CPU of an idle Worker (extra models loaded: every modality's topics) and of the broker answering
    it, in percent of one core; first with no Worker attached (what the broker costs alone)."""
    seconds = ctx.plan.idle_seconds
    pids = {"worker": host.child.pid}
    if ctx.broker_pid is not None:
        pids["broker (tansu)"] = ctx.broker_pid

    async def percent_of_a_core() -> dict[str, float]:
        async with watched(pids, None) as seen:
            await asyncio.sleep(seconds)
        return {name: round(100 * cpu / seconds, 2) for name, cpu in seen["cpu_s"].items()}

    ctx.say("idle cost")
    await asyncio.sleep(IDLE_SETTLE_S)  # ONNX Runtime's threads stop spinning after the stage costs
    found: dict[str, Any] = {"seconds": seconds, "no Worker attached": await percent_of_a_core()}
    for point in IDLE_POINTS:
        topic = await host.serve(ctx, point)
        await asyncio.sleep(IDLE_SETTLE_S)  # joined; a whole empty fetch round switches to the idle wait
        found[point.label] = await percent_of_a_core()
        await host.stop(topic)
    return found


#: After a Worker joins, before its idle cost is read (more than one default fetch_timeout_ms).
IDLE_SETTLE_S = 3.0


def best_of(passes: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The faster raw pass of a round (its rate and CPU), and every pass."""
    label = max(passes, key=lambda k: passes[k]["sentences_per_s"])
    return passes[label] | {"best": label, "passes": passes}


@dataclass
class Naive:
    """A naive consumer: its runs each alone, with a fresh broker and a fresh process."""

    ctx: Context
    backend: str
    inputs: Inputs
    python: str | None
    note: str

    @classmethod
    def of(cls, ctx: Context, backend: str, inputs: Inputs) -> Naive:
        """The ONNX consumer in this interpreter; the PyTorch one where torch imports (else skipped)."""
        python, note = (
            torch_python() if backend == "torch" else (sys.executable, "subprocess, this interpreter")
        )
        return cls(ctx, backend, inputs, python, note)

    @property
    def name(self) -> str:
        return f"naive {self.backend}"

    async def run(self, texts: Sequence[str], rate: float | None = None) -> dict[str, Any]:
        """One run of ``texts``: flooded, or ``rate`` per second."""
        assert self.python is not None
        async with alone(self.ctx) as client, contextlib.AsyncExitStack() as stack:
            pid, topic = await start_naive(self.ctx, client, self.backend, self.inputs, stack, self.python)
            limit = None if rate is None else self.ctx.plan.load_seconds + 120
            return await measured(
                self.ctx, self.name, pid, client.run(topic, texts, rate=rate, limit_s=limit)
            )

    async def saturation(self) -> dict[str, Any]:
        """One flooded run on the mix (a spaced sample of it in a quick plan); skipped without torch."""
        if self.python is None:
            self.ctx.tick()
            return {"skipped": self.note}
        plan = self.ctx.plan
        return await self.run(spaced_sample(self.inputs.mix, plan.naive_sentences or len(self.inputs.mix)))

    async def summary(self, runs: Sequence[dict[str, Any]], worker_capacity: float) -> dict[str, Any]:
        """The rounds' runs; the ONNX consumer also paced, at the worker's offered rates it can keep up with."""
        if self.python is None:
            return {"skipped": self.note}
        found: dict[str, Any] = {"process": self.note, "saturation_mix": list(runs)}
        if self.backend == "onnx":
            capacity = float(np.median([r["throughput_per_s"] for r in runs]))
            fractions = tuple(f for f in self.ctx.plan.loads if f * worker_capacity <= capacity)
            found["latency_vs_load"] = await latency_sweep(
                self.ctx, self.name, self.inputs, worker_capacity, self.run, fractions
            )
        return found


async def latency_sweep(
    ctx: Context,
    name: str,
    inputs: Inputs,
    capacity: float,
    one_run: Callable[[Sequence[str], float], Awaitable[dict[str, Any]]],
    fractions: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """Paced runs at fractions of the worker's measured capacity, each with a fresh broker; the 50%
    point is repeated."""
    runs = []
    for fraction in ctx.plan.loads if fractions is None else fractions:
        rate = max(1.0, fraction * capacity)
        for _ in range(ctx.plan.repeats if fraction == 0.5 else 1):
            ctx.say(f"{name}: paced at {fraction:.0%} ({rate:.0f}/s)")
            runs.append(
                {"fraction": fraction} | await one_run(cycled(inputs.mix, rate, ctx.plan.load_seconds), rate)
            )
    return runs
