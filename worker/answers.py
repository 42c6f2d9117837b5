"""Answers: a batch of Jobs -> one reply per request (results, or typed errors). Executor side, no broker."""

from __future__ import annotations

import logging
import time

from schemas import ErrorCode, Result, Timing
from schemas.errors import InferenceError
from worker.intake import Job
from worker.kafka.messages import Outgoing, rejection
from worker.metrics import WorkerMetrics
from worker.serving.metadata import Bucket
from worker.serving.registry import ServedModel

log = logging.getLogger(__name__)


def split_expired(jobs: list[Job], now_ms: int) -> tuple[list[Job], list[Outgoing]]:
    """The jobs still worth running, and a deadline_exceeded answer for each one whose deadline passed."""
    live = [j for j in jobs if j.deadline_ms is None or j.deadline_ms > now_ms]
    expired = [
        rejection(
            j.origin, j.request_id, j.model.name, ErrorCode.DEADLINE_EXCEEDED, "deadline passed in the queue"
        )
        for j in jobs
        if j.deadline_ms is not None and j.deadline_ms <= now_ms
    ]
    return live, expired


def run_batch(
    model: ServedModel, jobs: list[Job], started_ms: int, metrics: WorkerMetrics, key: Bucket | None = None
) -> list[Outgoing]:
    """One engine call for the batch, then each request's task head; a failing batch runs one by one."""
    begin = time.perf_counter()
    try:
        outputs = model.run([j.prepared for j in jobs], key)
    except Exception as exc:
        if len(jobs) == 1:
            job = jobs[0]
            if isinstance(exc, InferenceError):  # the request's own fault, with its code
                return [rejection(job.origin, job.request_id, model.name, exc.code, exc.message)]
            log.exception("internal error running %s", model.name)
            return [rejection(job.origin, job.request_id, model.name, ErrorCode.INTERNAL, "internal error")]
        # One bad request must not fail its neighbours: retry them one by one.
        return [reply for job in jobs for reply in run_batch(model, [job], started_ms, metrics)]
    inference_ms = (time.perf_counter() - begin) * 1000
    metrics.batch_seconds.labels(model.name).observe(inference_ms / 1000)
    metrics.batch_size.labels(model.name).observe(len(jobs))
    replies = []
    for job, out in zip(jobs, outputs, strict=True):
        queue_ms = max(0.0, started_ms - job.origin.timestamp_ms)
        metrics.queue_seconds.labels(model.name).observe(queue_ms / 1000)
        try:
            result = Result(
                id=job.request_id,
                model=model.name,
                task=model.metadata.task,
                outputs=model.postprocess(out, job.prepared, job.parameters),
                truncated=job.prepared.truncated,
                timing=Timing(queue_ms=queue_ms, inference_ms=inference_ms, batch_size=len(jobs)),
            )
            replies.append(
                Outgoing(job.origin, job.request_id, model.name, result.model_dump_json().encode())
            )
        except InferenceError as exc:
            replies.append(rejection(job.origin, job.request_id, model.name, exc.code, exc.message))
        except Exception:
            log.exception("internal error post-processing %s", model.name)
            replies.append(
                rejection(job.origin, job.request_id, model.name, ErrorCode.INTERNAL, "internal error")
            )
    return replies
