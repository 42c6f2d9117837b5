"""Raw ONNX Runtime: the model's graph called directly on length-sorted or padded batches, no worker."""

from __future__ import annotations

import copy
import functools
import json
import os
import queue
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.corpus import spaced_sample
from bench.plan import FIXED_TOKENS, Context, Inputs
from bench.stats import Spread


def padded_batches(
    encodings: Sequence[Sequence[int]],
    batch_size: int,
    input_names: Sequence[str],
    pad_to: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """Length-sorted batches, each padded to its longest row (or every row cut/padded to ``pad_to``)."""
    order = sorted(range(len(encodings)), key=lambda i: len(encodings[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = [list(encodings[i])[: pad_to or None] for i in order[start : start + batch_size]]
        width = pad_to or max(len(row) for row in rows)
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = row
            mask[r, : len(row)] = 1
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        batches.append({name: arrays[name] for name in input_names})
    return batches


def raw_session(onnx_path: Path, config: Mapping[str, str] | None = None, threads: int | None = None) -> Any:
    """A plain dynamic-shape CPU session, as a user of ONNX Runtime would create it (plus ``config``;
    ``threads``: intra-op threads, default one per core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def run_all(session: Any, batches: Sequence[dict[str, np.ndarray]]) -> None:
    """Every batch through the session, one after the other."""
    for batch in batches:
        session.run(None, batch)


def timed(rows: int, work: Callable[[], object]) -> tuple[float, float]:
    """``work`` run once: ``rows`` per second, and this process's CPU milliseconds per row."""
    began, cpu = time.perf_counter(), time.process_time()
    work()
    return rows / (time.perf_counter() - began), 1000 * (time.process_time() - cpu) / rows


def mean_pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Token vectors averaged over real tokens, then unit length (sentence-transformers' embedding);
    an output that is already one vector per row is only normalised."""
    if hidden.ndim == 3:
        weights = mask[..., None].astype(hidden.dtype)
        hidden = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    normalised: np.ndarray = hidden / np.maximum(np.linalg.norm(hidden, axis=-1, keepdims=True), 1e-12)
    return normalised


def in_flight_label(batches: int) -> str:
    """How a round names a raw pass by the batches it runs at once."""
    return f"{batches} at once"


class RawPass:
    """Raw ONNX Runtime as the issue's reference: tokenize, run and mean-pool length-sorted batches of
    one size, in one process, over every sentence of the mix. Built once and timed again in each
    round of the head-to-head, next to the worker's and the naive consumers' runs.

    ``in_flight`` 1: one batch at a time on a default session (a thread per core); 2: two batches at
    once on a session with cores / 2 threads, each call with a tokenizer of its own (a fast tokenizer
    must not be called from two threads at once).
    """

    def __init__(
        self,
        model_dir: Path,
        texts: Sequence[str],
        lengths: Sequence[int],
        batch_size: int,
        in_flight: int = 1,
    ) -> None:
        from transformers import AutoTokenizer

        self.in_flight = in_flight
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._tokenizers: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(in_flight):
            self._tokenizers.put(copy.deepcopy(tokenizer))
        threads = None if in_flight == 1 else max(1, (os.cpu_count() or 1) // in_flight)
        self._session = raw_session(model_dir / "model.onnx", threads=threads)
        self._names = [i.name for i in self._session.get_inputs()]
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        self._groups = [
            [texts[i] for i in order[start : start + batch_size]]
            for start in range(0, len(order), batch_size)
        ]
        self._max_tokens = max(lengths)
        self.embed(self._groups[0])

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """One batch's sentence vectors."""
        tokenizer = self._tokenizers.get()
        try:
            encoded = tokenizer(
                list(texts), padding=True, truncation=True, max_length=self._max_tokens, return_tensors="np"
            )
        finally:
            self._tokenizers.put(tokenizer)
        hidden = self._session.run(None, {name: encoded[name] for name in self._names})[0]
        return mean_pooled(hidden, encoded["attention_mask"])

    def measure(self) -> dict[str, float]:
        """One timed pass: sentences per second, and this process's CPU milliseconds per sentence."""
        rows = sum(len(group) for group in self._groups)
        with ThreadPoolExecutor(self.in_flight) as pool:
            list(pool.map(self.embed, self._groups[: self.in_flight]))  # threads started before the clock
            rate, cpu_ms = timed(rows, lambda: list(pool.map(self.embed, self._groups)))
        return {"sentences_per_s": round(rate, 1), "cpu_ms_per_sentence": round(cpu_ms, 3)}


@dataclass(frozen=True)
class RawCase:
    """One raw ONNX Runtime measurement: which rows, how batched and padded, which session options."""

    encodings: Sequence[Sequence[int]]
    batch_size: int
    pad_to: int | None = None
    config: Mapping[str, str] = field(default_factory=dict)
    model: Path | None = None
    """Another model file (the fused copy); None: the benched one."""


def raw_compare(
    onnx_path: Path, cases: Mapping[str, RawCase], repeats: int, tick: Callable[[], None] = lambda: None
) -> tuple[dict[str, Spread], dict[str, Spread]]:
    """Rows per second of each case over whole passes, and this process's CPU milliseconds per row
    (every thread: ONNX Runtime's included); repetitions interleave the cases, so that a change in
    the machine's load touches every case alike."""
    sessions: dict[str, Any] = {}
    passes = {}
    for label, case in cases.items():
        path = case.model or onnx_path
        key = json.dumps([str(path), case.config], sort_keys=True)
        if key not in sessions:
            sessions[key] = raw_session(path, case.config)
        session = sessions[key]
        names = [i.name for i in session.get_inputs()]
        batches = padded_batches(case.encodings, case.batch_size, names, case.pad_to)
        for batch in batches[:2]:
            session.run(None, batch)
        passes[label] = (session, batches)
    rates: dict[str, list[float]] = {label: [] for label in cases}
    cpu_ms: dict[str, list[float]] = {label: [] for label in cases}
    for _ in range(repeats):
        for label, (session, batches) in passes.items():
            rate, cpu = timed(len(cases[label].encodings), functools.partial(run_all, session, batches))
            rates[label].append(rate)
            cpu_ms[label].append(cpu)
            tick()
    return (
        {label: Spread.of(values) for label, values in rates.items()},
        {label: Spread.of(values) for label, values in cpu_ms.items()},
    )


def fused_copy(onnx_path: Path, out: Path) -> tuple[Path | None, dict[str, Any]]:
    """The model after ONNX Runtime's offline transformer optimizer (attention, LayerNorm, GELU fused)."""
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        config = json.loads((onnx_path.parent / "config.json").read_text())
        model = optimize_model(
            str(onnx_path),
            model_type="bert",
            num_heads=int(config["num_attention_heads"]),
            hidden_size=int(config["hidden_size"]),
            opt_level=0,
        )
    except (ImportError, KeyError, OSError) as exc:  # no sympy, no BERT config: report, do not fail
        return None, {"skipped": f"{type(exc).__name__}: {exc}"}
    model.save_model_to_file(str(out))
    fused = {op: n for op, n in model.get_fused_operator_statistics().items() if n}
    return out, {"file": str(out), "fused_operators": fused}


def measure_raw(ctx: Context, inputs: Inputs) -> dict[str, Any]:
    """Raw ONNX Runtime: length-sorted batches, the same padded to 128 tokens, session options, fusion."""
    plan = ctx.plan
    onnx_path = ctx.model_dir / "model.onnx"
    sample = spaced_sample(inputs.encodings, plan.raw_rows)
    sample_128 = spaced_sample(inputs.encodings, plan.raw_rows_128)
    ctx.say("raw ONNX Runtime: batch sizes")
    cases = {f"sorted {b}": RawCase(sample, b) for b in plan.batch_sizes}
    cases |= {f"padded {b}": RawCase(sample_128, b, FIXED_TOKENS) for b in plan.batch_sizes}
    rates, cpu_ms = raw_compare(onnx_path, cases, plan.repeats, ctx.tick)

    def described(kind: str, rows: int) -> dict[str, Any]:
        by_size = {b: rates[f"{kind} {b}"] for b in plan.batch_sizes}
        best = max(by_size, key=lambda b: by_size[b].median)
        return {
            "rows_per_pass": rows,
            "by_batch_size": {str(b): spread.to_json() for b, spread in by_size.items()},
            "cpu_ms_per_sentence": {str(b): cpu_ms[f"{kind} {b}"].to_json() for b in plan.batch_sizes},
            "best": {
                "batch_size": best,
                "sentences_per_s": by_size[best].to_json(),
                "cpu_ms_per_sentence": cpu_ms[f"{kind} {best}"].to_json(),
            },
        }

    found: dict[str, Any] = {
        "session": "onnxruntime.InferenceSession, dynamic shapes, ORT_ENABLE_ALL, default threads (1/core)",
        "length_sorted": described("sorted", len(sample)),
        "padded_128": described("padded", len(sample_128)),
    }
    ctx.say("raw ONNX Runtime: session options and a fused graph")
    fused, found["fusion"] = fused_copy(onnx_path, ctx.out / "fused.onnx")
    variants: dict[str, tuple[Mapping[str, str], Path | None]] = {
        "default (as worker/serving/engine.py)": ({}, None),
        "no spinning": ({"session.intra_op.allow_spinning": "0"}, None),
        "no pre-packing": ({"session.disable_prepacking": "1"}, None),
    }
    if fused is not None:
        variants["fused graph (transformer optimizer)"] = ({}, fused)
    options: dict[str, RawCase] = {}
    for kind, rows, pad_to in (("length_sorted", sample, None), ("padded_128", sample_128, FIXED_TOKENS)):
        size = found[kind]["best"]["batch_size"]
        options |= {f"{kind}|{v}": RawCase(rows, size, pad_to, c, m) for v, (c, m) in variants.items()}
    compared, _ = raw_compare(onnx_path, options, plan.repeats, ctx.tick)
    found["session_options"] = {
        kind: {"batch_size": found[kind]["best"]["batch_size"]}
        | {v: compared[f"{kind}|{v}"].to_json() for v in variants}
        for kind in ("length_sorted", "padded_128")
    }
    return found
