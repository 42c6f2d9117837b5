"""What one bench run measures: the sweep of worker settings, the sizes, the shared state of a run."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "minilm"
DEFAULT_EXTRA_MODELS = ROOT / "models" / "tiny"
EXPORT_PYTHON = ROOT / ".venv-export" / "bin" / "python"
FIXED_TOKENS = 128
#: Kafka settings for every process under test: a short session makes tansu's group join quick.
SESSION_TIMEOUT_MS = 4000
HEARTBEAT_MS = 1000


@dataclass(frozen=True)
class SweepPoint:
    """One worker configuration: Settings fields plus metadata overrides of the benched model."""

    label: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    overrides: Mapping[str, Any] = field(default_factory=dict)

    @property
    def engine_key(self) -> str:
        """Points with equal keys can share one loaded set of models."""
        knobs = ("intra_op_threads", "intra_op_spinning", "batches_in_flight", "batch_shapes")
        engine = [self.settings.get(k) for k in knobs]
        return json.dumps([engine, self.overrides], sort_keys=True)


#: The previous defaults (before one session per model): 4 token buckets, 3 batch buckets.
COARSE_SEQUENCES = [16, 32, 64, 128, 256]

FULL_SWEEP = (
    SweepPoint(
        "defaults (CPU: longest shapes, 2 batches in flight x 1 thread, executor 3, batch 32, "
        "2048 tokens, wait 10 ms)"
    ),
    SweepPoint("max_batch_tokens 1024", {"max_batch_tokens": 1024}),
    SweepPoint("max_batch_size 16", {"max_batch_size": 16}),
    SweepPoint("max_wait_ms 2", {"max_wait_ms": 2.0}),
    SweepPoint("eager_when_idle off (a free batch slot waits max_wait_ms too)", {"eager_when_idle": False}),
    SweepPoint("batches_in_flight 1 (one batch on both cores, longest shapes)", {"batches_in_flight": 1}),
    SweepPoint(
        "batch_shapes buckets (the previous defaults: fixed shapes, one batch on both cores, executor 2)",
        {"batch_shapes": "buckets", "executor_threads": 2},
    ),
    SweepPoint(
        "fetch_max_wait_ms 500 busy and idle (the Kafka client's default)",
        {"fetch_max_wait_ms": 500, "idle_fetch_max_wait_ms": 500},
    ),
    SweepPoint(
        "coarse buckets: batch 1,8,32; sequence 16,32,64,128,256",
        {},
        {"batch_sizes": [1, 8, 32], "sequence_lengths": COARSE_SEQUENCES},
    ),
)
"""Points measured before and left out for time: max_wait_ms 25 (176/s against 185), batch buckets up to
64 (165/s), no token budget (178/s); executor_threads 1 (266/s against 277), intra_op_spinning
off (274/s) with one batch on both cores (spinning does nothing with one thread a run)."""


@dataclass(frozen=True)
class Plan:
    """Sizes of one run; ``--quick`` shrinks every one of them."""

    sentences: int = 2000
    repeats: int = 3
    rounds: int = 5
    """Rounds of the head-to-head (worker, raw ORT, naive ONNX, naive PyTorch at saturation, in turn)."""
    batch_sizes: tuple[int, ...] = (1, 8, 16, 32, 64)
    raw_rows: int = 384
    """Sentences per raw ONNX Runtime pass (a deterministic, evenly spaced sample of the mix)."""
    raw_rows_128: int = 96
    fixed_count: int = 256
    """Texts of exactly 128 tokens sent to the worker."""
    sweep_sentences: int = 500
    sweep_repeats: int = 2
    sweep_paced_s: float = 3.0
    """Seconds of each sweep point's paced run at half its saturation rate."""
    naive_sentences: int | None = None
    """Sentences of the naive consumers' saturation runs (None: the whole mix, as every contender)."""
    loads: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.85, 0.9, 1.0)
    """Offered load as fractions of the worker's saturation throughput."""
    idle_seconds: float = 20.0
    """How long an idle Worker's CPU (and the broker's) is read."""
    load_seconds: float = 8.0
    warmup: int = 64
    sweep: tuple[SweepPoint, ...] = FULL_SWEEP

    @classmethod
    def make(
        cls, *, quick: bool, sentences: int | None, repeats: int | None, rounds: int | None = None
    ) -> Plan:
        """The full plan, or the quick one; explicit counts win over either."""
        plan = cls()
        if quick:
            plan = cls(
                sentences=200,
                repeats=2,
                rounds=2,
                batch_sizes=(1, 8, 32),
                raw_rows=64,
                raw_rows_128=32,
                fixed_count=32,
                sweep_sentences=100,
                sweep_repeats=1,
                sweep_paced_s=1.0,
                naive_sentences=40,
                loads=(0.25, 0.5),
                idle_seconds=2.0,
                load_seconds=1.5,
                warmup=16,
                sweep=FULL_SWEEP[:3],
            )
        if sentences is not None:
            plan = replace(plan, sentences=sentences)
        if repeats is not None:
            plan = replace(plan, repeats=max(1, repeats))
        if rounds is not None:
            plan = replace(plan, rounds=max(1, rounds))
        return plan


@dataclass(frozen=True)
class Inputs:
    """What every contender is fed."""

    mix: list[str]
    fixed: list[str]
    encodings: list[list[int]]
    files_read: int


@dataclass
class Context:
    """Shared state of one bench run."""

    plan: Plan
    model_dir: Path
    extra_models: Path | None
    out: Path
    bootstrap: str = ""
    broker_pid: int | None = None
    model_name: str = ""
    max_tokens: int = 256
    bar: Any = None

    def tick(self, n: int = 1) -> None:
        """Advance the progress bar."""
        if self.bar is not None:
            self.bar.update(n)

    def say(self, what: str) -> None:
        """Show the current step next to the progress bar."""
        if self.bar is not None:
            self.bar.set_postfix_str(what[:60])
