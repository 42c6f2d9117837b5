"""What a model run costs after its thread idled: CPU per row by batch size and by the idle gap before
each run, the model's engine called directly (one thread, as each of the worker's batch slots on CPU).

``python -m bench.cold_runs [--model models/minilm] [--rounds 3]``: real sentences (the bench's corpus),
batches of like shape in a fixed shuffled order, ``--runs`` runs per case with a sleep of the gap after
each; the cases take turns, ``--rounds`` times; prints the median CPU ms per row of each case.
"""

from __future__ import annotations

import argparse
import collections
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from bench.corpus import doc_roots, harvest_sentences
from worker.serving.assembly import group_by_shape
from worker.serving.engine import EngineOptions
from worker.serving.inputs import Prepared, TextInput
from worker.serving.metadata import Bucket
from worker.serving.registry import ServedModel, load_model

CASES = ((1, 0.0), (1, 0.002), (1, 0.005), (1, 0.010), (4, 0.0), (4, 0.010), (16, 0.0), (16, 0.010))


def batches(model: ServedModel, sentences: Sequence[str], size: int) -> list[tuple[Bucket, list[Prepared]]]:
    """Batches of ``size`` requests of one shape each, shuffled (the same order every time)."""
    prepared = [model.prepare(TextInput(sentence)) for sentence in sentences]
    out = []
    for group in group_by_shape(prepared):
        items = [prepared[i] for i in group]
        out += [(items[0].shape_key, items[i : i + size]) for i in range(0, len(items) - size + 1, size)]
    random.Random(2).shuffle(out)
    return out


def cpu_ms_per_row(model: ServedModel, runs: Sequence[tuple[Bucket, list[Prepared]]], gap_s: float) -> float:
    """Process CPU per row over ``runs``, each followed by ``gap_s`` of sleep (which costs no CPU)."""
    model.run(runs[0][1], runs[0][0])  # the first run of a shape pays one-off costs
    began = time.process_time()
    for key, items in runs:
        model.run(items, key)
        if gap_s:
            time.sleep(gap_s)
    return (time.process_time() - began) * 1000 / sum(len(items) for _, items in runs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_runs", description=__doc__)
    parser.add_argument("--model", default="models/minilm")
    parser.add_argument("--sentences", type=int, default=640)
    parser.add_argument("--runs", type=int, default=120, help="runs per case and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    model = load_model(
        Path(args.model), engine_options=EngineOptions(intra_op_threads=1, batches_in_flight=1)
    )
    sentences, _ = harvest_sentences(doc_roots(), args.sentences)
    plans = {size: (batches(model, sentences, size) * 10)[: args.runs] for size in {s for s, _ in CASES}}
    found: dict[tuple[int, float], list[float]] = collections.defaultdict(list)
    for _ in range(args.rounds):
        for size, gap in CASES:
            found[size, gap].append(cpu_ms_per_row(model, plans[size], gap))
    print(
        f"{model.name}, one intra-op thread, {len(sentences)} sentences; CPU ms per row, median of {args.rounds}:"
    )
    for (size, gap), values in found.items():
        spread = f"[{min(values):.2f}-{max(values):.2f}]"
        print(
            f"  batch {size:2d}, {gap * 1000:4.0f} ms idle before each run: {statistics.median(values):.2f} {spread}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
