"""The main measurement: the chosen worker configuration head to head with the naive consumers."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import numpy as np

from bench.corpus import cycled, spaced_sample
from bench.hosts import Child, Host, alone, served, unique_name, warm_up
from bench.load import LoadClient, Run
from bench.plan import EXPORT_PYTHON, Context, Inputs, SweepPoint
from bench.procstats import peak_rss_mib, rss_mib, watched


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
    from worker.topics import create_topics

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


async def measure_main(ctx: Context, point: SweepPoint, inputs: Inputs) -> dict[str, dict[str, Any]]:
    """The chosen configuration, then each naive consumer: every one alone with a fresh broker.

    Nothing else is attached to the broker while a contender is measured (an idle consumer polls
    it, and the broker's answers cost CPU on the same cores), so the contenders run one after the
    other rather than in turns; and every measured run gets a fresh broker (tansu keeps every
    record in memory, and its CPU per request grew run by run: 0.49, 0.83, 1.33 ms).
    """
    found: dict[str, dict[str, Any]] = {"worker": await measure_worker(ctx, point, inputs)}
    capacity = float(np.median([r["throughput_per_s"] for r in found["worker"]["saturation_mix"]]))
    for backend in ("onnx", "torch"):
        found[f"naive_{backend}"] = await measure_naive(ctx, backend, inputs, capacity)
    return found


async def measure_worker(ctx: Context, point: SweepPoint, inputs: Inputs) -> dict[str, Any]:
    """The chosen configuration with the extra models loaded: idle cost, saturation on the mix and on
    128-token inputs, latency against offered load, profiles at saturation and at half load, RSS."""
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
        for _ in range(plan.repeats):
            ctx.say("saturation: worker")
            runs.append(await one_run(inputs.mix))
        worker["saturation_mix"] = runs
        hwm["saturation, mix"] = peak_rss_mib(pid)
        ctx.say("worker: 128-token texts")
        worker["saturation_fixed_128"] = [await one_run(inputs.fixed) for _ in range(plan.repeats)]
        hwm["saturation, 128 tokens"] = peak_rss_mib(pid)
        capacity = float(np.median([r["throughput_per_s"] for r in worker["saturation_mix"]]))
        worker["latency_vs_load"] = await latency_sweep(ctx, "worker", inputs, capacity, one_run)
        hwm["paced runs"] = peak_rss_mib(pid)
        for label, rate in (("profile", None), ("profile_half_load", capacity / 2)):
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
        profiled_runs = [worker["profile"]["run"], worker["profile_half_load"]["run"]]
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


async def measure_naive(ctx: Context, backend: str, inputs: Inputs, worker_capacity: float) -> dict[str, Any]:
    """A naive consumer, each run alone with a fresh broker and a fresh process: saturation on the mix;
    the ONNX one also paced, at the worker's offered rates that it can keep up with."""
    plan = ctx.plan
    python, note = torch_python() if backend == "torch" else (sys.executable, "subprocess, this interpreter")
    if python is None:
        ctx.tick(plan.repeats)
        return {"skipped": note}
    name = f"naive {backend}"

    async def one_run(texts: Sequence[str], rate: float | None = None) -> dict[str, Any]:
        async with alone(ctx) as client, contextlib.AsyncExitStack() as stack:
            pid, topic = await start_naive(ctx, client, backend, inputs, stack, python)
            limit = None if rate is None else plan.load_seconds + 120
            return await measured(ctx, name, pid, client.run(topic, texts, rate=rate, limit_s=limit))

    saturation = spaced_sample(inputs.mix, plan.naive_sentences or len(inputs.mix))
    runs = []
    for _ in range(plan.repeats):
        ctx.say(f"saturation: {name}")
        runs.append(await one_run(saturation))
    found: dict[str, Any] = {"process": note, "saturation_mix": runs}
    if backend == "onnx":
        capacity = float(np.median([r["throughput_per_s"] for r in runs]))
        fractions = tuple(f for f in plan.loads if f * worker_capacity <= capacity)
        found["latency_vs_load"] = await latency_sweep(ctx, name, inputs, worker_capacity, one_run, fractions)
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
