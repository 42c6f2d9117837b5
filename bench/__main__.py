"""``python -m bench``: the worker against raw ONNX Runtime and naive Kafka consumers.

One run, one machine, the same inputs for every contender:

1. raw ONNX Runtime: the model's graph called directly on pre-tokenised, length-sorted
   batches (padded to each batch's longest row), over a sweep of batch sizes, and the same
   inputs padded to 128 tokens (what a static-shape export costs) - the hardware's limit;
2. the worker end to end: JSON requests produced to Kafka, replies consumed; throughput at
   saturation and latency under paced load, RSS, and where its time goes;
3. and 4. the consumer a user would write first: one aiokafka consumer that calls the
   PyTorch model (or a plain dynamic-shape ONNX Runtime session) per message.

Every system under test runs in its own process (``python -m bench.children host|naive``), so
its RSS and CPU are its own; the load generator, the raw ONNX Runtime sweep and the report
live in the parent. Results go to ``<out>/bench.json``, ``<out>/bench.txt`` and ``<out>/bench.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.plan import DEFAULT_EXTRA_MODELS, DEFAULT_MODEL, Plan
from bench.report import plot, render_table
from bench.run import run_bench


def build_parser() -> argparse.ArgumentParser:
    """The bench's options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="bench/out", help="folder for bench.json, bench.png and logs")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--sentences", type=int, default=None, help="sentences in the mix (default 2000)")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions per measurement (default 3)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds of the head-to-head at saturation (default 5)"
    )
    parser.add_argument("--model", default=None, help="model folder to bench (default models/minilm)")
    parser.add_argument(
        "--extra-models", default=None, help="also loaded in the worker (default models/tiny; '' for none)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run, write ``bench.json`` and ``bench.png``, print the table."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
        force=True,
    )
    plan = Plan.make(quick=args.quick, sentences=args.sentences, repeats=args.repeats, rounds=args.rounds)
    out = Path(args.out)
    model = Path(args.model) if args.model else DEFAULT_MODEL
    extra = (
        DEFAULT_EXTRA_MODELS
        if args.extra_models is None
        else Path(args.extra_models)
        if args.extra_models
        else None
    )
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    result = asyncio.run(run_bench(out, plan, model.resolve(), extra.resolve() if extra else None))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    plotted = plot(result, out / "bench.png")
    table = render_table(result)
    (out / "bench.txt").write_text(table + "\n")
    print(table)
    print(
        f"\nwritten: {out / 'bench.json'}"
        + (f", {out / 'bench.png'}" if plotted else " (no matplotlib: no plot)")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
