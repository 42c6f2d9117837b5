"""ONNX inference worker: serves Hugging Face models exported to ONNX over Kafka."""

import os

# The worker never needs PyTorch; without this, transformers warns about its absence
# (and about PIL fallbacks) on every import. Users can still set their own verbosity.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from typing import Any


def __getattr__(name: str) -> Any:
    # Lazy: `import worker` (the CLI, settings) must not pay for ONNX Runtime and transformers.
    if name in ("pipeline", "Pipeline"):
        import importlib

        return getattr(importlib.import_module("worker.inprocess"), name)
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
