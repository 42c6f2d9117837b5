"""bench.json judged and shown: ratios and targets, the table printed at the end, the plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.raw import in_flight_label
from bench.stats import Spread, median_of
from bench.sweep import p99_bound


def cpu_ms_per_request(runs: Sequence[Mapping[str, Any]], name: str) -> Spread:
    """CPU milliseconds of process ``name`` per answered request, over runs (from /proc)."""
    return Spread.of(1000 * run["cpu_s"][name] / max(run["answered"], 1) for run in runs)


def idle_percent(idle: Mapping[str, Any], label: str = "defaults") -> float | None:
    """An idle Worker's CPU plus the broker's beyond its own idle cost, percent of one core."""
    if label not in idle:
        return None
    with_worker, alone = idle[label], idle["no Worker attached"]
    broker = "broker (tansu)"
    caused = max(0.0, float(with_worker.get(broker, 0.0)) - float(alone.get(broker, 0.0)))
    return round(float(with_worker["worker"]) + caused, 2)


def p99_by_load(runs: Sequence[Mapping[str, Any]]) -> dict[float, float]:
    """Median p99 per offered-load fraction."""
    by_load: dict[float, list[Mapping[str, Any]]] = {}
    for run in runs:
        by_load.setdefault(run["fraction"], []).append(run)
    return {f: median_of(rs, "latency_ms", "p99").median for f, rs in sorted(by_load.items())}


#: The paced capacity: the highest offered rate held with p99 under this...
PACED_P99_LIMIT_MS = 250.0
#: ...and at least this fraction of it achieved.
PACED_ACHIEVED_FRACTION = 0.98
#: Profiled runs of the worker: (key in bench.json, offered load as a fraction of flooded or None, label).
PROFILES = (
    ("profile", None, "saturated"),
    ("profile_half_load", 0.5, "at half load"),
    ("profile_75_load", 0.75, "at 75% load"),
)


def paced_capacity(runs: Sequence[Mapping[str, Any]]) -> float:
    """The highest offered rate among paced ``runs`` held with p99 <= PACED_P99_LIMIT_MS and at least
    PACED_ACHIEVED_FRACTION of it achieved (0 when none was)."""
    held = [
        float(run["offered_per_s"])
        for run in runs
        if run["latency_ms"].get("p99", float("inf")) <= PACED_P99_LIMIT_MS
        and run["throughput_per_s"] >= PACED_ACHIEVED_FRACTION * run["offered_per_s"]
    ]
    return max(held, default=0.0)


def _target(name: str, measured: float | None, limit: float | None, at_most: bool = False) -> dict[str, Any]:
    met = None
    if measured is not None and limit is not None:
        met = measured <= limit if at_most else measured >= limit
    return {"target": name, "measured": measured, "limit": limit, "met": met}


def within_rounds(numerators: Sequence[float], denominators: Sequence[float]) -> Spread:
    """Ratios of two contenders taken round by round (each pair timed within a minute or so)."""
    return Spread.of(n / d for n, d in zip(numerators, denominators, strict=True))


def assess(result: dict[str, Any]) -> None:
    """Ratios and the issue's targets, from the measurements already in ``result``: the head-to-head
    ratios are medians of ratios taken within each round (``ratios_by_round`` keeps every one)."""
    worker = result["worker"]
    raw = result["raw_ort"]
    rounds = result["head_to_head"]["raw_ort"]
    raw_rates = [r["sentences_per_s"] for r in rounds]
    rates = [r["throughput_per_s"] for r in worker["saturation_mix"]]
    fixed = median_of(worker["saturation_fixed_128"], "throughput_per_s")
    by_round = {"worker/raw_ort_best": within_rounds(rates, raw_rates)}
    # Also against the issue's own reference alone: one batch at a time on a default session.
    one_at_a_time = (
        [r["passes"][in_flight_label(1)]["sentences_per_s"] for r in rounds]
        if all("passes" in r for r in rounds)
        else None
    )
    if one_at_a_time:
        by_round["worker/raw_ort_one_batch_at_a_time"] = within_rounds(rates, one_at_a_time)
    for name in ("naive_torch", "naive_onnx"):
        runs = result[name].get("saturation_mix")
        if runs:
            naive = [r["throughput_per_s"] for r in runs]
            by_round[f"worker/{name}"] = within_rounds(rates, naive)
            by_round[f"{name}/raw_ort_best"] = within_rounds(naive, raw_rates)
            if one_at_a_time:
                by_round[f"{name}/raw_ort_one_batch_at_a_time"] = within_rounds(naive, one_at_a_time)
    by_round["worker_cpu_per_request/raw_ort_cpu_per_sentence"] = within_rounds(
        cpu_ms_per_request(worker["saturation_mix"], "worker").values,
        [r["cpu_ms_per_sentence"] for r in rounds],
    )
    ratios: dict[str, Any] = {name: round(spread.median, 2) for name, spread in by_round.items()}
    result["ratios_by_round"] = {
        name: [round(v, 2) for v in spread.values] for name, spread in by_round.items()
    }
    # From the raw stage at the start (not in rounds): the 128-token and fused-graph comparisons.
    throughput = median_of(worker["saturation_mix"], "throughput_per_s")
    ratios["worker_128/raw_ort_padded_128_best"] = round(
        fixed.median / raw["padded_128"]["best"]["sentences_per_s"]["median"], 2
    )
    fused = raw["session_options"]["length_sorted"].get("fused graph (transformer optimizer)")
    if fused:
        ratios["worker/raw_ort_fused_graph"] = round(throughput.median / fused["median"], 2)
    paced = worker["latency_vs_load"]
    ratios["worker_paced_capacity/flood"] = round(paced_capacity(paced) / throughput.median, 2)
    half = [r for r in paced if r["fraction"] == 0.5]
    p99 = median_of(half, "latency_ms", "p99").median if half else None
    flooded_cpu = cpu_ms_per_request(worker["saturation_mix"], "worker").median
    half_cpu = cpu_ms_per_request(half, "worker").median if half else None
    if half_cpu is not None:
        ratios["worker_cpu_per_request_at_half_load/flooded"] = round(half_cpu / flooded_cpu, 2)
    bound = p99_bound(half, float(worker["settings"].get("max_wait_ms", 10.0)))
    worse = None
    naive_paced = result["naive_onnx"].get("latency_vs_load")
    if naive_paced:
        ours, theirs = p99_by_load(worker["latency_vs_load"]), p99_by_load(naive_paced)
        worse = max(round(ours[f] / theirs[f], 2) for f in theirs if f in ours)
        ratios["worst worker p99 / naive ONNX p99 at one offered load"] = worse
    idle = idle_percent(worker["idle"]) if "idle" in worker else None
    targets = [
        _target("naive ONNX >= 0.45 x raw ORT best", ratios.get("naive_onnx/raw_ort_best"), 0.45),
        _target("naive PyTorch >= 0.24 x raw ORT best", ratios.get("naive_torch/raw_ort_best"), 0.24),
        _target("worker >= 0.85 x raw ORT best", ratios["worker/raw_ort_best"], 0.85),
        _target(
            "worker CPU per request <= 1.2 x raw ORT CPU per sentence (best batch)",
            ratios.get("worker_cpu_per_request/raw_ort_cpu_per_sentence"),
            1.2,
            at_most=True,
        ),
        _target("worker >= 1.8 x naive ONNX", ratios.get("worker/naive_onnx"), 1.8),
        _target(
            "p99 at 50% load <= max_wait_ms + 2 x batch inference (median at that load)",
            p99,
            bound,
            at_most=True,
        ),
        _target(
            f"paced capacity (p99 <= {PACED_P99_LIMIT_MS:.0f} ms, >= {PACED_ACHIEVED_FRACTION:.0%} achieved) "
            ">= 0.85 x the flood rate",
            ratios["worker_paced_capacity/flood"],
            0.85,
        ),
        _target("p99 at 50% load <= 80 ms", p99, 80.0, at_most=True),
        _target(
            "worker CPU per request at 50% load <= 1.3 x flooded",
            ratios.get("worker_cpu_per_request_at_half_load/flooded"),
            1.3,
            at_most=True,
        ),
        _target("worker p99 <= naive ONNX p99 at every offered load both ran", worse, 1.0, at_most=True),
        _target("idle worker + the broker CPU it causes <= 2% of one core", idle, 2.0, at_most=True),
        _target(
            "worker RSS <= 1 GiB (peak under saturation, extra models loaded)",
            worker["rss_peak_mib"],
            1024,
            at_most=True,
        ),
    ]
    result["ratios"] = ratios
    result["targets"] = targets


def _row(name: str, inputs: str, setting: str, runs: Sequence[Mapping[str, Any]] | Spread) -> list[str]:
    if isinstance(runs, Spread):
        return [name, inputs, setting, str(runs), "-", "-"]
    throughput = median_of(runs, "throughput_per_s")
    p50 = median_of(runs, "latency_ms", "p50").median
    p99 = median_of(runs, "latency_ms", "p99").median
    return [name, inputs, setting, str(throughput), f"{p50:.0f}", f"{p99:.0f}"]


def _paced_rows(label: str, runs: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    return [
        [
            label,
            "mix",
            f"{run['fraction']:.0%} = {run['offered_per_s']}/s",
            f"{run['throughput_per_s']:.0f}",
            f"{run['latency_ms'].get('p50', 0):.0f}",
            f"{run['latency_ms'].get('p99', 0):.0f}",
        ]
        for run in runs
    ]


def render_table(result: Mapping[str, Any]) -> str:
    """The human summary printed at the end of a run."""
    raw, worker = result["raw_ort"], result["worker"]
    rows = [["system", "inputs", "setting", "sent/s median [min-max]", "p50 ms", "p99 ms"]]
    for key, label in (("length_sorted", "mix, length-sorted"), ("padded_128", "mix padded to 128")):
        for size, spread in raw[key]["by_batch_size"].items():
            rows.append(_row("raw ORT", label, f"batch {size}", Spread.from_json(spread)))
        options = dict(raw["session_options"][key])
        size = options.pop("batch_size")
        for variant, spread in options.items():
            rows.append(_row("raw ORT", label, f"batch {size}, {variant}"[:40], Spread.from_json(spread)))
    h2h = result["head_to_head"]
    in_rounds = Spread.of(r["sentences_per_s"] for r in h2h["raw_ort"])
    rows.append(
        _row(
            "raw ORT",
            "mix, length-sorted",
            f"batch {h2h['raw_ort_batch_size']}, +tokenize +pool, rounds",
            in_rounds,
        )
    )
    mbs = worker["settings"].get("max_batch_size", 32)
    for key, label in (("stage_costs", "mix"), ("stage_costs_128_tokens", "128 tokens")):
        speed = f"{worker[key]['engine_sentences_per_s']:.0f}"
        rows.append(["worker engine", label, f"no Kafka, <= {mbs} rows, as the worker runs", speed, "-", "-"])
    rows.append(_row("worker e2e", "mix", worker["label"][:40], worker["saturation_mix"]))
    rows.append(_row("worker e2e", "128 tokens", worker["label"][:40], worker["saturation_fixed_128"]))
    for label, runs in (("worker paced", worker["latency_vs_load"]),):
        rows += _paced_rows(label, runs)
    for key, label in (("naive_onnx", "naive ONNX"), ("naive_torch", "naive PyTorch")):
        if "saturation_mix" in result[key]:
            rows.append(_row(label, "mix", "1 message at a time", result[key]["saturation_mix"]))
            rows += _paced_rows(f"{label} paced", result[key].get("latency_vs_load", []))
        else:
            rows.append([label, "-", result[key]["skipped"], "-", "-", "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    tokens = result["inputs"]["mix"]["tokens"]
    lines += [
        "",
        f"inputs: {result['inputs']['mix']['sentences']} sentences, tokens p10/p50/p90/max = "
        f"{tokens['p10']:.0f}/{tokens['p50']:.0f}/{tokens['p90']:.0f}/{tokens['max']:.0f}; "
        f"{result['inputs']['fixed_128']['texts']} texts of 128 tokens",
        f"worker RSS: idle {worker['rss_idle_mib']:.0f} MiB, peak under saturation {worker['rss_peak_mib']:.0f} MiB "
        f"({worker['ort_sessions']} ORT sessions, one per model; {worker['buckets']['total']} buckets)",
        "CPU ms per request at saturation (mix), each process: "
        + "; ".join(
            f"{label}: "
            + ", ".join(
                f"{name} {cpu_ms_per_request(result[key]['saturation_mix'], name).median:.2f}"
                for name in result[key]["saturation_mix"][0].get("cpu_s", {})
            )
            for key, label in (
                ("worker", "worker"),
                ("naive_onnx", "naive ONNX"),
                ("naive_torch", "naive PyTorch"),
            )
            if "saturation_mix" in result[key]
        ),
        f"raw ORT CPU ms per sentence (this process, all threads), best batch, in rounds: "
        f"{Spread.of(r['cpu_ms_per_sentence'] for r in h2h['raw_ort']).median:.2f}",
        "head-to-head in rounds ("
        + h2h["order"]
        + "); ratios within each round: "
        + "; ".join(f"{k} {v}" for k, v in result["ratios_by_round"].items()),
        *(
            [
                f"idle CPU, % of one core over {worker['idle']['seconds']:.0f} s: "
                + "; ".join(
                    f"{label}: " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
                    for label, cpu in worker["idle"].items()
                    if label != "seconds"
                )
            ]
            if "idle" in worker
            else []
        ),
        "ratios: " + ", ".join(f"{k} {v}" for k, v in result["ratios"].items()),
        f"worker settings tried ({result['meta']['model']} alone; saturation sent/s, then p99 at half that "
        "rate against its bound; medians):",
        *(
            f"  {r['throughput_per_s']['median']:>6.0f}/s  p99 {r['half_load_p99_ms']['median']:>6.0f} ms "
            f"(bound {r['p99_bound_ms']}), {r['buckets']} buckets  {r['label']}"
            for r in result["sweep"]
        ),
        f"  chosen: {worker['label']}",
        *(_profile_line(label, worker[key]) for key, _, label in PROFILES if key in worker if key in worker),
        "targets:",
    ]
    for target in result["targets"]:
        verdict = {True: "met", False: "MISSED", None: "n/a"}[target["met"]]
        lines.append(f"  {verdict:<6} {target['target']}: {target['measured']} (limit {target['limit']})")
    return "\n".join(lines)


def _profile_line(label: str, profile: Mapping[str, Any]) -> str:
    """A profiled run: the CPU per request of each thread group and process, and the busy time's shares."""
    run = profile["run"]
    answered = max(run["answered"], 1)
    threads = ", ".join(f"{k} {1000 * v / answered:.2f}" for k, v in profile["cpu_s_by_thread_group"].items())
    processes = ", ".join(f"{k} {1000 * v / answered:.2f}" for k, v in run.get("cpu_s", {}).items())
    shares = ", ".join(f"{k} {v}%" for k, v in profile["busy_share_by_category_pct"].items())
    return (
        f"profiled run, {label} ({run['throughput_per_s']:.0f}/s, batch mean "
        f"{run.get('batch_size', {}).get('mean', '-')}): CPU ms per request by worker thread group: {threads}; "
        f"by process: {processes}; the worker's busy time: {shares}"
    )


def plot(result: Mapping[str, Any], path: Path) -> bool:
    """Throughput vs batch size (raw ORT) and latency vs offered load (worker); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    raw = result["raw_ort"]
    for key, label in (("length_sorted", "raw ORT, length-sorted"), ("padded_128", "raw ORT, padded to 128")):
        sizes = [int(b) for b in raw[key]["by_batch_size"]]
        spreads = [Spread.from_json(s) for s in raw[key]["by_batch_size"].values()]
        medians = [s.median for s in spreads]
        errors = [[s.median - s.low for s in spreads], [s.high - s.median for s in spreads]]
        left.errorbar(sizes, medians, yerr=errors, marker="o", capsize=3, label=label)
    worker = result["worker"]
    lines = [("worker e2e (mix)", median_of(worker["saturation_mix"], "throughput_per_s").median, "k")]
    for key, label, colour in (
        ("naive_onnx", "naive ONNX", "tab:red"),
        ("naive_torch", "naive PyTorch", "tab:purple"),
    ):
        if "saturation_mix" in result[key]:
            lines.append((label, median_of(result[key]["saturation_mix"], "throughput_per_s").median, colour))
    for label, value, colour in lines:
        left.axhline(value, linestyle="--", color=colour, label=f"{label}: {value:.0f}/s")
    left.set_xscale("log", base=2)
    sizes = [int(b) for b in raw["length_sorted"]["by_batch_size"]]
    left.set_xticks(sizes, [str(size) for size in sizes])
    left.set_xlabel("batch size")
    left.set_ylabel("sentences / s")
    left.set_title("throughput (median, min-max bars)")
    left.legend(fontsize=8)
    curves: list[tuple[str, Any, tuple[str, ...], str]] = [
        ("worker", worker["latency_vs_load"], ("p50", "p90", "p99"), "-")
    ]
    curves.append(("naive ONNX", result["naive_onnx"].get("latency_vs_load", []), ("p50", "p99"), ":"))
    loads, offered = [], []
    for name, runs, keys, style in curves:
        by_load: dict[float, list[Mapping[str, Any]]] = {}
        for run in runs:
            by_load.setdefault(run["fraction"], []).append(run)
        at = sorted(by_load)
        rates = [float(np.median([r["offered_per_s"] for r in by_load[f]])) for f in at]
        if name == "worker":
            loads, offered = at, rates
        for key in keys:
            spreads = [median_of(by_load[f], "latency_ms", key) for f in at]
            errors = [[s.median - s.low for s in spreads], [s.high - s.median for s in spreads]]
            right.errorbar(
                rates,
                [s.median for s in spreads],
                yerr=errors,
                marker="o",
                capsize=3,
                linestyle=style,
                label=f"{name} {key}",
            )
    flood = median_of(worker["saturation_mix"], "throughput_per_s").median
    right.axvline(flood, linestyle="--", color="k", label=f"worker flood throughput {flood:.0f}/s")
    for target in result["targets"]:
        if target["target"].startswith("p99 at 50%") and target["limit"] is not None and 0.5 in loads:
            half = offered[loads.index(0.5)]  # the worker's 50% point
            right.scatter(
                [half], [target["limit"]], marker="x", s=80, color="k", label="p99 target at 50% load"
            )
    right.set_xlabel("offered load (requests / s)")
    right.set_ylabel("latency, ms (send to reply)")
    right.set_yscale("log")
    right.set_title("latency vs offered load (10% to 100% of the worker's flood rate)")
    right.legend(fontsize=8)
    figure.suptitle(f"{result['meta']['model']} on {result['meta']['cpus']} CPUs")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
