"""``python -m worker bench``: the worker against raw ONNX Runtime and naive Kafka consumers.

One run, one machine, the same inputs for every contender:

1. raw ONNX Runtime: the model's graph called directly on pre-tokenised, length-sorted
   batches (padded to each batch's longest row), over a sweep of batch sizes, and the same
   inputs padded to 128 tokens (what a static-shape export costs) - the hardware's limit;
2. the worker end to end: JSON requests produced to Kafka, replies consumed; throughput at
   saturation and latency under paced load, RSS, and where its time goes;
3. and 4. the consumer a user would write first: one aiokafka consumer that calls the
   PyTorch model (or a plain dynamic-shape ONNX Runtime session) per message.

Every system under test runs in its own process (``python -m worker.bench host|naive``), so
its RSS and CPU are its own; the load generator, the raw ONNX Runtime sweep and the report
live in the parent. Results go to ``<out>/bench.json`` and ``<out>/bench.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import platform
import re
import subprocess
import sys
import sysconfig
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "minilm"
DEFAULT_EXTRA_MODELS = ROOT / "models" / "tiny"
EXPORT_PYTHON = ROOT / ".venv-export" / "bin" / "python"
FIXED_TOKENS = 128
#: Kafka settings for every process under test: a short session makes tansu's group join quick.
SESSION_TIMEOUT_MS = 4000
HEARTBEAT_MS = 1000

# --- plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepPoint:
    """One worker configuration: Settings fields plus metadata overrides of the benched model."""

    label: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    overrides: Mapping[str, Any] = field(default_factory=dict)

    @property
    def engine_key(self) -> str:
        """Points with equal keys can share one loaded set of models."""
        engine = [self.settings.get(k) for k in ("intra_op_threads", "intra_op_spinning")]
        return json.dumps([engine, self.overrides], sort_keys=True)


#: The previous defaults (before one session per model): 4 token buckets, 3 batch buckets.
COARSE_SEQUENCES = [16, 32, 64, 128, 256]

FULL_SWEEP = (
    SweepPoint("defaults (intra_op 0 = 1/core, spinning, executor 2, batch 32, 2048 tokens, wait 10 ms)"),
    SweepPoint("executor_threads 1", {"executor_threads": 1}),
    SweepPoint("fetch_max_wait_ms 500 (the Kafka client's default)", {"fetch_max_wait_ms": 500}),
    SweepPoint("max_wait_ms 2", {"max_wait_ms": 2.0}),
    SweepPoint("max_wait_ms 25", {"max_wait_ms": 25.0}),
    SweepPoint("intra_op_threads 1", {"intra_op_threads": 1}),
    SweepPoint("intra_op_spinning off", {"intra_op_spinning": False}),
    SweepPoint("max_batch_size 16", {"max_batch_size": 16}),
    SweepPoint(
        "batch buckets up to 64; max_batch_size 64, 4096 tokens",
        {"max_batch_size": 64, "max_batch_tokens": 4096},
        {"batch_sizes": [1, 2, 4, 8, 16, 32, 64]},
    ),
    SweepPoint("max_batch_tokens 1024", {"max_batch_tokens": 1024}),
    SweepPoint("no token budget (max_batch_tokens 1e6)", {"max_batch_tokens": 1_000_000}),
    SweepPoint(
        "coarse buckets (the old defaults): batch 1,8,32; sequence 16,32,64,128,256",
        {},
        {"batch_sizes": [1, 8, 32], "sequence_lengths": COARSE_SEQUENCES},
    ),
)


@dataclass(frozen=True)
class Plan:
    """Sizes of one run; ``--quick`` shrinks every one of them."""

    sentences: int = 2000
    repeats: int = 3
    batch_sizes: tuple[int, ...] = (1, 8, 16, 32, 64)
    raw_rows: int = 384
    """Sentences per raw ONNX Runtime pass (a deterministic, evenly spaced sample of the mix)."""
    raw_rows_128: int = 96
    fixed_count: int = 256
    """Texts of exactly 128 tokens sent to the worker."""
    sweep_sentences: int = 500
    sweep_repeats: int = 2
    sweep_paced_s: float = 3.0
    """Seconds of each sweep point's paced run at half its saturation rate."""
    naive_sentences: int = 400
    loads: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)
    """Offered load as fractions of the worker's saturation throughput."""
    load_seconds: float = 8.0
    warmup: int = 64
    sweep: tuple[SweepPoint, ...] = FULL_SWEEP

    @classmethod
    def make(cls, *, quick: bool, sentences: int | None, repeats: int | None) -> Plan:
        """The full plan, or the quick one; explicit counts win over either."""
        plan = cls()
        if quick:
            plan = cls(
                sentences=200,
                repeats=2,
                batch_sizes=(1, 8, 32),
                raw_rows=64,
                raw_rows_128=32,
                fixed_count=32,
                sweep_sentences=100,
                sweep_repeats=1,
                sweep_paced_s=1.0,
                naive_sentences=40,
                loads=(0.5,),
                load_seconds=1.5,
                warmup=16,
                sweep=FULL_SWEEP[:3],
            )
        if sentences is not None:
            plan = replace(plan, sentences=sentences)
        if repeats is not None:
            plan = replace(plan, repeats=max(1, repeats))
        return plan


# --- statistics ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """The median of repeated measurements and their range."""

    median: float
    low: float
    high: float
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        """Summarise measurements (at least one)."""
        data = tuple(float(v) for v in values)
        return cls(float(np.median(data)), min(data), max(data), data)

    def to_json(self) -> dict[str, Any]:
        """Rounded for the report."""
        return {
            "median": round(self.median, 2),
            "min": round(self.low, 2),
            "max": round(self.high, 2),
            "values": [round(v, 2) for v in self.values],
        }

    def __str__(self) -> str:
        return f"{self.median:.0f} [{self.low:.0f}-{self.high:.0f}]"


def percentiles(values: Sequence[float], points: Sequence[int] = (10, 50, 90, 99)) -> dict[str, float]:
    """``{"p10": ..., ..., "max": ...}`` rounded to 0.1 (empty input gives an empty dict)."""
    if not values:
        return {}
    found = np.percentile(np.asarray(values, dtype=np.float64), points)
    summary = {f"p{p}": round(float(v), 1) for p, v in zip(points, found, strict=True)}
    summary["max"] = round(float(max(values)), 1)
    return summary


# --- inputs --------------------------------------------------------------------------------

_DOC_SUFFIXES = frozenset({".md", ".rst", ".txt", ".py"})
_DOCSTRING = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'', re.S)
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
#: A plain sentence: capital first, sentence punctuation last, no markup or code characters.
_PLAIN = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'\"()/%&.\-]*[a-z0-9)'\"][.!?]$")


def doc_roots() -> list[Path]:
    """This interpreter's site-packages folders."""
    paths = sysconfig.get_paths()
    return sorted({Path(paths["purelib"]), Path(paths["platlib"])})


def is_plain_sentence(sentence: str, min_words: int = 3, max_words: int = 120) -> bool:
    """English prose rather than code, markup, a heading or a parameter list."""
    words = sentence.split()
    return (
        min_words <= len(words) <= max_words
        and _PLAIN.match(sentence) is not None
        and not words[0].endswith(":")
        and ".." not in sentence
        and sum(word.isalpha() for word in words) >= 0.7 * len(words)
    )


def harvest_sentences(roots: Sequence[Path], count: int) -> tuple[list[str], int]:
    """``count`` plain sentences from .md/.rst/.txt files and docstrings under ``roots``.

    The choice is deterministic (the lowest SHA-1 hashes), so every run and every machine
    with the same packages gets the same set. Returns the sentences and how many files were read.
    """
    files = sorted(
        path for root in roots for path in root.rglob("*") if path.suffix in _DOC_SUFFIXES and path.is_file()
    )
    found: set[str] = set()
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        blocks = [a or b for a, b in _DOCSTRING.findall(text)] if path.suffix == ".py" else [text]
        for block in blocks:
            for paragraph in re.split(r"\n\s*\n", block):
                for sentence in _SENTENCE_BREAK.split(" ".join(paragraph.split())):
                    if is_plain_sentence(sentence):
                        found.add(sentence)
    chosen = sorted(found, key=lambda s: hashlib.sha1(s.encode()).hexdigest())[:count]
    return chosen, len(files)


def token_lengths(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Tokens per text, special tokens included, nothing cut."""
    return [len(ids) for ids in tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]]


def fixed_length_texts(tokenizer: Any, sentences: Sequence[str], tokens: int, count: int) -> list[str]:
    """Texts of exactly ``tokens`` tokens (special tokens included): running prose cut and decoded."""
    pieces = tokenizer(list(sentences), add_special_tokens=False, verbose=False)["input_ids"]
    body = tokens - tokenizer.num_special_tokens_to_add()
    texts: list[str] = []
    buffer: list[int] = []
    for index in range(len(pieces) * 8):
        if len(texts) == count:
            break
        buffer += pieces[index % len(pieces)]
        if len(buffer) < body:
            continue
        text = tokenizer.decode(buffer[:body])
        buffer = []
        # Word pieces do not always survive decode + encode; keep only exact round trips.
        if len(tokenizer(text, truncation=False, verbose=False)["input_ids"]) == tokens:
            texts.append(text)
    return texts


def spaced_sample(items: Sequence[Any], count: int) -> list[Any]:
    """``count`` items evenly spaced through ``items`` (all of them when there are fewer)."""
    if count >= len(items):
        return list(items)
    return [items[int(i * len(items) / count)] for i in range(count)]


# --- raw ONNX Runtime ----------------------------------------------------------------------


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


def raw_session(onnx_path: Path, config: Mapping[str, str] | None = None) -> Any:
    """A plain dynamic-shape CPU session, as a user of ONNX Runtime would create it (plus ``config``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


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
) -> dict[str, Spread]:
    """Rows per second of each case over whole passes; repetitions interleave the cases, so that
    a change in the machine's load touches every case alike."""
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
    for _ in range(repeats):
        for label, (session, batches) in passes.items():
            began = time.perf_counter()
            for batch in batches:
                session.run(None, batch)
            rates[label].append(len(cases[label].encodings) / (time.perf_counter() - began))
            tick()
    return {label: Spread.of(values) for label, values in rates.items()}


# --- the in-process profile of a worker ------------------------------------------------------

#: (category, path fragments): the first frame from the innermost outwards that matches names it.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("engine (ONNX Runtime, buffers)", ("/onnxruntime/", "/worker/engine.py")),
    ("preprocessing (tokenizer)", ("/tokenizers/", "/transformers/", "/worker/processors.py")),
    ("JSON + validation (pydantic)", ("/pydantic", "/json/", "/schemas/")),
    ("task head (pooling)", ("/worker/tasks.py",)),
    ("Kafka client (aiokafka, FastStream)", ("/aiokafka/", "/faststream/")),
    ("batcher", ("/worker/batching.py",)),
    ("worker app (intake, replies, commits)", ("/worker/",)),
    ("asyncio event loop", ("/asyncio/",)),
)
IDLE = "idle (waiting)"
#: Innermost frames that mean a thread is waiting, not working.
_IDLE_FRAMES = frozenset(
    {("selectors.py", "select"), ("threading.py", "wait"), ("queue.py", "get"), ("thread.py", "_worker")}
)


def classify(frame: FrameType | None) -> tuple[str, str]:
    """(category, innermost function) of one thread's stack."""
    if frame is None:
        return IDLE, "-"
    code = frame.f_code
    leaf = f"{Path(code.co_filename).name}:{code.co_name}"
    if (Path(code.co_filename).name, code.co_name) in _IDLE_FRAMES:
        return IDLE, leaf
    current: FrameType | None = frame
    while current is not None:
        filename = current.f_code.co_filename.replace("\\", "/")
        for category, fragments in CATEGORIES:
            if any(fragment in filename for fragment in fragments):
                return category, leaf
        current = current.f_back
    return "other", leaf


def thread_group(name: str) -> str:
    """Which of the worker's threads a Python thread is."""
    if name == "MainThread":
        return "event loop thread"
    if name.startswith("inference"):
        return "executor threads"
    return "other Python threads"


def _thread_cpu() -> dict[int, float]:
    """CPU seconds per native thread id of this process."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            found[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return found


class StackSampler:
    """A py-spy-like sampling profiler in-process: every thread's stack every ``interval`` seconds."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.counts: Counter[tuple[str, str]] = Counter()
        self.leaves: Counter[tuple[str, str, str]] = Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._cpu_before: dict[int, float] = {}
        self._began = 0.0

    def start(self) -> None:
        """Begin sampling."""
        self._cpu_before = _thread_cpu()
        self._began = time.perf_counter()
        self._thread.start()

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval):
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                group = thread_group(names.get(ident, "?"))
                category, leaf = classify(frame)
                self.counts[(group, category)] += 1
                if category != IDLE:
                    self.leaves[(group, category, leaf)] += 1
            self.samples += 1

    def stop(self) -> dict[str, Any]:
        """Stop and summarise: shares per thread group and category, top functions, CPU per thread."""
        self._stop.set()
        self._thread.join()
        wall = time.perf_counter() - self._began
        cpu_after = _thread_cpu()
        names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
        cpu: dict[str, float] = {}
        for tid, seconds in cpu_after.items():
            group = thread_group(names[tid]) if tid in names else "native threads (ORT intra-op pools)"
            cpu[group] = cpu.get(group, 0.0) + seconds - self._cpu_before.get(tid, 0.0)
        per_group: dict[str, dict[str, float]] = {}
        for (group, category), count in sorted(self.counts.items()):
            per_group.setdefault(group, {})[category] = round(100 * count / max(self.samples, 1), 1)
        busy = Counter({key: n for key, n in self.counts.items() if key[1] != IDLE})
        total_busy = max(sum(busy.values()), 1)
        by_category: Counter[str] = Counter()
        for (_, category), count in busy.items():
            by_category[category] += count
        return {
            "method": f"in-process stack sampling of every Python thread every {self.interval * 1000:.0f} ms",
            "wall_s": round(wall, 2),
            "samples": self.samples,
            "busy_share_by_category_pct": {
                k: round(100 * v / total_busy, 1) for k, v in by_category.most_common()
            },
            "thread_time_pct_by_group": per_group,
            "cpu_s_by_thread_group": {k: round(v, 2) for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])},
            "top_functions": [
                {"thread": g, "category": c, "function": f, "pct_of_busy": round(100 * n / total_busy, 1)}
                for (g, c, f), n in self.leaves.most_common(15)
            ],
        }


def stage_costs(model: Any, texts: Sequence[str], max_batch_size: int) -> dict[str, Any]:
    """Milliseconds per sentence of each stage the worker runs, called directly (no Kafka)."""
    from schemas import Modality, Result, Timing, parse_request
    from worker.decoding import MediaLimits, decode_inputs

    bodies = [
        json.dumps({"id": f"s{i}", "model": model.name, "inputs": {"text": t}}).encode()
        for i, t in enumerate(texts)
    ]
    limits = MediaLimits()
    clock = time.perf_counter
    took: dict[str, float] = {}
    began = clock()
    requests = [parse_request(body, Modality.TEXT) for body in bodies]
    items = [decode_inputs(request, limits) for request in requests]
    took["parse + validate request JSON"] = clock() - began
    began = clock()
    prepared = [model.prepare(item) for item in items]
    took["tokenize + pad to bucket"] = clock() - began
    groups: dict[Any, list[int]] = {}
    for index, item in enumerate(prepared):
        groups.setdefault(item.shape_key, []).append(index)
    outputs: list[Any] = [None] * len(prepared)
    began = clock()
    for indices in groups.values():
        for start in range(0, len(indices), max_batch_size):
            chunk = indices[start : start + max_batch_size]
            for i, out in zip(chunk, model.run([prepared[i] for i in chunk]), strict=True):
                outputs[i] = out
    took[f"engine (bucketed, batches of <= {max_batch_size})"] = clock() - began
    began = clock()
    heads = [model.postprocess(out, p, {}) for out, p in zip(outputs, prepared, strict=True)]
    took["task head (mean pooling, normalise)"] = clock() - began
    began = clock()
    timing = Timing(queue_ms=0.0, inference_ms=1.0, batch_size=1)
    for request, item, head in zip(requests, prepared, heads, strict=True):
        Result(
            id=request.id,
            model=model.name,
            task=model.metadata.task,
            outputs=head,
            truncated=item.truncated,
            timing=timing,
        ).model_dump_json().encode()
    took["build + serialise result JSON"] = clock() - began
    total = sum(took.values())
    return {
        "sentences": len(texts),
        "ms_per_sentence": {k: round(1000 * v / len(texts), 3) for k, v in took.items()},
        "share_pct": {k: round(100 * v / total, 1) for k, v in took.items()},
        "sentences_per_s_one_thread": round(len(texts) / total, 1),
        "engine_sentences_per_s": round(
            len(texts) / next(v for k, v in took.items() if k.startswith("engine")), 1
        ),
    }


# --- processes under test ---------------------------------------------------------------------


def _emit(event: Mapping[str, Any]) -> None:
    """One JSON line to the parent (stdout carries nothing else)."""
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def _stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)  # a command line carries whole settings objects
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _host_main(spec: Mapping[str, Any]) -> None:
    """Child: load models once, then serve Worker configurations (each on its own topics) as asked."""
    from worker.app import Worker
    from worker.engine import EngineOptions
    from worker.registry import load_model
    from worker.settings import Settings

    began = time.perf_counter()
    options = EngineOptions(
        intra_op_threads=int(spec["intra_op_threads"]), provider="cpu", spin=bool(spec["spin"])
    )
    models = {}
    for folder in spec["models"]:
        model = load_model(folder, overrides=spec["overrides"].get(Path(folder).name), engine_options=options)
        models[model.name] = model
    _emit(
        {
            "event": "loaded",
            "load_s": round(time.perf_counter() - began, 1),
            "buckets": {name: m.engine.bucket_count for name, m in models.items()},
        }
    )
    reader = await _stdin_lines()
    workers: dict[str, Worker] = {}
    sampler: StackSampler | None = None
    while line := await reader.readline():
        command = json.loads(line)
        if command["cmd"] == "serve":
            settings = Settings(**command["settings"])
            worker = workers[settings.topic_prefix] = Worker(settings, models)
            await worker.start()
            while not worker.ready:  # noqa: ASYNC110 - the Worker exposes readiness as a property only
                await asyncio.sleep(0.05)
            _emit({"event": "serving"})
        elif command["cmd"] == "stop":
            worker = workers.pop(command["prefix"])
            await worker.drain()
            await worker.stop()
            _emit({"event": "stopped"})
        elif command["cmd"] == "profile_start":
            sampler = StackSampler()
            sampler.start()
            _emit({"event": "profiling"})
        elif command["cmd"] == "profile_stop" and sampler is not None:
            _emit({"event": "profile", "profile": sampler.stop()})
            sampler = None
        elif command["cmd"] == "stages":
            costs = stage_costs(models[command["model"]], command["texts"], int(command["max_batch_size"]))
            _emit({"event": "stages", "stages": costs})
    for worker in workers.values():
        await worker.drain()
        await worker.stop()


def _torch_embedder(model_dir: Path, max_tokens: int) -> Callable[[str], list[float]]:
    """What a user writes first: transformers' BertModel, mean pooling, L2 normalisation."""
    import torch
    from transformers import AutoTokenizer, BertModel

    source = model_dir
    if not any(model_dir.glob("*.safetensors")):
        # The ONNX folder keeps no PyTorch weights; the build's source package does. Imported by
        # name: models/ is outside the worker's typed surface.
        source = importlib.import_module("models.minilm").package_folder()
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = BertModel.from_pretrained(source).eval()

    def embed(text: str) -> list[float]:
        encoded = tokenizer(text, truncation=True, max_length=max_tokens, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        vector: list[float] = torch.nn.functional.normalize(pooled, dim=-1)[0].tolist()
        return vector

    return embed


def _onnx_embedder(model_dir: Path, max_tokens: int) -> Callable[[str], list[float]]:
    """The same with a plain dynamic-shape ONNX Runtime session (default options)."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def embed(text: str) -> list[float]:
        encoded = tokenizer(text, truncation=True, max_length=max_tokens, return_tensors="np")
        hidden = session.run(None, {name: encoded[name] for name in names})[0]
        if hidden.ndim == 3:  # token vectors: mean over real tokens, then unit length
            mask = encoded["attention_mask"][..., None].astype(hidden.dtype)
            hidden = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
            hidden = hidden / np.maximum(np.linalg.norm(hidden, axis=-1, keepdims=True), 1e-12)
        vector: list[float] = hidden[0].tolist()
        return vector

    return embed


async def _naive_main(spec: Mapping[str, Any]) -> None:
    """Child: one aiokafka consumer, the model called per message, each reply sent and awaited."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    maker = _torch_embedder if spec["backend"] == "torch" else _onnx_embedder
    embed = maker(Path(spec["model_dir"]), int(spec["max_tokens"]))
    consumer = AIOKafkaConsumer(
        spec["topic"],
        bootstrap_servers=spec["bootstrap"],
        group_id=spec["group"],
        auto_offset_reset="earliest",
        session_timeout_ms=SESSION_TIMEOUT_MS,
        heartbeat_interval_ms=HEARTBEAT_MS,
    )
    producer = AIOKafkaProducer(bootstrap_servers=spec["bootstrap"], enable_idempotence=False)
    await consumer.start()
    await producer.start()

    async def consume() -> None:
        async for message in consumer:
            request = json.loads(message.value)
            vector = embed(request["inputs"]["text"])
            headers = dict(message.headers)
            body = {"id": request["id"], "model": request["model"], "outputs": vector}
            await producer.send_and_wait(
                headers["reply_to"].decode(),
                json.dumps(body).encode(),
                key=message.key,
                headers=[("correlation_id", headers.get("correlation_id", b""))],
            )

    task = asyncio.create_task(consume())
    _emit({"event": "ready"})
    reader = await _stdin_lines()
    while await reader.readline():
        pass
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await consumer.stop()
    await producer.stop()


def child_main(argv: Sequence[str]) -> int:
    """``python -m worker.bench host|naive SPEC_JSON``: a process under test."""
    role, spec = argv[0], json.loads(argv[1])
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_host_main(spec) if role == "host" else _naive_main(spec))
    return 0


class ChildError(RuntimeError):
    """A process under test died or did not answer in time."""


class Child:
    """A process under test: JSON commands on its stdin, JSON events on its stdout, log to a file."""

    def __init__(self, process: asyncio.subprocess.Process, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    @classmethod
    async def spawn(cls, python: str, role: str, spec: Mapping[str, Any], log_path: Path) -> Child:
        """Start ``python -m worker.bench ROLE SPEC`` with its log in ``log_path``."""
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                python,
                "-m",
                "worker.bench",
                role,
                json.dumps(spec),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                cwd=ROOT,
                env=env,
                limit=64 * 1024 * 1024,  # result events carry every reply's timing: lines over 64 KiB
            )
        return cls(process, log_path)

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.process.pid

    async def event(self, name: str, limit_s: float = 300.0) -> dict[str, Any]:
        """Wait for the next event called ``name``; other stdout lines are skipped."""
        assert self.process.stdout is not None
        async with asyncio.timeout(limit_s):
            while True:
                line = await self.process.stdout.readline()
                if not line:
                    tail = self.log_path.read_text(errors="replace")[-3000:]
                    raise ChildError(f"process under test exited ({self.log_path}):\n{tail}")
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict) and event.get("event") == name:
                        return event

    async def ask(self, command: Mapping[str, Any], reply: str, limit_s: float = 300.0) -> dict[str, Any]:
        """Send one command, wait for its reply event."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()
        return await self.event(reply, limit_s)

    async def close(self, limit_s: float = 60.0) -> None:
        """Close its stdin (it finishes and exits); kill it if it does not."""
        if self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), limit_s)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


# --- measuring processes ----------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    """Resident set size of a process (VmRSS), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ChildError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.asynccontextmanager
async def watched(pids: Mapping[str, int], rss_pid: int | None) -> AsyncIterator[dict[str, Any]]:
    """CPU seconds per named process over the block, and the peak RSS of ``rss_pid``."""
    found: dict[str, Any] = {}
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    peak = 0.0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_mib(rss_pid)) if rss_pid is not None else 0.0
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    try:
        yield found
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        found["cpu_s"] = {name: round(cpu_seconds(pid) - before[name], 2) for name, pid in pids.items()}
        if rss_pid is not None:
            found["peak_rss_mib"] = round(max(peak, rss_mib(rss_pid)), 1)


# --- load over Kafka ---------------------------------------------------------------------------


@dataclass
class Run:
    """Send and reply times of one load run, by request id."""

    sent: dict[str, float]
    received: dict[str, tuple[float, bytes]]
    offered_rate: float | None

    @property
    def answered(self) -> int:
        """Replies that arrived."""
        return len(self.received)

    def latencies_ms(self) -> list[float]:
        """Reply time minus send time, per answered request."""
        return [1000 * (self.received[i][0] - t) for i, t in self.sent.items() if i in self.received]

    def throughput(self) -> float:
        """Requests per second from the first send to the last reply."""
        if not self.received:
            return 0.0
        last = max(t for t, _ in self.received.values())
        return self.answered / max(last - min(self.sent.values()), 1e-9)

    def summary(self) -> dict[str, Any]:
        """Throughput, latency percentiles, and what the worker's replies say about batching."""
        batch_sizes, inference_ms, queue_ms, errors = [], [], [], 0
        for _, body in self.received.values():
            reply = json.loads(body)
            if "error" in reply:
                errors += 1
            timing = reply.get("timing")
            if timing:
                batch_sizes.append(float(timing["batch_size"]))
                inference_ms.append(float(timing["inference_ms"]))
                queue_ms.append(float(timing["queue_ms"]))
        summary: dict[str, Any] = {
            "requests": len(self.sent),
            "answered": self.answered,
            "errors": errors,
            "offered_per_s": round(self.offered_rate, 1) if self.offered_rate else None,
            "throughput_per_s": round(self.throughput(), 1),
            "latency_ms": percentiles(self.latencies_ms(), (50, 90, 99)),
        }
        if batch_sizes:
            summary["batch_size"] = {
                "mean": round(float(np.mean(batch_sizes)), 1),
                **percentiles(batch_sizes),
            }
            summary["batch_inference_ms"] = percentiles(inference_ms, (50, 90, 99))
            # From the request's producer timestamp to the start of its batch: intake + batcher wait.
            summary["queue_ms"] = percentiles(queue_ms, (50, 90, 99))
        return summary


class LoadClient:
    """Produces JSON requests and times the replies, which every system sends to one private topic."""

    def __init__(self, bootstrap: str, model: str) -> None:
        self.bootstrap = bootstrap
        self.reply_topic = f"bench-replies-{uuid.uuid4().hex[:8]}"
        self.model = model
        self._received: dict[str, tuple[float, bytes]] = {}
        self._waiting: set[str] = set()
        self._done = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._producer: Any = None
        self._consumer: Any = None

    async def __aenter__(self) -> LoadClient:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

        from worker.topics import create_topics

        await create_topics(self.bootstrap, [self.reply_topic])
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, enable_idempotence=False, max_batch_size=512 * 1024
        )
        self._consumer = AIOKafkaConsumer(
            self.reply_topic,
            bootstrap_servers=self.bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            # Replies are timed by their record timestamps (set by the replier's producer), so a
            # slow fetch costs nothing; a short one would (tansu answers a fetch only when its
            # wait runs out: a 5 ms loop cost the broker a third of a core on 2 cores).
            fetch_max_wait_ms=100,
        )
        await self._producer.start()
        await self._consumer.start()
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self._consumer.stop()
        await self._producer.stop()

    async def _read(self) -> None:
        while True:
            fetched = await self._consumer.getmany(timeout_ms=50, max_records=2000)
            now = time.time()
            for records in fetched.values():
                for record in records:
                    key = record.key.decode() if record.key else ""
                    if key in self._waiting:
                        # CreateTime (type 0) is when the replier produced it; else when it arrived.
                        produced = record.timestamp / 1000 if record.timestamp_type == 0 else 0.0
                        self._received[key] = (produced if produced > 0 else now, record.value)
                        self._waiting.discard(key)
            if not self._waiting:
                self._done.set()
                self._consumer.pause(*self._consumer.assignment())  # no fetching between runs

    async def run(
        self, topic: str, texts: Sequence[str], *, rate: float | None = None, limit_s: float | None = None
    ) -> Run:
        """Send one request per text to ``topic`` (all at once, or ``rate`` per second); await the replies."""
        prefix = uuid.uuid4().hex[:8]
        bodies = [
            (f"{prefix}-{i}", json.dumps({"id": f"{prefix}-{i}", "model": self.model, "inputs": {"text": t}}))
            for i, t in enumerate(texts)
        ]
        self._received = {}
        self._waiting = {rid for rid, _ in bodies}
        self._done.clear()
        self._consumer.resume(*self._consumer.assignment())
        sent: dict[str, float] = {}
        began = time.perf_counter()
        for index, (rid, body) in enumerate(bodies):
            if rate:
                delay = began + index / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif index % 64 == 0:
                await asyncio.sleep(0)  # let the reply reader take early replies
            sent[rid] = time.time()  # the clock Kafka record timestamps use
            await self._producer.send(
                topic,
                body.encode(),
                key=rid.encode(),
                headers=[("correlation_id", rid.encode()), ("reply_to", self.reply_topic.encode())],
            )
        limit = limit_s if limit_s is not None else 120 + len(texts) / 2  # a safety net, not a target
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._done.wait(), limit)
        self._waiting = set()
        if len(self._received) < len(sent):
            log.warning(
                "%d of %d requests unanswered after %.0f s", len(sent) - len(self._received), len(sent), limit
            )
        return Run(sent, self._received, rate)


# --- the bench ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """What every contender is fed."""

    mix: list[str]
    fixed: list[str]
    encodings: list[list[int]]
    files_read: int


@dataclass
class Context:
    """Shared state of one bench run."""

    plan: Plan
    model_dir: Path
    extra_models: Path | None
    out: Path
    bootstrap: str = ""
    broker_pid: int | None = None
    model_name: str = ""
    max_tokens: int = 256
    bar: Any = None

    def tick(self, n: int = 1) -> None:
        """Advance the progress bar."""
        if self.bar is not None:
            self.bar.update(n)

    def say(self, what: str) -> None:
        """Show the current step next to the progress bar."""
        if self.bar is not None:
            self.bar.set_postfix_str(what[:60])


def _unique(prefix: str) -> str:
    return f"bench-{prefix}-{uuid.uuid4().hex[:6]}"


class Host:
    """A worker process under test with its models loaded; serves Worker configurations on request."""

    def __init__(self, child: Child, buckets: Mapping[str, int], load_s: float) -> None:
        self.child = child
        self.buckets = dict(buckets)
        self.load_s = load_s

    @classmethod
    async def start(cls, ctx: Context, point: SweepPoint, with_extras: bool) -> Host:
        """Load the benched model (and the extra models) with ``point``'s engine settings."""
        folders = [ctx.model_dir]
        if with_extras and ctx.extra_models is not None:
            from worker.registry import model_folders

            folders += model_folders([ctx.extra_models])
        spec = {
            "models": [str(f) for f in folders],
            "intra_op_threads": point.settings.get("intra_op_threads", 0),
            "overrides": {ctx.model_name: dict(point.overrides)},
            "spin": point.settings.get("intra_op_spinning", True),
        }
        ctx.say(f"loading {len(folders)} model(s)")
        child = await Child.spawn(sys.executable, "host", spec, ctx.out / "logs" / f"{_unique('host')}.log")
        loaded = await child.event("loaded", limit_s=900)
        return cls(child, loaded["buckets"], loaded["load_s"])

    async def serve(self, ctx: Context, point: SweepPoint) -> str:
        """Start a Worker with ``point``'s settings on fresh topics; returns its request topic."""
        prefix = _unique("worker")
        settings = {
            "bootstrap_servers": ctx.bootstrap,
            "topic_prefix": prefix,
            "group_id": prefix,
            "session_timeout_ms": SESSION_TIMEOUT_MS,
            "heartbeat_interval_ms": HEARTBEAT_MS,
            "log_level": "WARNING",
            "provider": "cpu",
            **point.settings,
        }
        command = {"cmd": "serve", "settings": settings}
        await self.child.ask(command, "serving", limit_s=120)
        return f"{prefix}.text.requests"

    async def stop(self, topic: str) -> None:
        """Drain and stop the Worker serving ``topic``: an idle consumer still polls the broker."""
        await self.child.ask({"cmd": "stop", "prefix": topic.split(".", 1)[0]}, "stopped", limit_s=120)


async def warm_up(client: LoadClient, topic: str, ctx: Context, inputs: Inputs, count: int = 0) -> None:
    """Answers to a spread of lengths prove the consumer joined and touch every bucket."""
    sample = spaced_sample(sorted(inputs.mix, key=len), count or ctx.plan.warmup) + inputs.fixed[:4]
    run = await client.run(topic, sample, limit_s=300)
    if run.answered < len(sample):
        raise ChildError(f"warm-up on {topic}: only {run.answered} of {len(sample)} requests were answered")


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


def pick_best(sweep: Sequence[Mapping[str, Any]]) -> str:
    """The fastest point that meets the latency target at half load; if none does, see below."""

    def meets(row: Mapping[str, Any]) -> bool:
        bound = row["p99_bound_ms"]
        return bound is not None and row["half_load_p99_ms"]["median"] <= bound

    meeting = [row for row in sweep if meets(row)]
    if meeting:
        return str(max(meeting, key=lambda row: row["throughput_per_s"]["median"])["label"])
    # None meets it: of those within 10% of the fastest, the one that answers soonest at half load.
    top = max(row["throughput_per_s"]["median"] for row in sweep)
    close = [row for row in sweep if row["throughput_per_s"]["median"] >= 0.9 * top]
    return str(min(close, key=lambda row: row["half_load_p99_ms"]["median"])["label"])


async def worker_sweep(ctx: Context, client: LoadClient, inputs: Inputs) -> list[dict[str, Any]]:
    """Each sweep point served and measured in turns (points sharing models share a process)."""
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
                topic = await host.serve(ctx, entry.point)
                await warm_up(client, topic, ctx, inputs)
                entry.host_rss_mib = max(entry.host_rss_mib, round(rss_mib(host.child.pid), 1))
                saturation = (await client.run(topic, texts)).summary()
                rate = max(1.0, saturation["throughput_per_s"] / 2)
                paced = [texts[i % len(texts)] for i in range(max(20, int(rate * plan.sweep_paced_s)))]
                half = await client.run(topic, paced, rate=rate, limit_s=plan.sweep_paced_s + 120)
                await host.stop(topic)
                entry.saturation.append(saturation)
                entry.half_load.append(half.summary())
                ctx.tick()
    return [entry.row() for entry in entries]


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
    topic = f"{_unique('naive')}.text.requests"
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
    child = await Child.spawn(python, "naive", spec, ctx.out / "logs" / f"{_unique(backend)}.log")
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
        hwm = {"loaded": _vm_hwm(pid)}
        worker: dict[str, Any] = {
            "label": point.label,
            "settings": dict(point.settings),
            "overrides": dict(point.overrides),
            "process": "subprocess (python -m worker.bench host): the registry's load_model + Worker",
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
        hwm["stage costs"] = _vm_hwm(pid)
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
        hwm["saturation, mix"] = _vm_hwm(pid)
        ctx.say("worker: 128-token texts")
        worker["saturation_fixed_128"] = [
            await measured(ctx, "worker", pid, client.run(topic, inputs.fixed)) for _ in range(plan.repeats)
        ]
        hwm["saturation, 128 tokens"] = _vm_hwm(pid)
        capacity = float(np.median([r["throughput_per_s"] for r in worker["saturation_mix"]]))
        worker["latency_vs_load"] = await latency_sweep(ctx, client, topic, pid, inputs, capacity)
        hwm["paced runs"] = _vm_hwm(pid)
        ctx.say("worker: profiled saturation run")
        await host.child.ask({"cmd": "profile_start"}, "profiling")
        profiled = await measured(ctx, "worker", pid, client.run(topic, inputs.mix))
        worker["profile"] = (await host.child.ask({"cmd": "profile_stop"}, "profile"))["profile"]
        worker["profile"]["run"] = profiled
        hwm["profiled run"] = _vm_hwm(pid)
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


def _vm_hwm(pid: int) -> float:
    """Peak resident set size so far (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


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


@contextlib.asynccontextmanager
async def kafka(ctx: Context) -> AsyncIterator[None]:
    """KAFKA_BOOTSTRAP_SERVERS when set, else the embedded broker for the length of the run."""
    servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if servers:
        ctx.bootstrap = servers
        yield
        return
    from worker.embedded_broker import EmbeddedBroker

    async with EmbeddedBroker() as broker:
        ctx.bootstrap, ctx.broker_pid = broker.bootstrap_servers, broker.pid
        yield


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
    rates = raw_compare(onnx_path, cases, plan.repeats, ctx.tick)

    def described(kind: str, rows: int) -> dict[str, Any]:
        by_size = {b: rates[f"{kind} {b}"] for b in plan.batch_sizes}
        best = max(by_size, key=lambda b: by_size[b].median)
        return {
            "rows_per_pass": rows,
            "by_batch_size": {str(b): spread.to_json() for b, spread in by_size.items()},
            "best": {"batch_size": best, "sentences_per_s": by_size[best].to_json()},
        }

    found: dict[str, Any] = {
        "session": "onnxruntime.InferenceSession, dynamic shapes, ORT_ENABLE_ALL, default threads (1/core)",
        "length_sorted": described("sorted", len(sample)),
        "padded_128": described("padded", len(sample_128)),
    }
    ctx.say("raw ONNX Runtime: session options and a fused graph")
    fused, found["fusion"] = fused_copy(onnx_path, ctx.out / "fused.onnx")
    variants: dict[str, tuple[Mapping[str, str], Path | None]] = {
        "default (as worker/engine.py)": ({}, None),
        "no spinning": ({"session.intra_op.allow_spinning": "0"}, None),
        "no pre-packing": ({"session.disable_prepacking": "1"}, None),
    }
    if fused is not None:
        variants["fused graph (transformer optimizer)"] = ({}, fused)
    options: dict[str, RawCase] = {}
    for kind, rows, pad_to in (("length_sorted", sample, None), ("padded_128", sample_128, FIXED_TOKENS)):
        size = found[kind]["best"]["batch_size"]
        options |= {f"{kind}|{v}": RawCase(rows, size, pad_to, c, m) for v, (c, m) in variants.items()}
    compared = raw_compare(onnx_path, options, plan.repeats, ctx.tick)
    found["session_options"] = {
        kind: {"batch_size": found[kind]["best"]["batch_size"]}
        | {v: compared[f"{kind}|{v}"].to_json() for v in variants}
        for kind in ("length_sorted", "padded_128")
    }
    return found


def _median_of(runs: Sequence[Mapping[str, Any]], *path: str) -> Spread:
    values = []
    for run in runs:
        value: Any = run
        for key in path:
            value = value[key]
        values.append(float(value))
    return Spread.of(values)


def assess(result: dict[str, Any]) -> None:
    """Ratios and the issue's targets, from the measurements already in ``result``."""
    worker = result["worker"]
    raw = result["raw_ort"]
    throughput = _median_of(worker["saturation_mix"], "throughput_per_s")
    fixed = _median_of(worker["saturation_fixed_128"], "throughput_per_s")
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
                throughput.median / _median_of(runs, "throughput_per_s").median, 2
            )
    half = [r for r in worker["latency_vs_load"] if r["fraction"] == 0.5]
    p99 = _median_of(half, "latency_ms", "p99").median if half else None
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

    from worker.metadata import ModelMetadata

    metadata = ModelMetadata.load(model_dir)
    ctx = Context(plan, model_dir, extra_models, out, model_name=metadata.name)
    ctx.max_tokens = max(metadata.sequence_lengths or (512,))
    started = time.perf_counter()
    steps = (
        1  # inputs
        + plan.repeats * (2 * len(plan.batch_sizes) + 8)  # raw ORT passes
        + plan.sweep_repeats * len(plan.sweep)
        + 1  # stage costs
        + plan.repeats * 3  # worker, naive ONNX, naive PyTorch in turns
        + plan.repeats  # 128-token texts
        + len(plan.loads)
        + (plan.repeats - 1) * (0.5 in plan.loads)
        + 1  # profiled run
    )
    with tqdm(total=steps, desc="bench", unit="step", disable=not progress, file=sys.stderr) as bar:
        ctx.bar = bar
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        inputs, described = prepare_inputs(ctx, tokenizer)
        ctx.tick()
        result: dict[str, Any] = {"meta": _meta(ctx, plan), "inputs": described}
        result["raw_ort"] = measure_raw(ctx, inputs)
        async with kafka(ctx), LoadClient(ctx.bootstrap, ctx.model_name) as client:
            result["meta"]["kafka"] = "embedded tansu broker" if ctx.broker_pid else ctx.bootstrap
            result["sweep"] = await worker_sweep(ctx, client, inputs)
            best = pick_best(result["sweep"])
            point = next(p for p in plan.sweep if p.label == best)
            result |= await measure_main(ctx, client, point, inputs)
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
            "batch_sizes": list(plan.batch_sizes),
            "sweep_sentences": plan.sweep_sentences,
            "naive_sentences": plan.naive_sentences,
            "loads": list(plan.loads),
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# --- the report ---------------------------------------------------------------------------------


def _row(name: str, inputs: str, setting: str, runs: Sequence[Mapping[str, Any]] | Spread) -> list[str]:
    if isinstance(runs, Spread):
        return [name, inputs, setting, str(runs), "-", "-"]
    throughput = _median_of(runs, "throughput_per_s")
    p50 = _median_of(runs, "latency_ms", "p50").median
    p99 = _median_of(runs, "latency_ms", "p99").median
    return [name, inputs, setting, str(throughput), f"{p50:.0f}", f"{p99:.0f}"]


def render_table(result: Mapping[str, Any]) -> str:
    """The human summary printed at the end of a run."""
    raw, worker = result["raw_ort"], result["worker"]
    rows = [["system", "inputs", "setting", "sent/s median [min-max]", "p50 ms", "p99 ms"]]
    for key, label in (("length_sorted", "mix, length-sorted"), ("padded_128", "mix padded to 128")):
        for size, spread in raw[key]["by_batch_size"].items():
            rows.append(_row("raw ORT", label, f"batch {size}", _spread(spread)))
        options = dict(raw["session_options"][key])
        size = options.pop("batch_size")
        for variant, spread in options.items():
            rows.append(_row("raw ORT", label, f"batch {size}, {variant}"[:40], _spread(spread)))
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
            f"{name} {1000 * _median_of(worker['saturation_mix'], 'cpu_s', name).median / requests:.2f}"
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


def _spread(data: Mapping[str, Any]) -> Spread:
    return Spread(data["median"], data["min"], data["max"], tuple(data["values"]))


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
        spreads = [_spread(s) for s in raw[key]["by_batch_size"].values()]
        medians = [s.median for s in spreads]
        errors = [[s.median - s.low for s in spreads], [s.high - s.median for s in spreads]]
        left.errorbar(sizes, medians, yerr=errors, marker="o", capsize=3, label=label)
    worker = result["worker"]
    lines = [("worker e2e (mix)", _median_of(worker["saturation_mix"], "throughput_per_s").median, "k")]
    for key, label, colour in (
        ("naive_onnx", "naive ONNX", "tab:red"),
        ("naive_torch", "naive PyTorch", "tab:purple"),
    ):
        if "saturation_mix" in result[key]:
            lines.append(
                (label, _median_of(result[key]["saturation_mix"], "throughput_per_s").median, colour)
            )
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
        spreads = [_median_of(by_load[f], "latency_ms", key) for f in loads]
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


def main(args: argparse.Namespace) -> int:
    """``python -m worker bench``: run, write ``bench.json`` and ``bench.png``, print the table."""
    plan = Plan.make(quick=args.quick, sentences=args.sentences, repeats=args.repeats)
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
    sys.exit(child_main(sys.argv[1:]))
