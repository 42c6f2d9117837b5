"""``python -m bench.paced``: the worker flooded, then paced at fractions of its flood rate, in one run.

Reports the paced capacity (``bench.report.paced_capacity``: the highest offered rate held with p99
under 250 ms and at least 98% of it achieved), CPU per request at each rate against flooded, the
latency curve, and where the CPU goes (a sampling profile) flooded and at the profiled fractions.
Each run gets a fresh embedded broker, as in the main bench (``bench.contenders``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.contenders import measured
from bench.corpus import cycled
from bench.hosts import Host, served
from bench.plan import DEFAULT_MODEL, Context, Plan, SweepPoint
from bench.report import cpu_ms_per_request, paced_capacity
from bench.run import prepare_inputs

#: Offered load as fractions of the flood rate, and those also profiled.
LOADS = (0.25, 0.5, 0.75, 0.85, 0.9, 1.0)
PROFILED = (0.5, 0.75)


async def measure(
    ctx: Context, point: SweepPoint, loads: Sequence[float], profiled: Sequence[float]
) -> dict[str, Any]:
    """Flood, then each paced fraction (profiled ones sampled), one Worker at a time, fresh brokers."""
    from transformers import AutoTokenizer

    inputs, described = prepare_inputs(ctx, AutoTokenizer.from_pretrained(ctx.model_dir))
    host = await Host.start(ctx, point, with_extras=False)
    found: dict[str, Any] = {"inputs": described, "settings": dict(point.settings)}
    try:

        async def one_run(texts: Sequence[str], rate: float | None, profile: bool) -> dict[str, Any]:
            async with served(ctx, host, point, inputs) as (client, topic):
                await asyncio.sleep(1.0)
                if profile:
                    await host.child.ask({"cmd": "profile_start"}, "profiling")
                limit = None if rate is None else ctx.plan.load_seconds + 120
                run = await measured(
                    ctx, "worker", host.child.pid, client.run(topic, texts, rate=rate, limit_s=limit)
                )
                if profile:
                    run["profile"] = (await host.child.ask({"cmd": "profile_stop"}, "profile"))["profile"]
                return run

        flood = await one_run(inputs.mix, None, profile=True)
        rate = float(flood["throughput_per_s"])
        print(f"flood: {rate}/s, {summary_line(flood)}", flush=True)
        paced = []
        for fraction in loads:
            offered = fraction * rate
            run = await one_run(
                cycled(inputs.mix, offered, ctx.plan.load_seconds), offered, fraction in profiled
            )
            run["fraction"] = fraction
            print(f"{fraction:.0%} = {offered:.0f}/s: {summary_line(run)}", flush=True)
            paced.append(run)
    finally:
        await host.child.close()
    flood_cpu = cpu_ms_per_request([flood], "worker").median
    half = [run for run in paced if run["fraction"] == 0.5]
    found |= {
        "flood": flood,
        "paced": paced,
        "paced_capacity_per_s": (capacity := paced_capacity(paced)),
        "paced_capacity/flood": round(capacity / rate, 2),
        "cpu_at_half_over_flood": round(cpu_ms_per_request(half, "worker").median / flood_cpu, 2)
        if half
        else None,
    }
    return found


def summary_line(run: Mapping[str, Any]) -> str:
    """One run in a line: achieved rate, latency, batch size, CPU per request by process."""
    cpu = {name: round(1000 * s / max(run["answered"], 1), 2) for name, s in run["cpu_s"].items()}
    batch = run.get("batch_size", {}).get("mean")
    return (
        f"achieved {run['throughput_per_s']}/s p50/p99 {run['latency_ms'].get('p50')}/{run['latency_ms'].get('p99')} ms, "
        f"batch mean {batch}, CPU ms/request {cpu}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run and print; write ``<out>/paced.json``."""
    parser = argparse.ArgumentParser(prog="python -m bench.paced", description=__doc__)
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of each paced run")
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--loads", default=",".join(map(str, LOADS)))
    parser.add_argument("--profiled", default=",".join(map(str, PROFILED)))
    parser.add_argument("--settings", default="{}", help="Worker settings (JSON) on top of the defaults")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, force=True)
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    from worker.serving.metadata import load_metadata

    model_dir = Path(args.model).resolve()
    plan = Plan(sentences=args.sentences, load_seconds=args.seconds)
    ctx = Context(plan, model_dir, None, Path(args.out), model_name=load_metadata(model_dir).name)
    point = SweepPoint("defaults", json.loads(args.settings))
    loads = [float(x) for x in args.loads.split(",") if x]
    profiled = [float(x) for x in args.profiled.split(",") if x]
    found = asyncio.run(measure(ctx, point, loads, profiled))
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / "paced.json").write_text(json.dumps(found, indent=2) + "\n")
    print(
        json.dumps(
            {k: found[k] for k in ("paced_capacity_per_s", "paced_capacity/flood", "cpu_at_half_over_flood")}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
