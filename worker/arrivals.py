"""How fast work arrives: an exponentially weighted rate, the clock passed in (never read here).

The batcher (how many rows a free model waits for) and the fetch loop (whether to linger for a
fuller round) both size their waits by it: at low load they wait for nothing, under a steady
stream for what the stream brings in a few milliseconds.
"""

from __future__ import annotations

import math

#: Time constant (seconds): long enough to smooth a stream's bursts (a broker hands records over in
#: fetch rounds), short enough to follow a change of load.
RATE_WINDOW_S = 1.0


class ArrivalRate:
    """Arrivals per second, each weighted by exp(-age / window_s)."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._rate = 0.0
        self._at = 0.0

    def add(self, now: float, count: int = 1) -> None:
        """``count`` arrivals at ``now``."""
        self._rate = self.per_s(now) + count / self.window_s
        self._at = max(now, self._at)

    def per_s(self, now: float) -> float:
        """The rate as of ``now`` (it fades while nothing arrives)."""
        return self._rate * math.exp(-max(0.0, now - self._at) / self.window_s)

    def expected(self, now: float, seconds: float) -> float:
        """How many arrivals the current rate brings in ``seconds``."""
        return self.per_s(now) * seconds
