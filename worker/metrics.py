"""Prometheus metrics and the health endpoints (/metrics, /healthz, /readyz) of one worker."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import MetricsHandler

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
#: /healthz fails when the event loop has not ticked for this long (a wedged worker).
STALL_SECONDS = 10.0


class WorkerMetrics:
    """The worker's metrics, in a registry of their own (several workers can share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "inference_requests", "Requests answered, by outcome (ok or an error code)",
            ["model", "modality", "outcome"], registry=r,
        )  # fmt: skip
        self.queue_seconds = Histogram(
            "inference_queue_seconds", "From the message's broker timestamp to the start of its batch",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_seconds = Histogram(
            "inference_batch_seconds", "Engine run plus task heads of one batch",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "inference_batch_size", "Real requests per batch (padding excluded)",
            ["model"], buckets=_BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("inference_in_flight", "Requests fetched and not yet answered", registry=r)
        self.paused_partitions = Gauge(
            "inference_paused_partitions", "Partitions paused by backpressure or drain", registry=r
        )
        self.lag = Gauge(
            "inference_consumer_lag", "High watermark minus position, where the broker reports it",
            ["topic", "partition"], registry=r,
        )  # fmt: skip
        self.in_flight_bytes = Gauge(
            "inference_in_flight_bytes", "Bytes held by requests fetched and not yet answered", registry=r
        )
        self.reply_to_refused = Counter(
            "inference_reply_to_refused", "Replies sent to the results topic instead of the reply_to asked for",
            ["reason"], registry=r,
        )  # fmt: skip
        self.publish_retries = Counter(
            "inference_publish_retries", "Retriable publish failures retried (reply or dlq)",
            ["kind"], registry=r,
        )  # fmt: skip
        self.publish_failures = Counter(
            "inference_publish_failures", "Publishes given up: gave_up (left for redelivery) or the refusal",
            ["kind", "reason"], registry=r,
        )  # fmt: skip
        self.dlq_degraded = Counter(
            "inference_dlq_degraded", "DLQ copies sent smaller than the request (truncated, headers_only)",
            ["form"], registry=r,
        )  # fmt: skip
        self.undecodable_records = Counter(
            "inference_undecodable_records", "Records the Kafka client could not decode, skipped to the DLQ",
            registry=r,
        )  # fmt: skip
        self.fetch_errors = Counter(
            "inference_fetch_errors", "Fetch rounds that failed in the broker or the client", registry=r
        )
        self.not_ready = Gauge(
            "inference_not_ready", "1 while the worker reports not ready for this reason",
            ["reason"], registry=r,
        )  # fmt: skip
        self._tick = time.monotonic()

    def tick(self) -> None:
        """Called from the event loop: proves it is not wedged."""
        self._tick = time.monotonic()

    @property
    def live(self) -> bool:
        """The event loop ticked recently."""
        return time.monotonic() - self._tick < STALL_SECONDS


class HealthServer:
    """A small HTTP server thread: /metrics (Prometheus), /healthz (live), /readyz (ready)."""

    def __init__(
        self, metrics: WorkerMetrics, ready: Callable[[], bool], port: int, host: str = "0.0.0.0"
    ) -> None:
        base = MetricsHandler.factory(metrics.registry)

        class Handler(base):  # type: ignore[valid-type,misc]
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path in ("/healthz", "/readyz"):
                    ok = metrics.live if path == "/healthz" else metrics.live and ready()
                    body = b"ok\n" if ok else b"not ok\n"
                    self.send_response(200 if ok else 503)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                super().do_GET()

            def log_message(self, format: str, *args: Any) -> None:
                return None  # scrapes every few seconds would flood the log

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name="health-http", daemon=True)

    def start(self) -> None:
        """Serve in a daemon thread."""
        self._thread.start()
        log.info(
            "metrics and health on http://%s:%d/metrics, /healthz, /readyz", *self.server.server_address[:2]
        )

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.server.shutdown()
        self.server.server_close()
