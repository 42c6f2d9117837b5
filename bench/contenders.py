"""The main measurement: the chosen worker configuration head to head with the naive consumers."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.corpus import spaced_sample
from bench.hosts import Child, Host, unique_name, warm_up
from bench.load import LoadClient, Run
from bench.plan import EXPORT_PYTHON, Context, Inputs, SweepPoint
from bench.procstats import peak_rss_mib, rss_mib, watched


@dataclass
class Contender:
    """A system measured head to head with the others: where to send, what, and its runs."""

    name: str
    pid: int
    topic: str
    texts: Sequence[str]
    note: str = ""
    runs: list[dict[str, Any]] = field(default_factory=list)


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
    ctx: Context, client: LoadClient, backend: str, inputs: Inputs, stack: contextlib.AsyncExitStack
) -> Contender | str:
    """A naive consumer (torch or onnx) in its own process, warmed up; or why it was skipped."""
    from worker.topics import create_topics

    python, note = torch_python() if backend == "torch" else (sys.executable, "subprocess, this interpreter")
    if python is None:
        return note
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
    texts = spaced_sample(inputs.mix, ctx.plan.naive_sentences)
    return Contender(f"naive {backend}", child.pid, topic, texts, note)


async def measured(ctx: Context, name: str, pid: int, run: Coroutine[Any, Any, Run]) -> dict[str, Any]:
    """One run's summary, the CPU of every process involved, and the peak RSS of ``pid``."""
    pids = {name: pid, "load generator (bench)": os.getpid()}
    if ctx.broker_pid is not None:
        pids["broker (tansu)"] = ctx.broker_pid
    async with watched(pids, pid) as seen:
        done = await run
    ctx.tick()
    return done.summary() | seen


async def measure_main(
    ctx: Context, client: LoadClient, point: SweepPoint, inputs: Inputs
) -> dict[str, dict[str, Any]]:
    """The chosen configuration with the extra models loaded, head to head with the naive consumers,
    then alone: 128-token inputs, latency against offered load, a profile, RSS throughout."""
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
        ctx.say("stage costs")
        command = {
            "cmd": "stages",
            "model": ctx.model_name,
            "texts": spaced_sample(inputs.mix, min(len(inputs.mix), 512)),
            "max_batch_size": int(point.settings.get("max_batch_size", 32)),
        }
        worker["stage_costs"] = (await host.child.ask(command, "stages"))["stages"]
        # The same shapes as raw ORT padded to 128 at batch 32: what the engine alone costs on top.
        command["texts"] = inputs.fixed
        worker["stage_costs_128_tokens"] = (await host.child.ask(command, "stages"))["stages"]
        hwm["stage costs"] = peak_rss_mib(pid)
        ctx.tick()
        topic = await host.serve(ctx, point)
        await warm_up(client, topic, ctx, inputs)
        await asyncio.sleep(1.0)
        worker["rss_idle_mib"] = round(rss_mib(pid), 1)
        contenders = [Contender("worker", pid, topic, inputs.mix)]
        skipped: dict[str, str] = {}
        async with contextlib.AsyncExitStack() as naive_processes:
            for backend in ("onnx", "torch"):
                started = await start_naive(ctx, client, backend, inputs, naive_processes)
                if isinstance(started, Contender):
                    contenders.append(started)
                else:
                    skipped[backend] = started
            # Repetitions take turns, so that a change in the machine's load touches every contender.
            for _ in range(plan.repeats):
                for contender in contenders:
                    ctx.say(f"saturation: {contender.name}")
                    run = client.run(contender.topic, contender.texts)
                    contender.runs.append(await measured(ctx, contender.name, contender.pid, run))
                ctx.tick(len(skipped))
        worker["saturation_mix"] = contenders[0].runs
        hwm["saturation, mix"] = peak_rss_mib(pid)
        ctx.say("worker: 128-token texts")
        worker["saturation_fixed_128"] = [
            await measured(ctx, "worker", pid, client.run(topic, inputs.fixed)) for _ in range(plan.repeats)
        ]
        hwm["saturation, 128 tokens"] = peak_rss_mib(pid)
        capacity = float(np.median([r["throughput_per_s"] for r in worker["saturation_mix"]]))
        worker["latency_vs_load"] = await latency_sweep(ctx, client, topic, pid, inputs, capacity)
        hwm["paced runs"] = peak_rss_mib(pid)
        ctx.say("worker: profiled saturation run")
        await host.child.ask({"cmd": "profile_start"}, "profiling")
        profiled = await measured(ctx, "worker", pid, client.run(topic, inputs.mix))
        worker["profile"] = (await host.child.ask({"cmd": "profile_stop"}, "profile"))["profile"]
        worker["profile"]["run"] = profiled
        hwm["profiled run"] = peak_rss_mib(pid)
        watched_runs = worker["saturation_mix"] + worker["saturation_fixed_128"] + worker["latency_vs_load"]
        worker["rss_peak_mib"] = round(max(r["peak_rss_mib"] for r in [*watched_runs, profiled]), 1)
        worker["vm_hwm_mib_after"] = {phase: round(mib, 1) for phase, mib in hwm.items()}
    found = {"worker": worker}
    for contender in contenders[1:]:
        found[contender.name.replace(" ", "_")] = {
            "process": contender.note,
            "saturation_mix": contender.runs,
        }
    for backend, note in skipped.items():
        found[f"naive_{backend}"] = {"skipped": note}
    return found


async def latency_sweep(
    ctx: Context, client: LoadClient, topic: str, pid: int, inputs: Inputs, capacity: float
) -> list[dict[str, Any]]:
    """Paced runs at fractions of the measured capacity; the 50% point is repeated."""
    runs = []
    for fraction in ctx.plan.loads:
        rate = max(1.0, fraction * capacity)
        count = max(20, int(rate * ctx.plan.load_seconds))
        texts = [inputs.mix[i % len(inputs.mix)] for i in range(count)]
        for _ in range(ctx.plan.repeats if fraction == 0.5 else 1):
            ctx.say(f"worker: paced at {fraction:.0%} ({rate:.0f}/s)")
            run = client.run(topic, texts, rate=rate, limit_s=ctx.plan.load_seconds + 120)
            runs.append({"fraction": fraction} | await measured(ctx, "worker", pid, run))
    return runs
