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
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from worker.app import Worker
from worker.client import InferenceClient
from worker.embedded_broker import EmbeddedBroker
from worker.metadata import iter_model_folders
from worker.registry import ServedModel, load_model
from worker.settings import Settings

SAMPLES = Path(__file__).resolve().parent.parent / "models" / "samples"
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
    if modality == "text":
        return [(f'"{s}"', {"text": s}) for s in SENTENCES]
    if modality == "vision":
        return [("image.png", {"image": _b64(SAMPLES / "image.png")})]
    if modality == "audio":
        if model.metadata.input("input_features") is not None:
            array, rate = _wav_samples(SAMPLES / "audio.wav")
            return [("audio.wav as a float array", {"array": array, "sampling_rate": rate})]
        return [("audio.wav", {"audio": _b64(SAMPLES / "audio.wav")})]
    if modality == "video":
        return [(f"{len(frames)} PNG frames", {"frames": [_b64(f) for f in frames]})]
    labels = ["a circle", "a square", "a dog"]
    return [(f"image.png vs {labels}", {"image": _b64(SAMPLES / "image.png"), "candidate_labels": labels})]


def _summary(reply: dict[str, Any]) -> str:
    if "error" in reply:
        return f"error {reply['error']['code']}: {reply['error']['message']}"
    outputs = reply["outputs"]
    if isinstance(outputs, list) and outputs and isinstance(outputs[0], dict):
        best = ", ".join(f"{o['label']} {o['score']:.2f}" for o in outputs[:3])
    else:
        best = f"{len(outputs)} values"
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


def load_with_progress(models_dir: Path, settings: Settings) -> dict[str, ServedModel]:
    """Load every model folder under ``models_dir`` with a progress bar."""
    folders = list(iter_model_folders(models_dir))
    overrides = settings.metadata_overrides()
    models: dict[str, ServedModel] = {}
    for folder in tqdm(folders, desc="loading models", unit="model"):
        model = load_model(folder, overrides=overrides.get(folder.name))
        models[model.name] = model
    return models


async def run_demo(models_dir: Path, settings: Settings, burst: int = 300) -> int:
    """The whole demo; returns the process exit code."""
    models = load_with_progress(models_dir, settings)
    async with _bootstrap(settings) as bootstrap:
        worker = Worker(settings.model_copy(update={"bootstrap_servers": bootstrap}), models)
        await worker.start()
        try:
            async with InferenceClient(bootstrap, topic_prefix=settings.topic_prefix) as client:
                await _show_examples(client, models)
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
