"""Large buffers go back to the operating system when freed, so a worker's RSS follows what it holds.

glibc maps an allocation of its own only above a threshold that starts at 128 KiB and rises,
after the first large free, up to 32 MiB; from then on multi-MB media buffers (request bodies,
decoded samples and frames) come from the heap and fragment it. Measured on the 2-core machine,
a worker flooded with 150 requests of 55 s audio (tests/test_production_kafka.py) grew 406 MiB
above idle with the rising threshold and 168 MiB with it fixed at 1 MiB.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

#: glibc's mallopt() parameter for the mmap threshold (malloc.h); setting it also stops it rising.
M_MMAP_THRESHOLD = -3
#: Allocations from this size up are mapped on their own and unmapped when freed.
MMAP_THRESHOLD_BYTES = 1 << 20


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD_BYTES; False where the C library has no mallopt."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    log.debug("mmap threshold fixed at %d bytes: %s", MMAP_THRESHOLD_BYTES, done)
    return done
