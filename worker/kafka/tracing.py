"""W3C trace context through Kafka: one trace per request, continued from its ``traceparent`` header.

Off (the default) the worker only passes a request's ``traceparent``/``tracestate`` through to its
reply and DLQ record, unchanged, as any hop that records nothing would: two header look-ups a
request, no span objects. On, each request gets a span (a child of the incoming context, or the
root of a new trace) with children for its queue wait, preprocessing and publishing; each batch
run gets one span linked to the span of every request it ran; the reply and the DLQ record carry
the request span's ``traceparent`` (same trace id, a new span id). Spans go through the
OpenTelemetry API; the SDK and the OTLP exporter are the ``otel`` extra (see ``configure``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, StatusCode, Tracer, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

#: The W3C Trace Context headers (https://www.w3.org/TR/trace-context/), read and written as-is.
TRACE_HEADERS = ("traceparent", "tracestate")
#: Longest trace header kept: W3C caps tracestate at 32 members of 256 bytes (traceparent is 55).
MAX_TRACE_HEADER_BYTES = 8192

_PROPAGATOR = TraceContextTextMapPropagator()


@dataclass
class RequestTrace:
    """One request's place in its trace: its span when tracing is on, else the headers to pass on."""

    span: Span | None = None
    incoming: dict[str, str] = field(default_factory=dict)

    def headers(self) -> dict[str, str]:
        """The trace headers for the request's reply and DLQ record."""
        if self.span is None:
            return dict(self.incoming)
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(self.span))
        return carrier


class Tracing:
    """Starts and ends the spans of requests and batches; every call is a cheap no-op when off."""

    def __init__(self, provider: TracerProvider | None = None, *, enabled: bool = False) -> None:
        self.enabled = enabled
        self._tracer: Tracer | None = (
            (provider or trace.get_tracer_provider()).get_tracer("worker") if enabled else None
        )

    def request(
        self, headers: Mapping[str, str], *, received_ns: int, attributes: Mapping[str, Any]
    ) -> RequestTrace:
        """A request read from Kafka: its span starts at ``received_ns``, continuing its ``traceparent``."""
        incoming = {k: v for k in TRACE_HEADERS if (v := headers.get(k)) and len(v) <= MAX_TRACE_HEADER_BYTES}
        if self._tracer is None:
            return RequestTrace(incoming=incoming)
        parent: Context = _PROPAGATOR.extract(incoming)
        span = self._tracer.start_span(
            "inference request",
            context=parent,
            kind=SpanKind.CONSUMER,
            start_time=received_ns,
            attributes=dict(attributes),
        )
        return RequestTrace(span=span, incoming=incoming)

    def stage(self, request: RequestTrace, name: str, start_ns: int, end_ns: int | None = None) -> None:
        """Record a finished stage of one request (queue wait, preprocess, publish) as a child span."""
        if self._tracer is None or request.span is None:
            return
        child = self._tracer.start_span(
            name, context=trace.set_span_in_context(request.span), start_time=start_ns
        )
        child.end(end_time=end_ns if end_ns is not None else time.time_ns())

    def batch(
        self, requests: Iterable[RequestTrace], *, start_ns: int, attributes: Mapping[str, Any]
    ) -> Span | None:
        """One batch run: a span linked to the span of every request it runs (ended by ``batch_done``)."""
        if self._tracer is None:
            return None
        links = [Link(r.span.get_span_context()) for r in requests if r.span is not None]
        return self._tracer.start_span(
            "inference batch", links=links, start_time=start_ns, attributes=dict(attributes)
        )

    @staticmethod
    def batch_done(span: Span | None, error: BaseException | None = None) -> None:
        """End a batch span, marked failed when the run raised."""
        if span is None:
            return
        if error is not None:
            span.record_exception(error)
            span.set_status(StatusCode.ERROR, type(error).__name__)
        span.end()

    @staticmethod
    def request_done(request: RequestTrace, error_code: str | None) -> None:
        """End a request's span once its reply (or DLQ record) is acknowledged."""
        if request.span is None:
            return
        if error_code is not None:
            request.span.set_attribute("inference.error_code", error_code)
            request.span.set_status(StatusCode.ERROR, error_code)
        request.span.end()


def configure(enabled: bool) -> Tracing:
    """The worker's tracing: off, or on with the SDK exporting where the standard ``OTEL_*`` variables say.

    A TracerProvider already installed (``opentelemetry-instrument``, an embedding application) is
    used as it is; otherwise the ``otel`` extra's SDK is set up with the exporter that
    ``OTEL_TRACES_EXPORTER`` names (``otlp``, the default, or ``console``), the OTLP endpoint, headers
    and service name from their own ``OTEL_*`` variables.
    """
    if not enabled:
        return Tracing(enabled=False)
    current = trace.get_tracer_provider()
    if type(current).__name__ not in ("ProxyTracerProvider", "NoOpTracerProvider"):
        return Tracing(current, enabled=True)
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
    except ImportError as exc:
        raise RuntimeError(
            "WORKER_TRACING is on but the OpenTelemetry SDK is missing: pip install 'onnx-kafka-worker[otel]'"
        ) from exc
    name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")[0].strip()
    exporter: SpanExporter
    if name == "console":
        exporter = ConsoleSpanExporter()
    elif name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    else:
        raise RuntimeError(f"OTEL_TRACES_EXPORTER={name!r}: the worker exports traces by otlp or console")
    resource = Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "onnx-kafka-worker"}))
    provider = SdkTracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info("tracing on: spans exported by %s", name)
    return Tracing(provider, enabled=True)
