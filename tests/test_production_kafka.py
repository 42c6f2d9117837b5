"""The Kafka that users run: compressed producers, undecodable records, refused publishes, bounded bytes.

Every test here runs against a real broker (the embedded one unless KAFKA_BOOTSTRAP_SERVERS says
otherwise). Where the embedded broker cannot produce a fault by itself (it enforces no record size
limit and no ACLs), the refusal is injected at the one seam the worker publishes through,
``Worker.delivery.publish_record``, raising the exception aiokafka raises for it; that is said in each test.
"""

from __future__ import annotations

import asyncio
import json
import uuid
import zlib
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import cramjam
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import (
    CorruptRecordException,
    MessageSizeTooLargeError,
    NodeNotReadyError,
    TopicAuthorizationFailedError,
)
from aiokafka.producer import message_accumulator
from aiokafka.producer import producer as producer_module
from aiokafka.record.default_records import DefaultRecordBatch, _DefaultRecordBatchBuilderPy

from schemas.topics import dlq_topic, requests_topic, results_topic
from tests.kafka_support import (
    ProduceRefused,
    TopicReader,
    allow_records_up_to,
    body_of,
    build_batch,
    headers_of,
    new_prefix,
    produce_batch,
    raw_producer,
    read_to_the_end,
    request_bytes,
    serving,
    spoil_compressed,
    tiny_models,
    until,
)
from tests.references import TINY
from worker.app import Worker
from worker.kafka.commits import Flow
from worker.kafka.topics import create_topics
from worker.serving.registry import ServedModel
from worker.settings import Settings

pytestmark = pytest.mark.kafka

TEXT = {"text": "a production request"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ServedModel]:
    """The tiny text classifier only: these faults are in the transport, not the model."""
    return tiny_models(tmp_path_factory.mktemp("models"), "bert")


def ids_of(records: list[Any]) -> Counter[str]:
    return Counter(body_of(r)["id"] for r in records)


async def committed(bootstrap: str, worker: Worker, partitions: int = 4) -> dict[int, int | None]:
    """The group's committed offsets of the text request topic, read as a new client would."""
    topic = requests_topic("text", worker.settings.topic_prefix)
    reader = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=worker.settings.group_id, enable_auto_commit=False
    )
    await reader.start()
    try:
        return {p: await reader.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await reader.stop()


# --- codecs ---------------------------------------------------------------------------------


async def test_requests_from_producers_of_every_codec_are_each_answered_once(
    kafka_bootstrap: str, models: dict[str, ServedModel]
) -> None:
    """librdkafka producers with gzip, snappy, lz4 and zstd, interleaved with plain ones (as Java clients send)."""
    from confluent_kafka import Producer

    codecs = ["none", "gzip", "snappy", "lz4", "zstd"]
    async with serving(kafka_bootstrap, models) as worker:
        prefix = worker.settings.topic_prefix
        topic = requests_topic("text", prefix)
        sent: list[str] = []
        producers = {
            codec: Producer(
                {"bootstrap.servers": kafka_bootstrap, "compression.type": codec, "linger.ms": 20}
            )
            for codec in codecs
        }
        async with TopicReader(kafka_bootstrap, results_topic("text", prefix)) as answers:
            for i in range(20):
                for codec, producer in producers.items():
                    request_id = f"{codec}-{i}"
                    producer.produce(topic, request_bytes(request_id, "bert", TEXT), key=request_id.encode())
                    sent.append(request_id)
            for producer in producers.values():
                assert await asyncio.to_thread(producer.flush, 20) == 0
            got = await answers.wait_for(len(sent), timeout=60)
            await read_to_the_end(worker, answers)
        counts = ids_of(answers.records)
        assert set(counts) == set(sent), f"unanswered: {set(sent) - set(counts)}"
        assert max(counts.values()) == 1, [i for i, n in counts.items() if n > 1]
        assert all("error" not in body_of(r) for r in got)


# --- a record the client library cannot decode ----------------------------------------------


class _UndecodableName(str):
    """A header name whose bytes on the wire are not UTF-8 (what a non-Python producer can send)."""

    __slots__ = ()

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"\xff\xfe-not-utf8"


async def _send_undecodable(
    bootstrap: str, topic: str, partition: int, monkeypatch: pytest.MonkeyPatch
) -> int:
    """Produce one record whose header name is not UTF-8; returns its offset.

    aiokafka's compiled record builder insists on str header names; its pure-Python twin writes
    whatever bytes ``encode`` returns, so the test producer uses that one, for this record only.
    """
    with monkeypatch.context() as patch:
        patch.setattr(message_accumulator, "DefaultRecordBatchBuilder", _DefaultRecordBatchBuilderPy)
        patch.setattr(producer_module, "DefaultRecordBatchBuilder", _DefaultRecordBatchBuilderPy)
        async with raw_producer(bootstrap) as producer:
            meta = await producer.send_and_wait(
                topic, b'{"id": "bad"}', partition=partition, headers=[(_UndecodableName("x"), b"1")]
            )
    return int(meta.offset)


async def test_an_undecodable_record_costs_no_good_request_and_stalls_no_partition(
    kafka_bootstrap: str, models: dict[str, ServedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(kafka_bootstrap, models) as worker:
        prefix = worker.settings.topic_prefix
        topic = requests_topic("text", prefix)
        sent: list[str] = []
        async with (
            TopicReader(kafka_bootstrap, results_topic("text", prefix)) as answers,
            TopicReader(kafka_bootstrap, dlq_topic(prefix)) as dlq,
            raw_producer(kafka_bootstrap, linger_ms=5) as producer,
        ):

            async def send_round(tag: str) -> None:
                sends: list[Awaitable[Any]] = []
                for partition in range(4):
                    for i in range(10):
                        request_id = f"{tag}-p{partition}-{i}"
                        sent.append(request_id)
                        sends.append(
                            await producer.send(
                                topic, request_bytes(request_id, "bert", TEXT), partition=partition
                            )
                        )
                await asyncio.gather(*sends)

            await send_round("before")
            bad_offset = await _send_undecodable(kafka_bootstrap, topic, 2, monkeypatch)
            await send_round("after")
            await answers.wait_for(len(sent), timeout=60)
            [copy] = await dlq.wait_for(1, timeout=30)
            await until(lambda: worker.tracker.in_flight == 0, timeout=10)
        counts = ids_of(answers.records)
        assert set(counts) == set(sent) and max(counts.values()) == 1
        headers = headers_of(copy)
        assert headers["error_code"] == b"undecodable_input"
        assert headers["source_topic"] == topic.encode()
        assert (int(headers["source_partition"]), int(headers["source_offset"])) == (2, bad_offset)
        assert b"UnicodeDecodeError" in headers["error_message"]
        assert worker.metrics.undecodable_records._value.get() == 1
        # Every partition committed to its end: the skipped record too, after its DLQ record was acknowledged.
        ends = await committed(kafka_bootstrap, worker)
        assert ends == {0: 20, 1: 20, 2: 21, 3: 20}


# --- record batches built by hand: a bad record mid-batch, a batch that does not inflate ----


@pytest.mark.parametrize("attempts", [1, 3])
async def test_an_undecodable_record_in_the_middle_of_a_batch_costs_only_itself(
    kafka_bootstrap: str, models: dict[str, ServedModel], attempts: int
) -> None:
    """Ten good records, one whose header name is not UTF-8, ten good ones: all in one producer batch."""
    async with serving(kafka_bootstrap, models, max_decode_attempts=attempts) as worker:
        prefix = worker.settings.topic_prefix
        topic = requests_topic("text", prefix)
        good = [f"mid-{i}" for i in range(20)]
        entries: list[tuple[bytes, list[tuple[str, bytes | None]]]] = [
            (request_bytes(request_id, "bert", TEXT), []) for request_id in good
        ]
        entries.insert(10, (b'{"id": "bad"}', [(_UndecodableName("x"), b"1")]))
        async with (
            TopicReader(kafka_bootstrap, results_topic("text", prefix)) as answers,
            TopicReader(kafka_bootstrap, dlq_topic(prefix)) as dlq,
        ):
            base = await produce_batch(kafka_bootstrap, TopicPartition(topic, 1), bytes(build_batch(entries)))
            await answers.wait_for(len(good), timeout=30)
            await dlq.wait_for(1, timeout=30)
            await until(lambda: worker.tracker.in_flight == 0, timeout=10)
            copies = await dlq.settle()
        counts = ids_of(answers.records)
        assert counts == Counter(good), counts
        assert [(headers_of(c)["error_code"], int(headers_of(c)["source_offset"])) for c in copies] == [
            (b"undecodable_input", base + 10)
        ]
        assert b"UnicodeDecodeError" in headers_of(copies[0])["error_message"]
        assert worker.metrics.undecodable_records._value.get() == 1
        assert (await committed(kafka_bootstrap, worker))[1] == base + 21


@pytest.mark.parametrize(
    "codec",
    [
        DefaultRecordBatch.CODEC_GZIP,
        DefaultRecordBatch.CODEC_SNAPPY,
        DefaultRecordBatch.CODEC_LZ4,
        DefaultRecordBatch.CODEC_ZSTD,
    ],
    ids=["gzip", "snappy", "lz4", "zstd"],
)
async def test_a_compressed_batch_that_does_not_inflate_costs_only_its_own_records(
    kafka_bootstrap: str, kafka_kind: str, models: dict[str, ServedModel], codec: int
) -> None:
    """Partition 2: a good batch, five records whose compressed bytes do not inflate, a good batch of
    the same codec; good requests on every partition before and after.

    Apache Kafka decompresses a compressed batch to validate it when it is produced and refuses this
    one, so there the fault never reaches a consumer: the test checks that refusal. tansu stores the
    batch as sent, which is how a consumer can meet it (a broker bug, a disk fault, a mirror)."""

    def batch_of(tag: str, count: int) -> bytes:
        return bytes(
            build_batch([(request_bytes(f"{tag}-{i}", "bert", TEXT), []) for i in range(count)], codec)
        )

    spoilt = spoil_compressed(
        build_batch([(request_bytes(f"lost-{i}", "bert", TEXT), []) for i in range(5)], codec)
    )
    # The fault this test is about, checked with aiokafka's own decoder: CRC valid, records unreadable
    # (the batch's timestamps differ from run to run: some spoilt zstd frames still inflate, into
    # bytes that are no records).
    assert DefaultRecordBatch(spoilt).validate_crc()
    with pytest.raises((zlib.error, cramjam.DecompressionError, CorruptRecordException)):
        list(DefaultRecordBatch(spoilt))
    if kafka_kind == "apache":
        topic = f"{new_prefix()}.spoilt"
        await create_topics(kafka_bootstrap, [topic], 1)
        with pytest.raises(ProduceRefused):
            await produce_batch(kafka_bootstrap, TopicPartition(topic, 0), spoilt)
        return
    async with serving(kafka_bootstrap, models) as worker:
        prefix = worker.settings.topic_prefix
        topic = requests_topic("text", prefix)
        sent: list[str] = []
        async with (
            TopicReader(kafka_bootstrap, results_topic("text", prefix)) as answers,
            TopicReader(kafka_bootstrap, dlq_topic(prefix)) as dlq,
        ):
            for partition in range(4):
                await produce_batch(
                    kafka_bootstrap, TopicPartition(topic, partition), batch_of(f"before-{partition}", 3)
                )
                sent += [f"before-{partition}-{i}" for i in range(3)]
            bad = await produce_batch(kafka_bootstrap, TopicPartition(topic, 2), spoilt)
            for partition in range(4):
                await produce_batch(
                    kafka_bootstrap, TopicPartition(topic, partition), batch_of(f"after-{partition}", 3)
                )
                sent += [f"after-{partition}-{i}" for i in range(3)]
            await answers.wait_for(len(sent), timeout=30)
            await dlq.wait_for(5, timeout=30)
            await until(lambda: worker.tracker.in_flight == 0, timeout=10)
            copies = await dlq.settle()
        assert ids_of(answers.records) == Counter(sent)
        assert sorted(int(headers_of(c)["source_offset"]) for c in copies) == list(range(bad, bad + 5))
        assert {(headers_of(c)["error_code"], int(headers_of(c)["source_partition"])) for c in copies} == {
            (b"undecodable_input", 2)
        }
        assert worker.fetch_loop.fetcher is not None and worker.fetch_loop.fetcher.consecutive_errors == 0
        assert await committed(kafka_bootstrap, worker) == {0: 6, 1: 6, 2: 11, 3: 6}


async def test_after_the_last_record_of_a_partition_is_skipped_the_idle_fetch_wait_grows_again(
    kafka_bootstrap: str, models: dict[str, ServedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(
        kafka_bootstrap, models, fetch_timeout_ms=200, fetch_max_wait_ms=20, idle_fetch_max_wait_ms=400
    ) as worker:
        prefix = worker.settings.topic_prefix
        fetcher = worker.consumer._fetcher  # type: ignore[union-attr]
        await until(lambda: fetcher._fetch_max_wait_ms == 400, timeout=5)
        topic = requests_topic("text", prefix)
        async with (
            TopicReader(kafka_bootstrap, results_topic("text", prefix)) as answers,
            TopicReader(kafka_bootstrap, dlq_topic(prefix)) as dlq,
            raw_producer(kafka_bootstrap) as producer,
        ):
            # The bad record, the last of its partition; then a good request elsewhere, whose record
            # sets the short wait while the bad one's partition is read past it.
            await _send_undecodable(kafka_bootstrap, topic, 0, monkeypatch)
            await producer.send_and_wait(topic, request_bytes("good", "bert", TEXT), partition=1)
            await answers.wait_for(1, timeout=30)
            await dlq.wait_for(1, timeout=30)
        # The skipped record was the partition's last: nothing more to read, so the worker idles again.
        await until(lambda: fetcher._fetch_max_wait_ms == 400, timeout=10)


async def test_a_fault_that_escapes_a_fetch_round_is_counted_and_fetching_goes_on(
    kafka_bootstrap: str, models: dict[str, ServedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Injected: the worker's fetcher raises RuntimeError for its next six rounds (any fault the fetch
    path does not foresee: a bug, an aiokafka surprise); before, the fetch task ended, silently."""
    async with serving(kafka_bootstrap, models) as worker:
        assert worker.fetch_loop.fetcher is not None
        fetch = worker.fetch_loop.fetcher.fetch
        faults = 6

        async def failing(*args: Any, **kwargs: Any) -> Any:
            nonlocal faults
            if faults > 0:
                faults -= 1
                raise RuntimeError("an unforeseen fault")
            return await fetch(*args, **kwargs)

        prefix = worker.settings.topic_prefix
        async with (
            TopicReader(kafka_bootstrap, results_topic("text", prefix)) as answers,
            raw_producer(kafka_bootstrap) as producer,
        ):
            # Injected only now: the failing rounds' readiness is watched from their start (the first
            # round that works clears it).
            monkeypatch.setattr(worker.fetch_loop.fetcher, "fetch", failing)
            await until(lambda: "fetch_failing" in worker.not_ready_reasons(), timeout=10)
            await producer.send_and_wait(
                requests_topic("text", prefix), request_bytes("after-faults", "bert", TEXT), partition=0
            )
            [answer] = await answers.wait_for(1, timeout=30)
        assert body_of(answer)["id"] == "after-faults" and faults == 0
        assert worker.metrics.fetch_errors._value.get() >= 6
        assert worker.not_ready_reasons() == frozenset()


# --- bootstrap lists -------------------------------------------------------------------------


async def test_a_bootstrap_list_of_several_servers_is_taken(
    kafka_bootstrap: str, models: dict[str, ServedModel]
) -> None:
    """Production clusters are named by several brokers ("a:9092,b:9092"): the worker connected to
    none of them (FastStream took the whole string as one host) and retried for ever. The one broker
    named twice is such a list."""
    servers = f"{kafka_bootstrap.split(',')[0]},{kafka_bootstrap}"
    async with asyncio.timeout(30), serving(servers, models) as worker:
        prefix = worker.settings.topic_prefix
        async with (
            TopicReader(kafka_bootstrap, results_topic("text", prefix)) as answers,
            raw_producer(kafka_bootstrap) as producer,
        ):
            await producer.send_and_wait(
                requests_topic("text", prefix), request_bytes("listed", "bert", TEXT)
            )
            [answer] = await answers.wait_for(1)
    assert body_of(answer)["id"] == "listed" and "error" not in body_of(answer)


# --- publishes the broker refuses -----------------------------------------------------------


def refuse(worker: Worker, monkeypatch: pytest.MonkeyPatch, rule: Any) -> list[tuple[str, int]]:
    """Wrap the worker's one publishing seam: ``rule(topic, value)`` may return an exception to raise.

    Returns the log of (topic, size) of every record the broker was actually handed.
    """
    original = worker.delivery.publish_record
    handed: list[tuple[str, int]] = []

    async def publish(value: bytes, topic: str, *args: Any) -> Awaitable[Any]:
        failure = rule(topic, value)
        if failure is not None:
            raise failure
        handed.append((topic, len(value)))
        return await original(value, topic, *args)

    monkeypatch.setattr(worker.delivery, "publish_record", publish)
    return handed


async def test_a_dlq_copy_the_broker_refuses_is_shrunk_not_retried_forever(
    kafka_bootstrap: str, models: dict[str, ServedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Injected: MessageSizeTooLargeError for any DLQ record over 1 KiB (Kafka's answer to an oversize record)."""
    async with serving(kafka_bootstrap, models) as worker:
        prefix = worker.settings.topic_prefix
        dlq = dlq_topic(prefix)
        handed = refuse(
            worker,
            monkeypatch,
            lambda topic, value: MessageSizeTooLargeError() if topic == dlq and len(value) > 1024 else None,
        )
        topic = requests_topic("text", prefix)
        async with (
            TopicReader(kafka_bootstrap, results_topic("text", prefix)) as answers,
            TopicReader(kafka_bootstrap, dlq) as copies,
            raw_producer(kafka_bootstrap) as producer,
        ):
            # Rejected (unknown model) and large: its DLQ copy is refused whole.
            big = request_bytes("big", "no-such-model", {"text": "x" * 50_000})
            await producer.send_and_wait(topic, big, partition=0)
            for partition in range(1, 4):
                await producer.send_and_wait(
                    topic, request_bytes(f"ok-{partition}", "bert", TEXT), partition=partition
                )
            await answers.wait_for(4)
            [copy] = await copies.wait_for(1)
            await read_to_the_end(worker, answers, copies)
        counts = ids_of(answers.records)
        assert counts == Counter({"big": 1, "ok-1": 1, "ok-2": 1, "ok-3": 1})
        assert len(copies.records) == 1
        headers = headers_of(copy)
        assert headers["error_code"] == b"unknown_model"
        assert (headers["source_partition"], headers["source_offset"]) == (b"0", b"0")
        assert len(copy.value or b"") <= 1024
        assert int(
            headers.get("dlq_body_omitted_bytes", headers.get("dlq_truncated_from_bytes", b"0"))
        ) == len(big)
        assert worker.metrics.dlq_degraded.labels("smaller")._value.get() >= 1
        assert sum(1 for t, _ in handed if t == dlq) == 1


async def test_a_reply_to_the_broker_refuses_goes_to_the_results_topic_once(
    kafka_bootstrap: str, models: dict[str, ServedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Injected: TopicAuthorizationFailedError for an existing reply_to (the worker lacks write rights there)."""
    forbidden = f"team-x.replies.{uuid.uuid4().hex[:8]}"
    await create_topics(kafka_bootstrap, [forbidden], 1)
    # The operator opened team-x's replies (reply_to_pattern); only the broker's ACLs refuse the write.
    async with serving(kafka_bootstrap, models, reply_to_pattern=r"team-x\.replies\..+") as worker:
        prefix = worker.settings.topic_prefix
        refuse(
            worker,
            monkeypatch,
            lambda topic, value: TopicAuthorizationFailedError() if topic == forbidden else None,
        )
        async with (
            TopicReader(kafka_bootstrap, results_topic("text", prefix), forbidden) as reader,
            raw_producer(kafka_bootstrap) as producer,
        ):
            await producer.send_and_wait(
                requests_topic("text", prefix),
                request_bytes("denied", "bert", TEXT),
                headers=[("reply_to", forbidden.encode())],
            )
            [reply] = await reader.wait_for(1)
            await read_to_the_end(worker, reader)
        assert len(reader.records) == 1 and reply.topic == results_topic("text", prefix)
        assert "error" not in body_of(reply)
        assert headers_of(reply)["reply_to_refused"] == b"refused_by_broker"
        assert worker.metrics.reply_to_refused.labels("refused_by_broker")._value.get() == 1


async def test_retriable_publish_failures_are_retried_with_a_bound_and_counted(
    kafka_bootstrap: str, models: dict[str, ServedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Injected: NodeNotReadyError (retriable) for the first three attempts at one reply."""
    async with serving(kafka_bootstrap, models) as worker:
        prefix = worker.settings.topic_prefix
        failures = iter([NodeNotReadyError(), NodeNotReadyError(), NodeNotReadyError()])
        refuse(
            worker, monkeypatch, lambda topic, value: next(failures, None) if b'"flaky"' in value else None
        )
        async with (
            TopicReader(kafka_bootstrap, results_topic("text", prefix)) as answers,
            raw_producer(kafka_bootstrap) as producer,
        ):
            await producer.send_and_wait(requests_topic("text", prefix), request_bytes("flaky", "bert", TEXT))
            await producer.send_and_wait(
                requests_topic("text", prefix), request_bytes("steady", "bert", TEXT)
            )
            await answers.wait_for(2)
            await read_to_the_end(worker, answers)
        assert ids_of(answers.records) == Counter({"flaky": 1, "steady": 1})
        assert worker.metrics.publish_retries.labels("reply")._value.get() == 3
        assert worker.delivery.failing_since is None


async def test_a_reply_that_keeps_failing_past_the_bound_is_read_again_not_lost(
    kafka_bootstrap: str, models: dict[str, ServedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Injected: NodeNotReadyError for 2 s of one reply, with publish_retry_s 1: the request is redelivered."""
    async with serving(kafka_bootstrap, models, publish_retry_s=1.0) as worker:
        prefix = worker.settings.topic_prefix
        loop = asyncio.get_running_loop()
        until_t = loop.time() + 2.0
        refuse(
            worker,
            monkeypatch,
            lambda topic, value: (
                NodeNotReadyError() if b'"stuck"' in value and loop.time() < until_t else None
            ),
        )
        async with (
            TopicReader(kafka_bootstrap, results_topic("text", prefix)) as answers,
            raw_producer(kafka_bootstrap) as producer,
        ):
            await producer.send_and_wait(requests_topic("text", prefix), request_bytes("stuck", "bert", TEXT))
            await answers.wait_for(1, timeout=30)
            await until(lambda: worker.tracker.in_flight == 0)
        assert ids_of(answers.records)["stuck"] >= 1
        assert worker.metrics.publish_failures.labels("reply", "gave_up")._value.get() >= 1
        await worker.drain()  # commits what is answered (otherwise a race with the commit loop)
        ends = await committed(kafka_bootstrap, worker)
        assert sum(offset or 0 for offset in ends.values()) == 1


async def _send_copies(producer: Any, topic: str, body: bytes, count: int) -> None:
    """``count`` copies of a request whose id is "template", each with its own id (a0, a1, ...)."""
    for i in range(count):
        await producer.send_and_wait(topic, body.replace(b'"template"', f'"a{i}"'.encode()))


def _wav_request(request_id: str, seconds: float) -> bytes:
    """A request carrying ``seconds`` of 16 kHz mono 16-bit silence-plus-tone as a WAV."""
    import base64
    import io
    import wave

    import numpy as np

    t = np.arange(int(16_000 * seconds)) / 16_000
    samples = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16_000)
        wav.writeframes(samples.tobytes())
    audio = base64.b64encode(buffer.getvalue()).decode()
    return json.dumps({"id": request_id, "model": "whisper-encoder", "inputs": {"audio": audio}}).encode()


async def test_bytes_in_flight_stay_under_the_bound_in_a_flood_of_large_audio(
    kafka_bootstrap: str, kafka_kind: str, tmp_path: Path
) -> None:
    """60 requests of 55 s audio (2.3 MB of JSON each, ~140 MB in all) against an 8 MiB bound.

    Fetches of 16 MiB bring several requests per round, so intake outruns the model and the bound
    binds (with 2 MiB fetches a round holds about one request per partition and never gets there).
    """
    served = tiny_models(tmp_path, "whisper-encoder")
    bound = 8 * 1024 * 1024
    fetch = 16 * 1024 * 1024
    async with serving(kafka_bootstrap, served, max_in_flight_bytes=bound, fetch_max_bytes=fetch) as worker:
        prefix = worker.settings.topic_prefix
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, worker.tracker.bytes_in_flight)
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        body = _wav_request("template", 55.0)
        await allow_records_up_to(kafka_bootstrap, kafka_kind, requests_topic("audio", prefix), 4 * len(body))
        async with (
            TopicReader(kafka_bootstrap, results_topic("audio", prefix)) as answers,
            raw_producer(kafka_bootstrap, max_request_size=8 * 1024 * 1024) as producer,
        ):
            # A backlog as a worker meets it after a restart: all 60 wait in the topic before it reads
            # (its consumer held paused meanwhile), so intake is faster than the model and the bound binds.
            consumer = worker.consumer
            assert consumer is not None
            consumer.pause(*consumer.assignment())
            await _send_copies(producer, requests_topic("audio", prefix), body, 60)
            consumer.resume(*consumer.assignment())
            await answers.wait_for(60, timeout=240)
        watcher.cancel()
    assert len(ids_of(answers.records)) == 60
    assert all("error" not in body_of(r) for r in answers.records), body_of(answers.records[0])
    # One fetch round may land on top of the bound before the partitions pause: its raw bytes (at
    # most one partition's fetch) and their prepared arrays (whisper's features: ~0.4 x the JSON).
    print(f"peak in flight {peak / 2**20:.1f} MiB against a {bound / 2**20:.0f} MiB bound")
    assert peak <= bound + 1.5 * fetch + len(body) * 2, peak
    assert peak >= bound // 2, f"the flood never reached the bound ({peak} bytes): the test proves nothing"


#: What a worker process may grow by under a flood, beyond max_in_flight_bytes: one fetch, the
#: largest batch's ONNX Runtime arena and decode buffers, and allocator slack. Measured on this
#: 2-core machine: 275 MiB for 300 requests of 55 s audio, whatever the byte bound (without the
#: byte bound the same flood measured +1.7 GB).
RSS_SLACK_MIB = 320


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@pytest.mark.slow
async def test_a_worker_process_stays_under_the_stated_rss_bound_in_a_flood_of_large_audio(
    kafka_bootstrap: str, kafka_kind: str, tmp_path: Path
) -> None:
    """150 requests of 55 s audio (345 MB of JSON) at once into a `python -m worker run` process."""
    from tests.process_support import WorkerLauncher, wait_until

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "whisper-encoder").symlink_to(TINY / "whisper-encoder", target_is_directory=True)
    prefix = f"rss{uuid.uuid4().hex[:8]}"
    bound_mib = 32
    launcher = WorkerLauncher(kafka_bootstrap, tmp_path / "models", tmp_path)
    worker = launcher.start(
        "flooded", f"{prefix}.workers", prefix, "--max-in-flight-bytes", str(bound_mib * 2**20)
    )
    try:
        await worker.wait_for_log("worker started", 120)
        idle = peak = _rss_mib(worker.pid)
        body = _wav_request("template", 55.0)
        await allow_records_up_to(kafka_bootstrap, kafka_kind, requests_topic("audio", prefix), 4 * len(body))
        async with (
            TopicReader(kafka_bootstrap, results_topic("audio", prefix)) as answers,
            raw_producer(kafka_bootstrap, max_request_size=8 * 1024 * 1024) as producer,
        ):
            await _send_copies(producer, requests_topic("audio", prefix), body, 150)

            def answered_all() -> bool:
                nonlocal peak
                peak = max(peak, _rss_mib(worker.pid))
                return len(answers.records) >= 150

            await wait_until(answered_all, 240, "150 answers", [worker])
        print(f"RSS idle {idle:.0f} MiB, peak {peak:.0f} MiB, growth {peak - idle:.0f} MiB")
        assert peak - idle <= bound_mib + RSS_SLACK_MIB, f"grew {peak - idle:.0f} MiB\n{worker.log_tail()}"
    finally:
        launcher.kill_all()


async def test_a_fault_while_taking_records_in_costs_a_redelivery_not_a_request(
    kafka_bootstrap: str, models: dict[str, ServedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Injected: the first preparation raises (a bug of ours, not the request's); that record is read again."""
    async with serving(kafka_bootstrap, models) as worker:
        prefix = worker.settings.topic_prefix
        original = worker.intake.prepare
        faults = iter([RuntimeError("injected intake fault")])

        def prepare(origin: Any) -> Any:
            fault = next(faults, None)
            if fault is not None:
                raise fault
            return original(origin)

        monkeypatch.setattr(worker.intake, "prepare", prepare)
        async with (
            TopicReader(kafka_bootstrap, results_topic("text", prefix)) as answers,
            raw_producer(kafka_bootstrap) as producer,
        ):
            for i in range(8):
                await producer.send_and_wait(
                    requests_topic("text", prefix), request_bytes(f"r{i}", "bert", TEXT), partition=i % 4
                )
            await answers.wait_until(lambda records: set(ids_of(records)) == {f"r{i}" for i in range(8)})
            await until(lambda: worker.tracker.in_flight == 0)
        # Answered is not yet committed: the commit follows a moment later (on Apache Kafka, whose
        # fetches return at once, this test read the offsets before it); the drain commits.
        await worker.drain()
        ends = await committed(kafka_bootstrap, worker)
        assert ends == {0: 2, 1: 2, 2: 2, 3: 2}


async def test_a_record_that_fails_to_decode_while_paused_costs_no_fetch_loop(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backpressure polls its paused consumer to keep the membership (Flow.keep_membership); a partition
    resumed during that poll is fetched by it, and a record there that does not decode raises from
    aiokafka's getmany. That poll takes nothing: the record stays where it is for the fetch loop,
    which skips it to the DLQ, and the fetch loop goes on (the simulation's seed 1662 shows the case)."""
    topic = f"paused-{uuid.uuid4().hex[:8]}"
    await create_topics(kafka_bootstrap, [topic], 1)
    offset = await _send_undecodable(kafka_bootstrap, topic, 0, monkeypatch)
    tp = TopicPartition(topic, 0)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap,
        group_id=f"g-{topic}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.pause(tp)
        flow = Flow(Settings(bootstrap_servers=kafka_bootstrap))
        flow.consumer = consumer
        poll_began = asyncio.Event()
        getmany = consumer.getmany

        async def getmany_seen(*partitions: TopicPartition, **kwargs: Any) -> Any:
            poll_began.set()
            return await getmany(*partitions, **kwargs)

        monkeypatch.setattr(consumer, "getmany", getmany_seen)
        polling = asyncio.create_task(flow.keep_membership(8000))
        await asyncio.wait_for(poll_began.wait(), 10)
        consumer.resume(tp)  # backpressure let go while the poll waits
        await asyncio.wait_for(polling, 20)
        assert await consumer.position(tp) == offset  # nothing taken: the fetch loop meets the record
        with pytest.raises(UnicodeDecodeError):  # the record really does not decode (the test's premise)
            await consumer.getmany(tp, timeout_ms=2000)
    finally:
        await consumer.stop()
