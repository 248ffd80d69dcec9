"""The one token bucket: at most `rate` a second on average, `burst` at once.

Two ways to spend it: `take` when the work can be left undone (the server continues an
incoming trace only while the budget lasts; the UDP echo answers while a source's bytes
last), `delay` when it must be done, later (discovery paces its API-server requests like client-go's QPS/burst).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate, self._burst, self._clock = rate, float(max(burst, 1)), clock
        self._tokens, self._at = self._burst, clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now

    def take(self, amount: float = 1.0) -> bool:
        """Take `amount` tokens if they are there now (the UDP echo counts bytes); False: do without."""
        self._refill()
        if self._tokens >= amount:
            self._tokens -= amount
            return True
        return False

    def delay(self) -> float:
        """Take a token, borrowing from the future if need be: how long to wait before using it."""
        self._refill()
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate
