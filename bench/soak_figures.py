"""The soak's figures and its report: latencies, RSS windows, chaos effects; soak.json and RESULTS.md."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bench.plan import ROOT
from bench.soak_fleet import WORKER_FLAGS, Fleet, Member
from bench.soak_stream import Kind, Ledger
from bench.stats import percentiles

RSS_WINDOW_S = 15.0


class MeasuredRun(Protocol):
    """What the figures read of a soak or chaos run (bench/soak.py's ``Run``)."""

    args: argparse.Namespace
    kinds: list[Kind]
    ledger: Ledger
    events: list[dict[str, Any]]
    marks: dict[str, float]

    def since_start(self, wall: float) -> float:
        """A wall-clock time as seconds since the run began."""

    def injected(self) -> Counter[str]:
        """Malformed requests sent, by the error code each must get."""


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
    r: MeasuredRun, fleet: Fleet, metrics: dict[str, Any], committed: dict[str, Any], wall_s: float
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


def chaos_figures(r: MeasuredRun) -> dict[str, Any]:
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
