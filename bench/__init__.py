"""Benchmark, soak and chaos tools for the worker; run from the repository root, never installed.

``python -m bench``: raw ONNX Runtime vs the worker end to end vs naive Kafka consumers
(bench/README.md). ``python bench/soak.py``: soak and chaos runs with real worker processes.
"""
