"""Where a worker's time goes: an in-process stack sampler, and each stage's cost called directly."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Any

from bench.procstats import thread_cpu_seconds

CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "engine (ONNX Runtime, buffers)",
        ("/onnxruntime/", "/worker/serving/engine.py", "/worker/serving/assembly.py"),
    ),
    (
        "preprocessing (tokenizer)",
        (
            "/tokenizers/",
            "/transformers/",
            "/worker/serving/processors.py",
            "/worker/serving/tokenizing.py",
            "/worker/serving/inputs.py",
        ),
    ),
    ("JSON + validation (pydantic)", ("/pydantic", "/json/", "/schemas/")),
    ("task head (pooling)", ("/worker/serving/tasks.py",)),
    ("Kafka client (aiokafka, FastStream)", ("/aiokafka/", "/faststream/")),
    ("batcher", ("/worker/serving/batching.py", "/worker/serving/budget.py")),
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
        self._cpu_before = thread_cpu_seconds()
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
        cpu_after = thread_cpu_seconds()
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
    from worker.serving.batching import BatchQueue
    from worker.serving.budget import batch_length
    from worker.serving.decoding import decode_inputs
    from worker.serving.media_limits import MediaLimits

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
    # Batched as the worker's batcher does when all of them are queued at once (a flood).
    queue: BatchQueue[Any, int] = BatchQueue(
        max_batch_size, 0.0, length_of=lambda index: batch_length(model, prepared[index])
    )
    for index, item in enumerate(prepared):
        queue.add(item.shape_key, index, 0.0)
    chunks = []
    while (ready := queue.pop_ready(0.0)) is not None:
        chunks.append(ready[1])
    outputs: list[Any] = [None] * len(prepared)
    in_flight = model.engine.batches_in_flight
    began = clock()
    # As the worker runs them: as many batches at once as the engine takes, one executor thread each.
    with ThreadPoolExecutor(in_flight) as pool:
        for chunk, outs in zip(
            chunks, pool.map(lambda c: model.run([prepared[i] for i in c]), chunks), strict=True
        ):
            for i, out in zip(chunk, outs, strict=True):
                outputs[i] = out
    took[f"engine (per bucket, like lengths, batches of <= {max_batch_size}, {in_flight} at once)"] = (
        clock() - began
    )
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
