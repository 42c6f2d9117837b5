"""A test-only failpoint: a worker that dies as the OOM killer kills, on a request marked for it."""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

#: Test-only failpoint: a worker whose environment sets this kills itself (SIGKILL, as the OOM
#: killer does) when it prepares a request whose body contains the variable's value. Unset, it
#: costs one lookup per request and does nothing.
CRASH_FAILPOINT_ENV = "ONNX_WORKER_TEST_CRASH_ON"


def crash_if_marked(raw: bytes) -> None:
    """Test-only failpoint (``CRASH_FAILPOINT_ENV``): die as the OOM killer kills, on a marked request."""
    mark = os.environ.get(CRASH_FAILPOINT_ENV)
    if mark and mark.encode() in raw:
        log.critical("test failpoint %s: killing this process", CRASH_FAILPOINT_ENV)
        os.kill(os.getpid(), signal.SIGKILL)
