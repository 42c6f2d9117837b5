"""ONNX inference worker: serves Hugging Face models exported to ONNX over Kafka."""

import os

# The worker never needs PyTorch; without this, transformers warns about its absence
# (and about PIL fallbacks) on every import. Users can still set their own verbosity.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
