"""The model loops: per model, a micro-batcher and a loop that runs its ready batches in the executor."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import Executor
from typing import Any

from schemas import ErrorCode
from worker.answers import run_batch, split_expired
from worker.intake import Job, now_ms
from worker.kafka.messages import Outgoing, rejection
from worker.kafka.tracing import Tracing
from worker.metrics import WorkerMetrics
from worker.run_state import RunState
from worker.serving.batching import BatcherClosed, MicroBatcher
from worker.serving.budget import batch_queue
from worker.serving.inputs import Prepared
from worker.serving.metadata import Bucket
from worker.serving.registry import ServedModel
from worker.settings import Settings

log = logging.getLogger(__name__)


class ModelLoops:
    """One batcher and one supervised loop per model; each batch's replies go to ``publish``."""

    def __init__(
        self,
        state: RunState,
        settings: Settings,
        models: Mapping[str, ServedModel],
        executor: Executor,
        tracing: Tracing,
        metrics: WorkerMetrics,
        publish: Callable[[list[Outgoing]], Coroutine[Any, Any, None]],
    ) -> None:
        self._state = state
        self.settings = settings
        self.models = models
        self.executor = executor
        self.tracing = tracing
        self.metrics = metrics
        self._publish = publish
        self.batchers: dict[str, MicroBatcher[Bucket, Job]] = {}
        #: requests fetched and still being prepared (the intake's count, wired by the shell): a model with
        #: a free batch slot waits for them within max_wait, so a flood's round fills batches
        self.pending: Callable[[], int] = lambda: 0
        #: batches in the executor now (a drain that times out says where its requests are)
        self.running = 0

    def start(self) -> list[asyncio.Task[None]]:
        """A batcher per model and its loop, started; returns the loops' tasks."""
        s = self.settings
        loops = []
        for name, model in self.models.items():
            size, wait, tokens = s.batching_for(name)
            queue = batch_queue(model, size, wait, tokens, prepared_of=_prepared_of)
            batcher = MicroBatcher(queue, pending=self.pending)
            self.batchers[name] = batcher
            loops.append(asyncio.create_task(self._supervise(model, batcher), name=f"model:{name}"))
        return loops

    async def _supervise(self, model: ServedModel, batcher: MicroBatcher[Bucket, Job]) -> None:
        """Keep a model's loop running: a loop that dies is logged, reported not-ready, and restarted."""
        delay = 1.0
        while True:
            try:
                await self._model_loop(model, batcher)
                return
            except Exception:
                log.exception("the loop of model %s died; restarting in %.0f s", model.name, delay)
                self._state.dead_loops.add(model.name)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
            self._state.dead_loops.discard(model.name)

    async def _model_loop(self, model: ServedModel, batcher: MicroBatcher[Bucket, Job]) -> None:
        """Take ready batches of one model and run as many at once as its engine takes, in the executor;
        each hands its replies on as it ends."""
        slots = asyncio.Semaphore(model.engine.batches_in_flight)
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                await slots.acquire()
                for task in [t for t in running if t.done()]:
                    running.discard(task)
                    task.result()  # a batch that failed outside run_batch's own handling ends the loop
                try:
                    # A batch slot is free (the semaphore): what is queued runs at once, as waiting for
                    # max_wait would only add latency. Under load the slots are busy and batches fill.
                    key, jobs = await batcher.get(eager=self.settings.eager_when_idle)
                except BatcherClosed:
                    return
                task = asyncio.create_task(self._answer(model, key, jobs))
                running.add(task)
                task.add_done_callback(lambda _: slots.release())
        finally:
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    async def _answer(self, model: ServedModel, key: Bucket, jobs: list[Job]) -> None:
        """Run one batch in the executor and hand its replies to delivery.

        A fault outside ``run_batch``'s own handling (an engine that returns the wrong number of
        outputs, say) answers every request of the batch with an internal error (reply and DLQ
        copy, as ``run_batch`` answers a request that fails alone): the batch is settled either way.
        """
        now = now_ms()
        live, replies = split_expired(jobs, now)
        if live:
            started = time.perf_counter()
            started_ns = time.time_ns()
            for job in live:
                self.tracing.stage(job.origin.trace, "queue wait", job.queued_ns, started_ns)
            span = self.tracing.batch(
                (job.origin.trace for job in live),
                start_ns=started_ns,
                attributes={"inference.model": model.name, "inference.batch_size": len(live)},
            )
            run = functools.partial(run_batch, model, live, now, self.metrics, key)
            self.running += 1
            try:
                replies += await asyncio.get_running_loop().run_in_executor(self.executor, run)
            except Exception as exc:
                log.exception("internal error answering a batch of %d for %s", len(live), model.name)
                self.tracing.batch_done(span, exc)
                replies += [
                    rejection(j.origin, j.request_id, model.name, ErrorCode.INTERNAL, "internal error")
                    for j in live
                ]
            else:
                self.tracing.batch_done(span)
            finally:
                self.running -= 1
            log.debug(
                "%s: batch of %d in %.1f ms", model.name, len(live), (time.perf_counter() - started) * 1e3
            )
        # Publishing runs beside the next batch: the executor stays busy meanwhile.
        self._state.spawn(self._publish(replies))


def _prepared_of(job: Job) -> Prepared:
    return job.prepared
