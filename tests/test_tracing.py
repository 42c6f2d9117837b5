"""W3C trace context through Kafka: a reply continues its request's trace; spans per request and batch.

Spans are read back from the OpenTelemetry SDK's in-memory exporter; trace and span ids are
compared with the ones the test itself wrote into the request's ``traceparent`` header.
"""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from schemas.topics import dlq_topic, requests_topic, results_topic
from tests.kafka_support import (
    TopicReader,
    body_of,
    headers_of,
    raw_producer,
    request_bytes,
    serving,
    tiny_models,
)
from worker.kafka.tracing import RequestTrace, Tracing
from worker.serving.registry import ServedModel

#: A traceparent written by hand (version 00, sampled): the ids every reply must continue.
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN}-01"


def parse(traceparent: str) -> tuple[str, str, str, str]:
    """version, trace id, span id, flags of a W3C traceparent."""
    version, trace_id, span_id, flags = traceparent.split("-")
    return version, trace_id, span_id, flags


@pytest.fixture
def exported() -> tuple[Tracing, InMemorySpanExporter]:
    """Tracing on, every finished span kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider, enabled=True), exporter


def named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def test_a_request_span_continues_the_incoming_trace_with_a_new_span_id(
    exported: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = exported
    request = tracing.request({"traceparent": TRACEPARENT}, received_ns=1, attributes={})
    version, trace_id, span_id, flags = parse(request.headers()["traceparent"])
    assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
    assert span_id != PARENT_SPAN
    tracing.request_done(request, None)
    [span] = exporter.get_finished_spans()
    assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT_SPAN
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert format(span.context.span_id, "016x") == span_id


def test_a_request_without_traceparent_starts_a_new_trace(
    exported: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = exported
    first = tracing.request({}, received_ns=1, attributes={})
    second = tracing.request({}, received_ns=1, attributes={})
    ids = {parse(r.headers()["traceparent"])[1] for r in (first, second)}
    assert len(ids) == 2 and TRACE_ID not in ids
    tracing.request_done(first, None)
    [span] = exporter.get_finished_spans()
    assert span.parent is None


def test_a_malformed_traceparent_starts_a_new_trace(exported: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, _ = exported
    request = tracing.request({"traceparent": "00-not-a-trace-01"}, received_ns=1, attributes={})
    _, trace_id, _, _ = parse(request.headers()["traceparent"])
    assert len(trace_id) == 32 and trace_id != "0" * 32


def test_off_the_trace_headers_pass_through_unchanged_and_no_span_is_made() -> None:
    tracing = Tracing()
    request = tracing.request(
        {"traceparent": TRACEPARENT, "tracestate": "vendor=1", "other": "x"}, received_ns=1, attributes={}
    )
    assert request.span is None
    assert request.headers() == {"traceparent": TRACEPARENT, "tracestate": "vendor=1"}
    assert tracing.batch([request], start_ns=1, attributes={}) is None
    assert Tracing().request({}, received_ns=1, attributes={}).headers() == {}


def test_a_batch_span_links_every_request_it_ran(exported: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, exporter = exported
    requests = [tracing.request({"traceparent": TRACEPARENT}, received_ns=1, attributes={}) for _ in range(3)]
    requests.append(tracing.request({}, received_ns=1, attributes={}))
    batch = tracing.batch(requests, start_ns=2, attributes={"inference.batch_size": 4})
    tracing.batch_done(batch, RuntimeError("boom"))
    [span] = named(exporter.get_finished_spans(), "inference batch")
    linked = {link.context.span_id for link in span.links}
    assert linked == {r.span.get_span_context().span_id for r in requests if r.span is not None}
    assert len(linked) == 4
    assert not span.status.is_ok


def test_stages_are_children_of_their_request(exported: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, exporter = exported
    request: RequestTrace = tracing.request({"traceparent": TRACEPARENT}, received_ns=1, attributes={})
    for name in ("preprocess", "queue wait", "publish"):
        tracing.stage(request, name, 5, 6)
    assert request.span is not None
    own = request.span.get_span_context().span_id
    stages = exporter.get_finished_spans()
    assert sorted(s.name for s in stages) == ["preprocess", "publish", "queue wait"]
    assert all(s.parent is not None and s.parent.span_id == own for s in stages)


# --- over Kafka ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ServedModel]:
    """The tiny text classifier: tracing does not depend on the model."""
    return tiny_models(tmp_path_factory.mktemp("models"), "bert")


@pytest.mark.kafka
async def test_a_reply_and_a_dlq_record_continue_the_request_trace_over_kafka(
    kafka_bootstrap: str,
    models: dict[str, ServedModel],
    exported: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = exported
    async with serving(kafka_bootstrap, models, spans=tracing, max_wait_ms=50) as worker:
        prefix = worker.settings.topic_prefix
        async with (
            TopicReader(kafka_bootstrap, results_topic("text", prefix), dlq_topic(prefix)) as read,
            raw_producer(kafka_bootstrap) as producer,
        ):
            for request_id in ("a", "b"):
                await producer.send_and_wait(
                    requests_topic("text", prefix),
                    request_bytes(request_id, "bert", {"text": f"trace {request_id}"}),
                    headers=[("traceparent", TRACEPARENT.encode())],
                )
            await producer.send_and_wait(
                requests_topic("text", prefix), b"{not json", headers=[("traceparent", TRACEPARENT.encode())]
            )
            await producer.send_and_wait(
                requests_topic("text", prefix), request_bytes("fresh", "bert", {"text": "no parent"})
            )
            records = await read.wait_until(
                lambda rs: len(rs) >= 5
            )  # 3 results, 1 error reply + its DLQ copy
    replies = {body_of(r).get("id"): r for r in records if r.topic == results_topic("text", prefix)}
    [dlq] = [r for r in records if r.topic == dlq_topic(prefix)]
    reply_spans = {}
    for request_id in ("a", "b"):
        _, trace_id, span_id, _ = parse(headers_of(replies[request_id])["traceparent"].decode())
        assert trace_id == TRACE_ID and span_id != PARENT_SPAN
        reply_spans[request_id] = int(span_id, 16)
    _, fresh_trace, _, _ = parse(headers_of(replies["fresh"])["traceparent"].decode())
    assert fresh_trace != TRACE_ID
    _, dlq_trace, _, _ = parse(headers_of(dlq)["traceparent"].decode())
    assert dlq_trace == TRACE_ID

    spans = exporter.get_finished_spans()
    requests = {s.context.span_id: s for s in named(spans, "inference request")}
    assert set(reply_spans.values()) <= set(requests)
    for span_id in reply_spans.values():
        request = requests[span_id]
        assert request.parent is not None and format(request.parent.span_id, "016x") == PARENT_SPAN
        children = sorted(s.name for s in spans if s.parent is not None and s.parent.span_id == span_id)
        assert children == ["preprocess", "publish", "queue wait"]
    linked = {link.context.span_id for batch in named(spans, "inference batch") for link in batch.links}
    assert set(reply_spans.values()) <= linked


@pytest.mark.kafka
async def test_with_tracing_off_the_reply_carries_the_incoming_traceparent(
    kafka_bootstrap: str, models: dict[str, ServedModel]
) -> None:
    async with serving(kafka_bootstrap, models, max_wait_ms=50) as worker:
        prefix = worker.settings.topic_prefix
        async with (
            TopicReader(kafka_bootstrap, results_topic("text", prefix)) as read,
            raw_producer(kafka_bootstrap) as producer,
        ):
            await producer.send_and_wait(
                requests_topic("text", prefix),
                request_bytes("off", "bert", {"text": "untraced"}),
                headers=[("traceparent", TRACEPARENT.encode()), ("tracestate", b"vendor=1")],
            )
            [reply] = await read.wait_for(1)
    assert headers_of(reply)["traceparent"] == TRACEPARENT.encode()
    assert headers_of(reply)["tracestate"] == b"vendor=1"
