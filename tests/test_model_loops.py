"""The model loop: when a free batch slot takes what is queued (a real model, a real thread pool)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from aiokafka import TopicPartition

from schemas import Modality
from tests.references import TINY
from worker.intake import Job, now_ms
from worker.kafka.messages import Origin, Outgoing
from worker.kafka.tracing import Tracing
from worker.metrics import WorkerMetrics
from worker.model_loops import ModelLoops
from worker.run_state import RunState
from worker.serving.batching import MicroBatcher
from worker.serving.budget import batch_queue
from worker.serving.engine import EngineOptions
from worker.serving.inputs import TextInput
from worker.serving.metadata import Bucket
from worker.serving.registry import ServedModel, load_model
from worker.settings import Settings


class GatedPool(ThreadPoolExecutor):
    """A thread pool whose batches start at once and end only when the test opens the gate: a batch
    that is still running, without depending on how fast the machine is."""

    def __init__(self) -> None:
        super().__init__(max_workers=3)
        self.gate = threading.Event()
        #: the request ids of each batch handed to the pool, in order
        self.batches: list[list[str]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        jobs = fn.args[1]  # fn is functools.partial(run_batch, model, jobs, ...)
        self.batches.append([job.request_id for job in jobs])

        def gated() -> Any:
            assert self.gate.wait(10), "the test never opened the gate"
            return fn(*args, **kwargs)

        return super().submit(gated)


def _job(model: ServedModel, request_id: str) -> Job:
    origin = Origin(Modality.TEXT, TopicPartition("t", 0), 0, "replies", request_id, b"{}", now_ms())
    prepared = model.prepare(TextInput("the same short text"))
    return Job(origin, request_id, model, prepared, {}, None)


async def _until(check: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(what)


async def test_a_free_slot_takes_the_queue_eagerly_only_while_no_batch_of_the_model_runs() -> None:
    # Two slots, a batch of two rows at most, and a clock that moves only between the steps below:
    # nothing goes by time, so whatever runs went eagerly (no batch running) or as a full batch.
    model = load_model(
        TINY / "bert", engine_options=EngineOptions(batch_shapes="longest", batches_in_flight=2)
    )
    assert model.engine.batches_in_flight == 2
    pool = GatedPool()
    published: list[Outgoing] = []

    async def publish(replies: list[Outgoing]) -> None:
        published.extend(replies)

    loops = ModelLoops(
        RunState(), Settings(), {"bert": model}, pool, Tracing(), WorkerMetrics(), publish=publish
    )
    queue = batch_queue(model, 2, 0.5, 2048, prepared_of=lambda job: job.prepared)
    now = 0.0
    batcher: MicroBatcher[Bucket, Job] = MicroBatcher(queue, clock=lambda: now)
    loop = asyncio.create_task(loops._model_loop(model, batcher))

    def put(request_id: str) -> None:
        job = _job(model, request_id)
        batcher.put(job.prepared.shape_key, job)

    try:
        put("a")
        await _until(lambda: pool.batches == [["a"]], "an idle model runs a lone request at once")
        put("b")
        await asyncio.sleep(0.2)
        assert pool.batches == [["a"]], "beside a running batch a lone request waits: it would start cold"
        pool.gate.set()
        await _until(
            lambda: pool.batches == [["a"], ["b"]], "the running batch ended: the request goes at once"
        )
        await _until(lambda: len(published) == 2, "both answered")

        pool.gate.clear()
        now = 60.0  # a minute later: the arrival rate has faded, a lone request is low load again
        put("c")
        await _until(lambda: pool.batches[2:] == [["c"]], "idle again: at once")
        put("d")
        put("e")
        await _until(lambda: pool.batches[3:] == [["d", "e"]], "a full batch runs beside the running one")
        pool.gate.set()
        await _until(lambda: len(published) == 5, "all answered")
        assert all(reply.error is None and reply.body is not None for reply in published), published
    finally:
        pool.gate.set()
        batcher.close()
        await asyncio.wait_for(loop, 10)
        pool.shutdown()
