"""The operator's settings: draining, model loading, logs, traces and the metrics port."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Operations(BaseModel):
    """Shutdown, model-folder errors, logging, tracing and the metrics/health server."""

    drain_timeout_s: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM, how long to finish in-flight batches; the process exits within this "
        "plus about 5 s whatever the broker does, leaving what was not answered uncommitted.",
    )
    skip_bad_models: bool = Field(
        False, description="Skip model folders that fail to load (with a warning) instead of exiting."
    )
    log_level: str = Field("INFO", description="Python logging level.")
    tracing: bool = Field(
        False,
        description="OpenTelemetry spans per request and batch, exported as the OTEL_* variables say "
        "(needs the otel extra). Off: a request's traceparent is passed to its reply unchanged.",
    )
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="HTTP port for /metrics (Prometheus), /healthz and /readyz; unset: off, 0: any free port. "
        "With --processes N, process i uses port + i.",
    )
