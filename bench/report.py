"""bench.json judged and shown: ratios and targets, the table printed at the end, the plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.stats import Spread, median_of
from bench.sweep import p99_bound


def assess(result: dict[str, Any]) -> None:
    """Ratios and the issue's targets, from the measurements already in ``result``."""
    worker = result["worker"]
    raw = result["raw_ort"]
    throughput = median_of(worker["saturation_mix"], "throughput_per_s")
    fixed = median_of(worker["saturation_fixed_128"], "throughput_per_s")
    ratios: dict[str, Any] = {
        "worker/raw_ort_best": round(
            throughput.median / raw["length_sorted"]["best"]["sentences_per_s"]["median"], 2
        ),
        "worker_128/raw_ort_padded_128_best": round(
            fixed.median / raw["padded_128"]["best"]["sentences_per_s"]["median"], 2
        ),
    }
    fused = raw["session_options"]["length_sorted"].get("fused graph (transformer optimizer)")
    if fused:
        ratios["worker/raw_ort_fused_graph"] = round(throughput.median / fused["median"], 2)
    for name in ("naive_torch", "naive_onnx"):
        runs = result[name].get("saturation_mix")
        if runs:
            ratios[f"worker/{name}"] = round(
                throughput.median / median_of(runs, "throughput_per_s").median, 2
            )
    half = [r for r in worker["latency_vs_load"] if r["fraction"] == 0.5]
    p99 = median_of(half, "latency_ms", "p99").median if half else None
    bound = p99_bound(half, float(worker["settings"].get("max_wait_ms", 10.0)))
    targets = [
        {"target": "worker >= 0.9 x raw ORT best", "measured": ratios["worker/raw_ort_best"], "limit": 0.9},
        {"target": "worker >= 4 x naive PyTorch", "measured": ratios.get("worker/naive_torch"), "limit": 4.0},
        {"target": "worker >= 2 x naive ONNX", "measured": ratios.get("worker/naive_onnx"), "limit": 2.0},
    ]
    for target in targets:
        measured = target["measured"]
        target["met"] = None if measured is None else measured >= target["limit"]
    targets.append(
        {
            "target": "p99 at 50% load <= max_wait_ms + 2 x batch inference (median at that load)",
            "measured": p99,
            "limit": bound,
            "met": None if p99 is None or bound is None else p99 <= bound,
        }
    )
    targets.append(
        {
            "target": "worker RSS <= 1 GiB (peak under saturation, extra models loaded)",
            "measured": worker["rss_peak_mib"],
            "limit": 1024,
            "met": worker["rss_peak_mib"] <= 1024,
        }
    )
    result["ratios"] = ratios
    result["targets"] = targets


def _row(name: str, inputs: str, setting: str, runs: Sequence[Mapping[str, Any]] | Spread) -> list[str]:
    if isinstance(runs, Spread):
        return [name, inputs, setting, str(runs), "-", "-"]
    throughput = median_of(runs, "throughput_per_s")
    p50 = median_of(runs, "latency_ms", "p50").median
    p99 = median_of(runs, "latency_ms", "p99").median
    return [name, inputs, setting, str(throughput), f"{p50:.0f}", f"{p99:.0f}"]


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
    mbs = worker["settings"].get("max_batch_size", 32)
    for key, label in (("stage_costs", "mix"), ("stage_costs_128_tokens", "128 tokens")):
        speed = f"{worker[key]['engine_sentences_per_s']:.0f}"
        rows.append(["worker engine", label, f"no Kafka, batches of <= {mbs}", speed, "-", "-"])
    rows.append(_row("worker e2e", "mix", worker["label"][:40], worker["saturation_mix"]))
    rows.append(_row("worker e2e", "128 tokens", worker["label"][:40], worker["saturation_fixed_128"]))
    for run in worker["latency_vs_load"]:
        rows.append(
            [
                "worker paced",
                "mix",
                f"{run['fraction']:.0%} = {run['offered_per_s']}/s",
                f"{run['throughput_per_s']:.0f}",
                f"{run['latency_ms'].get('p50', 0):.0f}",
                f"{run['latency_ms'].get('p99', 0):.0f}",
            ]
        )
    for key, label in (("naive_onnx", "naive ONNX"), ("naive_torch", "naive PyTorch")):
        if "saturation_mix" in result[key]:
            rows.append(_row(label, "mix (sample)", "1 message at a time", result[key]["saturation_mix"]))
        else:
            rows.append([label, "-", result[key]["skipped"], "-", "-", "-"])
    requests = max(worker["saturation_mix"][0]["requests"], 1)
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
        "CPU ms per request at saturation (mix): "
        + ", ".join(
            f"{name} {1000 * median_of(worker['saturation_mix'], 'cpu_s', name).median / requests:.2f}"
            for name in worker["saturation_mix"][0].get("cpu_s", {})
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
        "where the worker's busy time went: "
        + ", ".join(f"{k} {v}%" for k, v in worker["profile"]["busy_share_by_category_pct"].items()),
        "targets:",
    ]
    for target in result["targets"]:
        verdict = {True: "met", False: "MISSED", None: "n/a"}[target["met"]]
        lines.append(f"  {verdict:<6} {target['target']}: {target['measured']} (limit {target['limit']})")
    return "\n".join(lines)


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
    by_load: dict[float, list[Mapping[str, Any]]] = {}
    for run in worker["latency_vs_load"]:
        by_load.setdefault(run["fraction"], []).append(run)
    loads = sorted(by_load)
    offered = [float(np.median([r["offered_per_s"] for r in by_load[f]])) for f in loads]
    for key in ("p50", "p90", "p99"):
        spreads = [median_of(by_load[f], "latency_ms", key) for f in loads]
        errors = [[s.median - s.low for s in spreads], [s.high - s.median for s in spreads]]
        right.errorbar(offered, [s.median for s in spreads], yerr=errors, marker="o", capsize=3, label=key)
    for target in result["targets"]:
        if target["target"].startswith("p99") and target["limit"] is not None and 0.5 in by_load:
            half = offered[loads.index(0.5)]
            right.scatter(
                [half], [target["limit"]], marker="x", s=80, color="k", label="p99 target at 50% load"
            )
    right.set_xlabel("offered load (requests / s)")
    right.set_ylabel("latency, ms (send to reply)")
    right.set_title("worker latency vs offered load")
    right.legend(fontsize=8)
    figure.suptitle(f"{result['meta']['model']} on {result['meta']['cpus']} CPUs")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
