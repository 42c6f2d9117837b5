"""``python -m worker demo``: broker, worker and a client in one process, as a user would run them.

Starts the embedded broker unless one is configured, loads every model folder, starts the
worker, sends a few requests per modality as JSON to the request topics (plus one bad one),
prints the replies, then a burst of text requests for a throughput/latency line.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import statistics
import time
import wave
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from worker.app import Worker
from worker.client import InferenceClient
from worker.kafka.embedded_broker import EmbeddedBroker
from worker.loading import load_configured
from worker.serving.allocator import fix_mmap_threshold
from worker.serving.collector import freeze_loaded
from worker.serving.registry import ServedModel
from worker.settings import Settings

#: Shipped inside the package (package data; in the repository, links to models/tiny and models/samples).
DEMO_DATA = Path(str(resources.files("worker") / "demo_models"))
#: The nine tiny models (random weights) the demo serves unless given other folders.
TINY_MODELS = DEMO_DATA / "tiny"
SAMPLES = DEMO_DATA / "samples"
SENTENCES = (
    "The service was quick and the food was wonderful.",
    "I waited an hour and nobody answered the phone.",
    "The package arrived on Tuesday.",
)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _wav_samples(path: Path) -> tuple[list[float], int]:
    with wave.open(str(path)) as wav:
        rate = wav.getframerate()
        data = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    return (data.astype(np.float32) / 32768.0).round(5).tolist(), rate


def demo_inputs(model: ServedModel) -> list[tuple[str, dict[str, Any]]]:
    """(what a person reads, request inputs) pairs that suit the model's modality."""
    modality = model.metadata.modality.value
    frames = sorted((SAMPLES / "video").glob("frame_*.png"))
    task = model.metadata.task
    if task == "question-answering":
        question, context = "Who sat on the mat?", "The cat sat on the mat while the dog slept."
        return [(f'"{question}" in "{context}"', {"text": question, "text_pair": context})]
    if task in ("token-classification", "feature-extraction"):
        return [('"Anna moved from Paris to Berlin."', {"text": "Anna moved from Paris to Berlin."})]
    if modality == "text":
        return [(f'"{s}"', {"text": s}) for s in SENTENCES]
    if modality == "vision":
        return [("image.png", {"image": _b64(SAMPLES / "image.png")})]
    if modality == "audio":
        if model.metadata.input("input_features") is not None:
            array, rate = _wav_samples(SAMPLES / "audio.wav")
            return [("audio.wav as a float array", {"array": array, "sampling_rate": rate})]
        return [
            ("audio.wav", {"audio": _b64(SAMPLES / "audio.wav")}),
            ("audio.mp3 (44.1 kHz stereo)", {"audio": _b64(SAMPLES / "audio.mp3")}),
        ]
    if modality == "video":
        return [
            (f"{len(frames)} PNG frames", {"frames": [_b64(f) for f in frames]}),
            ("video.mp4 (H.264)", {"video": _b64(SAMPLES / "video.mp4")}),
        ]
    labels = ["a circle", "a square", "a dog"]
    return [(f"image.png vs {labels}", {"image": _b64(SAMPLES / "image.png"), "candidate_labels": labels})]


def _name_of(output: dict[str, Any]) -> str:
    """What a person reads first in one pipeline output item."""
    for key in ("label", "entity_group", "answer"):
        if key in output:
            return repr(output[key]) if key == "answer" else str(output[key])
    return f"{output.get('word', '?')}={output.get('entity', '?')}"


def _summary(reply: dict[str, Any]) -> str:
    if "error" in reply:
        return f"error {reply['error']['code']}: {reply['error']['message']}"
    outputs = reply["outputs"]
    if isinstance(outputs, dict):
        outputs = [outputs]
    if isinstance(outputs, list) and outputs and isinstance(outputs[0], dict):
        best = ", ".join(f"{_name_of(o)} {o['score']:.2f}" for o in outputs[:3])
    else:
        best = (
            f"a vector of {len(outputs)} values"
            if outputs and not isinstance(outputs[0], list)
            else "token vectors"
        )
    timing = reply["timing"]
    return f"{best}  ({timing['inference_ms']:.1f} ms in a batch of {timing['batch_size']})"


@contextlib.asynccontextmanager
async def _bootstrap(settings: Settings) -> AsyncIterator[str]:
    if settings.bootstrap_servers:
        yield settings.bootstrap_servers
        return
    broker = EmbeddedBroker()
    print("starting the embedded Kafka-API broker (tansu) ...", flush=True)
    bootstrap = await broker.astart()
    try:
        yield bootstrap
    finally:
        await broker.astop()


def load_with_progress(paths: list[Path], settings: Settings) -> dict[str, ServedModel]:
    """Every model folder found under ``paths``, loaded as ``run`` loads them, with a progress bar."""
    return load_configured(
        paths, settings, progress=lambda folders: tqdm(folders, desc="loading models", unit="model")
    )


async def run_demo(paths: list[Path], settings: Settings, burst: int = 300) -> int:
    """The whole demo; returns the process exit code."""
    fix_mmap_threshold()
    models = load_with_progress(paths, settings)
    freeze_loaded()  # as `python -m worker run` does (worker/cli.py's prepare_process)
    async with _bootstrap(settings) as bootstrap:
        worker = Worker(settings.model_copy(update={"bootstrap_servers": bootstrap}), models)
        await worker.start()
        try:
            async with InferenceClient(bootstrap, topic_prefix=settings.topic_prefix) as client:
                await _show_examples(client, models)
                await _similarity(client, models)
                await _burst(client, models, burst)
        finally:
            await worker.drain()
            await worker.stop()
    return 0


async def _show_examples(client: InferenceClient, models: dict[str, ServedModel]) -> None:
    print("\nrequests as a client sends them (JSON to inference.<modality>.requests):")
    for name, model in models.items():
        modality = model.metadata.modality.value
        for label, inputs in demo_inputs(model):
            reply = await client.request(modality, name, inputs, timeout=60)
            print(f"  [{modality}/{name}] {label[:60]}\n      -> {_summary(reply)}")
    reply = await client.request("text", "no-such-model", {"text": "hello"})
    print(f"  [text/no-such-model] a model that is not served\n      -> {_summary(reply)}")


SIMILARITY_QUERY = "A man is playing a guitar."
SIMILARITY_CANDIDATES = (
    "Someone is playing an instrument.",
    "A person strums a six-string on stage.",
    "The chef is cooking pasta in the kitchen.",
    "The stock market fell sharply today.",
)


async def _similarity(client: InferenceClient, models: dict[str, ServedModel]) -> None:
    """Sentence embeddings from a pooled feature-extraction model, ranked by cosine similarity."""
    pooled = [m for m in models.values() if m.metadata.task == "feature-extraction" and m.metadata.pooling]
    if not pooled:
        return
    # The largest file is the real model (MiniLM), not a tiny random-weight one.
    name = max(pooled, key=lambda m: m.metadata.onnx_path.stat().st_size).name
    texts = [SIMILARITY_QUERY, *SIMILARITY_CANDIDATES]
    replies = await asyncio.gather(*(client.request("text", name, {"text": t}, timeout=60) for t in texts))
    vectors = np.asarray([reply["outputs"] for reply in replies], dtype=np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = vectors[1:] @ vectors[0]
    print(f"\nsemantic similarity with {name!r} (sentence embeddings over Kafka): {SIMILARITY_QUERY!r}")
    for score, text in sorted(zip(scores, SIMILARITY_CANDIDATES, strict=True), reverse=True):
        print(f"  {score:+.3f}  {text}")


async def _burst(client: InferenceClient, models: dict[str, ServedModel], count: int) -> None:
    text = next((n for n, m in models.items() if m.metadata.modality.value == "text"), None)
    if text is None or count <= 0:
        return
    latencies: list[float] = []

    async def one(i: int, bar: tqdm[Any]) -> None:
        started = time.perf_counter()
        await client.request("text", text, {"text": f"{SENTENCES[i % len(SENTENCES)]} ({i})"}, timeout=120)
        latencies.append((time.perf_counter() - started) * 1000)
        bar.update()

    began = time.perf_counter()
    with tqdm(total=count, desc=f"burst of {count} text requests", unit="req") as bar:
        await asyncio.gather(*(one(i, bar) for i in range(count)))
    elapsed = time.perf_counter() - began
    quantiles = statistics.quantiles(latencies, n=100)
    print(
        f"\n{count} requests to {text!r} answered in {elapsed:.2f} s: {count / elapsed:.0f} req/s, "
        f"latency p50 {quantiles[49]:.0f} ms, p99 {quantiles[98]:.0f} ms"
    )
