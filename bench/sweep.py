"""The settings sweep: each point served alone, measured at saturation and at half that rate."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.corpus import cycled, spaced_sample
from bench.hosts import Host, served
from bench.plan import Context, Inputs, SweepPoint
from bench.procstats import rss_mib
from bench.stats import Spread


def p99_bound(paced: Sequence[Mapping[str, Any]], max_wait_ms: float) -> float | None:
    """The latency target: max_wait_ms + 2 x the median batch inference time seen at that load."""
    batch_ms = [run["batch_inference_ms"]["p50"] for run in paced if "batch_inference_ms" in run]
    return round(max_wait_ms + 2 * float(np.median(batch_ms)), 1) if batch_ms else None


@dataclass
class SweepEntry:
    """One sweep point being measured: its runs so far."""

    point: SweepPoint
    buckets: int
    saturation: list[dict[str, Any]] = field(default_factory=list)
    half_load: list[dict[str, Any]] = field(default_factory=list)
    host_rss_mib: float = 0.0

    def row(self) -> dict[str, Any]:
        """The point's line in bench.json."""
        p99 = [run["latency_ms"].get("p99", float("inf")) for run in self.half_load]
        return {
            "label": self.point.label,
            "settings": dict(self.point.settings),
            "overrides": dict(self.point.overrides),
            "buckets": self.buckets,
            "host_rss_mib": self.host_rss_mib,
            "throughput_per_s": Spread.of(run["throughput_per_s"] for run in self.saturation).to_json(),
            "half_load_p99_ms": Spread.of(p99).to_json(),
            "p99_bound_ms": p99_bound(self.half_load, float(self.point.settings.get("max_wait_ms", 10.0))),
            "saturation": self.saturation,
            "half_load": self.half_load,
        }


#: How much better than the defaults (the first point) another point must measure to be chosen:
#: one figure moves 10-30% between runs on this machine, so a smaller edge is noise.
DEFAULTS_MARGIN = 0.10


def pick_best(sweep: Sequence[Mapping[str, Any]]) -> str:
    """The fastest point that meets the latency target at half load; if none does, of those within
    10% of the fastest, the one that answers soonest. The defaults (the first point) stay chosen
    unless the pick beats them by more than ``DEFAULTS_MARGIN`` on the figure that decided."""

    def meets(row: Mapping[str, Any]) -> bool:
        bound = row["p99_bound_ms"]
        return bound is not None and row["half_load_p99_ms"]["median"] <= bound

    def rate(row: Mapping[str, Any]) -> float:
        return float(row["throughput_per_s"]["median"])

    def p99(row: Mapping[str, Any]) -> float:
        return float(row["half_load_p99_ms"]["median"])

    defaults = sweep[0]
    meeting = [row for row in sweep if meets(row)]
    if meeting:
        best = max(meeting, key=rate)
        keep = meets(defaults) and rate(defaults) * (1 + DEFAULTS_MARGIN) >= rate(best)
    else:
        top = max(rate(row) for row in sweep)
        close = [row for row in sweep if rate(row) >= 0.9 * top]
        best = min(close, key=p99)
        keep = defaults in close and p99(defaults) <= p99(best) * (1 + DEFAULTS_MARGIN)
    return str((defaults if keep else best)["label"])


async def worker_sweep(ctx: Context, inputs: Inputs) -> list[dict[str, Any]]:
    """Each sweep point served and measured in turns (points sharing models share a process), each
    time with a fresh broker."""
    plan = ctx.plan
    texts = spaced_sample(inputs.mix, plan.sweep_sentences)
    entries: list[SweepEntry] = []
    async with contextlib.AsyncExitStack() as stack:
        hosts: dict[str, Host] = {}
        for point in plan.sweep:
            if point.engine_key not in hosts:
                hosts[point.engine_key] = await Host.start(ctx, point, with_extras=False)
                stack.push_async_callback(hosts[point.engine_key].child.close)
            entries.append(SweepEntry(point, hosts[point.engine_key].buckets[ctx.model_name]))
        # One Worker at a time: the others' idle consumers would poll the broker beside it.
        for _ in range(plan.sweep_repeats):
            for entry in entries:
                host = hosts[entry.point.engine_key]
                ctx.say(f"sweep: {entry.point.label}")
                async with served(ctx, host, entry.point, inputs) as (client, topic):
                    entry.host_rss_mib = max(entry.host_rss_mib, round(rss_mib(host.child.pid), 1))
                    saturation = (await client.run(topic, texts)).summary()
                    rate = max(1.0, saturation["throughput_per_s"] / 2)
                    paced = cycled(texts, rate, plan.sweep_paced_s)
                    half = await client.run(topic, paced, rate=rate, limit_s=plan.sweep_paced_s + 120)
                entry.saturation.append(saturation)
                entry.half_load.append(half.summary())
                ctx.tick()
    return [entry.row() for entry in entries]
