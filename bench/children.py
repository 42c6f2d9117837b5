"""The processes under test, each in its own process so that its RSS and CPU are its own.

``python -m bench.children host SPEC``: the registry's ``load_model`` and ``Worker``, serving
configurations on request; ``naive SPEC``: one aiokafka consumer calling the model per message.
Commands arrive as JSON lines on stdin, events leave as JSON lines on stdout (``bench.hosts``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.plan import HEARTBEAT_MS, SESSION_TIMEOUT_MS
from bench.profile import StackSampler, stage_costs
from bench.raw import mean_pooled


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
    from worker.serving.collector import freeze_loaded
    from worker.serving.engine import EngineOptions
    from worker.serving.registry import load_model
    from worker.settings import Settings

    began = time.perf_counter()
    options = EngineOptions(
        intra_op_threads=int(spec["intra_op_threads"]),
        batches_in_flight=int(spec["batches_in_flight"]),
        batch_shapes=str(spec["batch_shapes"]),
        provider="cpu",
        spin=bool(spec["spin"]),
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
    freeze_loaded()  # as `python -m worker run` does after loading (worker/cli.py)
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
        # The ONNX folder keeps no PyTorch weights; the build's source package does.
        from models.minilm import package_folder

        source = package_folder()
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
        vector: list[float] = mean_pooled(hidden, encoded["attention_mask"])[0].tolist()
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
    """``python -m bench.children host|naive SPEC_JSON``: a process under test."""
    role, spec = argv[0], json.loads(argv[1])
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_host_main(spec) if role == "host" else _naive_main(spec))
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
