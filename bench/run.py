"""One whole bench run: inputs, raw ONNX Runtime, the settings sweep, the head-to-head; bench.json."""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.contenders import measure_main
from bench.corpus import doc_roots, fixed_length_texts, harvest_sentences, token_lengths
from bench.plan import DEFAULT_EXTRA_MODELS, DEFAULT_MODEL, FIXED_TOKENS, ROOT, Context, Inputs, Plan
from bench.raw import measure_raw
from bench.report import PROFILES, assess
from bench.stats import percentiles
from bench.sweep import pick_best, worker_sweep


def prepare_inputs(ctx: Context, tokenizer: Any) -> tuple[Inputs, dict[str, Any]]:
    """Harvest the mix, build the fixed-128 set, describe both."""
    ctx.say("harvesting sentences")
    mix, files = harvest_sentences(doc_roots(), ctx.plan.sentences)
    if not mix:
        raise SystemExit("no sentences found under site-packages")
    lengths = token_lengths(tokenizer, mix)
    fixed = fixed_length_texts(tokenizer, mix, FIXED_TOKENS, ctx.plan.fixed_count)
    encodings = tokenizer(mix, truncation=True, max_length=ctx.max_tokens, verbose=False)["input_ids"]
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / "sentences.txt").write_text("\n".join(mix) + "\n")
    described = {
        "mix": {
            "sentences": len(mix),
            "source": f"plain sentences (3-120 words) from .md/.rst/.txt files and docstrings of "
            f"{len(doc_roots())} site-packages folder(s), {files} files read; lowest SHA-1 first",
            "sha1": hashlib.sha1("\n".join(mix).encode()).hexdigest(),
            "tokens": percentiles(lengths, (10, 50, 90)) | {"mean": round(float(np.mean(lengths)), 1)},
            "words": percentiles([len(s.split()) for s in mix], (10, 50, 90)),
            "over_max_tokens": sum(n > ctx.max_tokens for n in lengths),
        },
        "fixed_128": {"texts": len(fixed), "tokens": FIXED_TOKENS},
    }
    return Inputs(mix, fixed, [list(e) for e in encodings], files), described


async def run_bench(
    out: Path,
    plan: Plan,
    model_dir: Path = DEFAULT_MODEL,
    extra_models: Path | None = DEFAULT_EXTRA_MODELS,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole bench; returns what ``bench.json`` holds."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from worker.serving.metadata import load_metadata

    metadata = load_metadata(model_dir)
    ctx = Context(plan, model_dir, extra_models, out, model_name=metadata.name)
    ctx.max_tokens = max(metadata.sequence_lengths or (512,))
    started = time.perf_counter()
    steps = (
        1  # inputs
        + plan.repeats * (2 * len(plan.batch_sizes) + 8)  # raw ORT passes
        + plan.sweep_repeats * len(plan.sweep)
        + 1  # stage costs
        + plan.rounds * 4  # worker, raw ORT, naive ONNX, naive PyTorch, each alone, in turn
        + plan.repeats  # 128-token texts
        + 2 * (len(plan.loads) + (plan.repeats - 1) * (0.5 in plan.loads))  # paced: worker, naive ONNX
        + len(PROFILES)  # profiled runs
    )
    with tqdm(total=steps, desc="bench", unit="step", disable=not progress, file=sys.stderr) as bar:
        ctx.bar = bar
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        inputs, described = prepare_inputs(ctx, tokenizer)
        ctx.tick()
        result: dict[str, Any] = {"meta": _meta(ctx, plan), "inputs": described}
        result["raw_ort"] = measure_raw(ctx, inputs)
        result["meta"]["kafka"] = (
            os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
            or "a fresh embedded tansu broker for every measured run of every contender"
        )
        result["sweep"] = await worker_sweep(ctx, inputs)
        best = pick_best(result["sweep"])
        point = next(p for p in plan.sweep if p.label == best)
        raw_batch = int(result["raw_ort"]["length_sorted"]["best"]["batch_size"])
        result |= await measure_main(ctx, point, inputs, raw_batch)
    assess(result)
    result["meta"]["duration_s"] = round(time.perf_counter() - started, 1)
    return result


#: What the report's fields mean (copied into bench.json).
LEGEND = {
    "sentences_per_s / throughput_per_s": "answered requests / (last reply - first send); raw ORT: rows / pass time",
    "median, min, max, values": "over --repeats repetitions, after warm-up",
    "latency_ms": "per request, from just before the client's send to its reply's record timestamp (produced)",
    "queue_ms": "from the client's send (record timestamp) to the start of the request's batch in the worker",
    "batch_inference_ms": "the worker's own timing of the batch the request rode in (engine + head + JSON)",
    "batch_size": "real requests per batch, from the replies",
    "cpu_s": "CPU seconds of each process over the run (/proc/<pid>/stat)",
    "rss": "VmRSS of the worker process (/proc/<pid>/status), sampled every 50 ms",
    "fraction": "offered load as a fraction of the worker's median saturation throughput",
}


def _meta(ctx: Context, plan: Plan) -> dict[str, Any]:
    import onnxruntime

    return {
        "legend": LEGEND,
        "model": str(
            ctx.model_dir.relative_to(ROOT) if ctx.model_dir.is_relative_to(ROOT) else ctx.model_dir
        ),
        "extra_models": str(ctx.extra_models) if ctx.extra_models else None,
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "plan": {
            "sentences": plan.sentences,
            "repeats": plan.repeats,
            "rounds": plan.rounds,
            "batch_sizes": list(plan.batch_sizes),
            "sweep_sentences": plan.sweep_sentences,
            "naive_sentences": plan.naive_sentences,
            "loads": list(plan.loads),
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
