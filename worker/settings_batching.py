"""The model side's settings: micro-batching, per-model overrides, ONNX Runtime threads and provider."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class BatchingAndEngine(BaseModel):
    """How requests are batched per model and how ONNX Runtime runs the batches."""

    max_batch_size: int = Field(
        32,
        ge=1,
        description="Dispatch a batch once a model's bucket holds this many rows (a request is one row, "
        "a zero-shot request one per candidate label).",
    )
    max_wait_ms: float = Field(10.0, ge=0, description="...or once its oldest request has waited this long.")
    eager_when_idle: bool = Field(
        True,
        description="A model with a batch slot free (fewer than batches_in_flight running) does not wait for "
        "max_batch_size: it takes what is queued once that is what the arrival rate brings in max_wait_ms (at "
        "once at low load, when less than one request a max_wait_ms arrives), or max_wait_ms has passed; a steady "
        "stream then runs in batches that pay for a run's fixed cost. Under load the slots are busy and batches "
        "fill up.",
    )
    max_batch_tokens: int = Field(
        2048,
        ge=1,
        description="Token budget of one batch (rows x sequence bucket): long texts run in smaller batches, "
        "so one batch's run time and memory stay bounded. Rounded down to a batch bucket; at least 1 row.",
    )
    model_overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-model overrides as JSON: max_batch_size, max_wait_ms, max_batch_tokens, or any metadata key, "
        'e.g. {"bert": {"max_batch_size": 8, "sequence_lengths": [32, 64]}}.',
    )
    executor_threads: int = Field(
        0,
        ge=0,
        description="Threads of the one executor that runs preprocessing and ONNX Runtime (0: the most "
        "batches in flight of any model, plus one for preprocessing).",
    )
    batches_in_flight: int = Field(
        0,
        ge=0,
        description="Batches of one model that run at once, each on an executor thread (0: two on CPU, "
        "one on CUDA). More than one needs batch_shapes longest: a bucket's buffers take one batch at a time.",
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime intra-op threads of one batch's run (0: on CPU the cores shared out among "
        "the batches in flight, on CUDA one per core).",
    )
    batch_shapes: Literal["auto", "buckets", "longest"] = Field(
        "auto",
        description="Shapes batches run at: buckets (fixed shapes, padded rows and tokens), longest (exactly "
        "the batch's rows and its longest real token length), auto (buckets on CUDA, longest on CPU).",
    )
    intra_op_spinning: bool = Field(
        True,
        description="Let ONNX Runtime's intra-op threads spin between parallel sections (faster batches; "
        "off saves CPU on a shared or mostly idle machine).",
    )
    provider: str = Field(
        "auto", pattern="^(auto|cuda|cpu)$", description="auto (CUDA when it loads, else CPU) | cuda | cpu."
    )

    def batching_for(self, model: str) -> tuple[int, float, int]:
        """(max batch size, max wait in seconds, max batch tokens) for one model, overrides applied."""
        override = self.model_overrides.get(model, {})
        size = int(override.get("max_batch_size", self.max_batch_size))
        wait_ms = float(override.get("max_wait_ms", self.max_wait_ms))
        tokens = int(override.get("max_batch_tokens", self.max_batch_tokens))
        return size, wait_ms / 1000, tokens

    def metadata_overrides(self) -> dict[str, dict[str, Any]]:
        """The per-model overrides that are metadata keys (everything but batching knobs)."""
        return {
            model: {k: v for k, v in override.items() if k not in BATCHING_KEYS}
            for model, override in self.model_overrides.items()
        }


#: Per-model override keys that tune the batcher rather than the model's metadata.
BATCHING_KEYS = frozenset({"max_batch_size", "max_wait_ms", "max_batch_tokens"})
