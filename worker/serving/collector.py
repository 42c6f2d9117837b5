"""What a worker loads once is moved out of the cycle collector's reach, so a full collection stalls nothing.

The objects built at start (transformers and its tokenizers, ONNX Runtime's bindings, the model
metadata: about 110,000 tracked objects with MiniLM) live as long as the process. Left in the
collector's oldest generation, every full collection walks them all: 37-49 ms of CPU on the idle
2-core machine; in 30 s runs of ``bench.paced`` at half load, the full collection held the event
loop (and every request in flight) 76-85 ms, frozen 6 ms. Frozen after loading (``gc.freeze``),
they are never walked again; a full collection walks only what was made since, and garbage cycles
made later are collected as before. (Flooded, a full collection still takes 50-110 ms: it walks the
thousand requests in flight.)
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def freeze_loaded() -> int:
    """Collect once, then freeze every object that survived (after loading the models); returns how many."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("%d objects loaded at start frozen: full collections skip them", frozen)
    return frozen
