"""Metrics and health endpoints, scraped over HTTP from a worker serving a real broker."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.kafka_support import serving, until
from tests.references import TINY
from worker.app import Worker
from worker.client import InferenceClient
from worker.serving.registry import ServedModel, load_model
from worker.settings import Settings


@pytest.fixture(scope="module")
def bert() -> dict[str, ServedModel]:
    return {"bert": load_model(TINY / "bert")}


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def scrape(port: int, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(_get, port, path)


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of metric ``name`` keyed by its sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


@pytest.mark.kafka
async def test_metrics_count_answers_by_outcome_and_health_turns_ready(
    kafka_bootstrap: str, bert: dict[str, ServedModel]
) -> None:
    async with serving(kafka_bootstrap, bert, metrics_port=0) as worker:
        assert worker.health is not None
        port = worker.health.port
        assert await scrape(port, "/healthz") == (200, "ok\n")
        assert await scrape(port, "/readyz") == (200, "ok\n")
        async with InferenceClient(kafka_bootstrap, worker.settings.topic_prefix) as client:
            for i in range(5):
                await client.request("text", "bert", {"text": f"hello {i}"})
            await client.request("text", "nope", {"text": "x"})
            await client.request("text", "bert", {"text": "x"}, deadline_ms=1)
        status, text = await scrape(port, "/metrics")
        assert status == 200
        counts = samples(text, "inference_requests_total")
        ok = (("modality", "text"), ("model", "bert"), ("outcome", "ok"))
        assert counts[ok] == 5
        assert counts[(("modality", "text"), ("model", "unknown"), ("outcome", "unknown_model"))] == 1
        assert counts[(("modality", "text"), ("model", "bert"), ("outcome", "deadline_exceeded"))] == 1
        assert samples(text, "inference_batch_size_count")[(("model", "bert"),)] >= 1
        assert samples(text, "inference_queue_seconds_count")[(("model", "bert"),)] == 5
        assert samples(text, "inference_paused_partitions")[()] == 0


async def test_a_worker_waiting_for_kafka_is_live_but_not_ready(
    bert: dict[str, ServedModel], caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(bootstrap_servers="127.0.0.1:9", metrics_port=0, topic_prefix="noready")
    worker = Worker(settings, bert)
    starting = asyncio.create_task(worker.start())
    try:
        assert worker.health is not None
        # Not ready because Kafka was tried and did not answer, not merely because it is early.
        await until(lambda: any("is not reachable" in r.getMessage() for r in caplog.records), 10)
        assert (await scrape(worker.health.port, "/healthz"))[0] == 200
        assert (await scrape(worker.health.port, "/readyz"))[0] == 503
    finally:
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await worker.stop()
